"""The real ``twistd -n lgmt-proxy`` process: SIGTERM drain and exit status,
the sandbox behind ``make run``, the admin listener, and that nothing it prints
carries a credential."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET

from tests.support.helpers import (
    ORG,
    TOKEN,
    Recorder,
    basic,
    call,
    env_for,
    free_port,
    listen,
    sleep,
    spawn_proxy,
    upstream_site,
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
