"""The real ``twistd -n lgmt-proxy`` process: SIGTERM drain and exit status,
the sandbox behind ``make run``, Ctrl-C (once, twice) through what ``make run``
execs, the admin listener, and that nothing it prints carries a credential."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET

from tests.support.helpers import (
    ORG,
    TOKEN,
    ProxyProcess,
    Recorder,
    basic,
    call,
    env_for,
    free_port,
    listen,
    sleep,
    spawn_proxy,
    upstream_site,
    wait_healthy,
)


class _Delayed(Recorder):
    def render(self, request: Any) -> Any:
        super().render(request)

        def answer() -> None:
            request.write(b"y" * 200000)
            request.finish()

        reactor.callLater(1.5, answer)
        return NOT_DONE_YET


class ProcessTests(TestCase):
    timeout = 90

    async def test_sigterm_drains_and_exits_zero_without_leaking_secrets(self) -> None:
        up = _Delayed()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            SHUTDOWN_DELAY_SECONDS="0.5",
            SHUTDOWN_GRACE_SECONDS="10",
            LOG_LEVEL="debug",
        )
        proc = await spawn_proxy(env)
        slow = Deferred.fromCoroutine(
            call(
                proc.url + "/loki/api/v1/query_range?query=x",
                headers={
                    b"Authorization": [b"Basic " + base64.b64encode(b"someone:client-password")]
                },
            )
        )
        await sleep(0.3)
        proc.signal("TERM")
        await sleep(0.1)
        ready, body = await call(proc.url + "/ready")
        self.assertEqual((ready.code, json.loads(body)), (503, {"status": "draining"}))
        response, data = await slow
        self.assertEqual((response.code, len(data)), (200, 200000))
        code = await proc.ended
        self.assertEqual(code, 0, proc.output.decode())
        out = proc.output.decode()
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        self.assertTrue(any(x.get("msg") == "request" and x.get("status") == 200 for x in lines))
        for secret in (
            TOKEN,
            basic(ORG["loki"]).decode(),
            base64.b64encode(b"someone:client-password").decode(),
            "client-password",
        ):
            self.assertNotIn(secret, out)
        self.assertEqual(up.seen[-1].header(b"authorization"), [basic(ORG["loki"])])

    async def test_sandbox_shows_what_would_be_sent(self) -> None:
        proc = await spawn_proxy({"SHUTDOWN_DELAY_SECONDS": "0"}, "--sandbox")
        self.addCleanup(lambda: proc.ended)
        self.addCleanup(proc.signal, "TERM")
        response, body = await call(proc.url + "/prometheus/api/v1/query?query=up")
        echo = json.loads(body)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            (echo["method"], echo["path"], echo["query"]),
            ("GET", "/api/prom/api/v1/query", "query=up"),
        )
        self.assertEqual(echo["headers"]["Authorization"], ["Basic sandbox-prometheus:***"])
        self.assertEqual(echo["headers"]["X-Scope-Orgid"], ["sandbox-prometheus"])
        response, body = await call(proc.url + "/api/prom/push", method=b"POST", body=b"\x00" * 100)
        self.assertEqual(json.loads(body)["body_bytes"], 100)
        response, body = await call(
            proc.url + "/otlp/v1/traces",
            method=b"POST",
            headers={b"Content-Type": [b"application/json"]},
            body=b'{"resourceSpans":[]}',
        )
        echo = json.loads(body)
        self.assertEqual(
            (echo["path"], echo["headers"]["Authorization"]),
            ("/otlp/v1/traces", ["Basic sandbox-otlp:***"]),
        )
        self.assertIn("SANDBOX", proc.output.decode())

    async def test_port_in_use_one_line_exit_1(self) -> None:
        import socket

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        proc = await spawn_proxy(
            {}, "--sandbox", "--listen", f"tcp:{port}:interface=127.0.0.1", wait=False
        )
        code = await proc.ended
        out = proc.output.decode()
        self.assertEqual(code, 1, out)
        self.assertIn(f"lgmt-proxy: cannot listen on 127.0.0.1:{port}: Address already in use", out)
        self.assertNotIn("Traceback", out)

    async def test_admin_listener(self) -> None:
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        admin = free_port()
        proc = await spawn_proxy(
            env_for(f"http://127.0.0.1:{port.getHost().port}", SHUTDOWN_DELAY_SECONDS="0"),
            "--admin-listen",
            f"tcp:{admin}:interface=127.0.0.1",
        )
        self.addCleanup(lambda: proc.ended)
        self.addCleanup(proc.signal, "TERM")
        await call(proc.url + "/loki/x")
        response, body = await call(f"http://127.0.0.1:{admin}/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b'proxy_requests_total{method="GET",status="200",upstream="loki"} 1.0', body)
        response, _ = await call(f"http://127.0.0.1:{admin}/ready")
        self.assertEqual(response.code, 200)
        response, _ = await call(f"http://127.0.0.1:{admin}/loki/x")
        self.assertEqual(response.code, 404)
        self.assertEqual(len(up.seen), 1)


ROOT = Path(__file__).resolve().parents[2]


class _HalfSent(Protocol):
    """A POST whose body never completes: keeps its connection busy."""

    def connectionMade(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\nabc"
        )


class MakeRunTests(TestCase):
    """What ``make run`` execs (``python -m lgmt_proxy.sandbox``, which execs
    twistd in the same process), stopped as a terminal's Ctrl-C stops it. A
    stop signal that twistd re-raised would make make print
    ``make: *** [Makefile:NNN: run] Interrupt`` after the proxy's "stopped"."""

    timeout = 60

    async def launch(self, env: dict[str, str]) -> ProxyProcess:
        proc = ProxyProcess()
        proc.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "lgmt_proxy.sandbox",
            f"--listen=tcp:{proc.port}:interface=127.0.0.1",
            "--",
        ]
        proc.start(
            argv,
            {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **env},
            cwd=str(ROOT),
        )
        self.addCleanup(proc.stop)
        await wait_healthy(proc)
        return proc

    def lines(self, proc: ProxyProcess) -> list[str]:
        return [line for line in proc.output.decode().splitlines() if line.strip()]

    def assert_quiet_stop(self, proc: ProxyProcess) -> None:
        """Exit 0, "stopped" the last line, nothing at error level or above."""
        out = proc.output.decode()
        self.assertEqual(proc.code, 0, out)
        events = [json.loads(line) for line in self.lines(proc) if line.startswith("{")]
        self.assertEqual(events[-1]["msg"], "stopped", out)
        self.assertEqual([e for e in events if e["level"] in ("error", "critical")], [])
        self.assertNotIn("Traceback", out)

    async def test_ctrl_c_drains_at_once_and_exits_zero(self) -> None:
        proc = await self.launch({})
        first, command = self.lines(proc)[:2]
        self.assertEqual(
            first,
            "make run: no .env, no GRAFANA_CLOUD_* or ROUTES_FILE set: starting the sandbox "
            "(a built-in echo upstream; nothing leaves this machine)",
        )
        self.assertRegex(
            command,
            rf"^make run: \S*twistd -n --pidfile= lgmt-proxy --listen "
            rf"tcp:{proc.port}:interface=127.0.0.1 --sandbox$",
        )
        self.assertIn(f'"msg":"listening on http://127.0.0.1:{proc.port}"', proc.output.decode())
        _, body = await call(proc.url + "/loki/api/v1/labels")
        self.assertEqual(json.loads(body)["headers"]["Authorization"], ["Basic sandbox-loki:***"])
        proc.signal("INT")
        await proc.ended
        self.assert_quiet_stop(proc)
        # The sandbox's own drain: no delay before the listener closes.
        self.assertIn("closing the listener in 0.0s", proc.output.decode())

    async def test_second_ctrl_c_cuts_the_drain(self) -> None:
        proc = await self.launch({"SHUTDOWN_GRACE_SECONDS": "60"})
        busy = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proc.port), _HalfSent()
        )
        self.addCleanup(busy.transport.abortConnection)  # type: ignore[union-attr]
        for _ in range(100):  # until the proxy has the request in flight
            _, metrics = await call(proc.url + "/metrics")
            if b'proxy_requests_in_flight{upstream="prometheus"} 1.0' in metrics:
                break
            await sleep(0.05)
        else:
            self.fail("the half-sent POST never showed as in flight")
        proc.signal("INT")
        await sleep(1.0)
        # Waiting for the busy connection (up to the 60 s grace).
        self.assertIsNone(proc.code, proc.output.decode())
        self.assertIn("SIGINT: stopping; a second SIGINT or SIGTERM stops", proc.output.decode())
        proc.signal("INT")
        self.assertTrue(await proc.wait(20), "still running 20 s after the second SIGINT")
        self.assert_quiet_stop(proc)
        out = proc.output.decode()
        self.assertIn("SIGINT again: stopping at once", out)
        self.assertIn("drain cut short: 1 open connections cut", out)

    async def test_routes_file_runs_with_the_environment_not_the_sandbox(self) -> None:
        """ROUTES_FILE without a Grafana token: the route table is used (here
        a missing one, so the proxy's own error names it), never a sandbox
        that silently answers 404 on its routes."""
        proc = await self.launch({"ROUTES_FILE": "/nonexistent/routes.yaml"})
        code = await proc.ended
        out = proc.output.decode()
        self.assertEqual(code, 2, out)
        self.assertEqual(
            self.lines(proc)[0],
            "make run: configuration from the environment: ROUTES_FILE is set",
        )
        self.assertIn("lgmt-proxy: configuration error: ROUTES_FILE", out)
        self.assertNotIn("SANDBOX", out)
