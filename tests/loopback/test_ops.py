"""Operations: /metrics after real requests, /ready and the graceful drain,
the access log, and the admin listener."""

from __future__ import annotations

import io
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET

from lgmt_proxy.config.settings import parse_config
from lgmt_proxy.service import ProxyService
from tests.support.helpers import (
    TOKEN,
    ProxyFixture,
    Recorder,
    call,
    env_for,
    free_port,
    listen,
    raw_connect,
    raw_request,
    sleep,
    status_of,
    upstream_site,
)


class _Delayed(Recorder):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def render(self, request: Any) -> Any:
        def answer() -> None:
            request.write(b"x" * 100000)
            request.finish()

        reactor.callLater(self.delay, answer)
        return NOT_DONE_YET


class MetricsTests(TestCase):
    timeout = 30

    async def test_metrics_after_requests(self) -> None:
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(
            env_for(f"http://127.0.0.1:{port.getHost().port}", MAX_REQUEST_BODY_BYTES="10")
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        await call(proxy.url + "/prometheus/api/v1/query?query=up")
        await call(proxy.url + "/prometheus/api/v1/query?query=up")
        await call(proxy.url + "/loki/api/v1/push", method=b"POST", body=b"0123456789")
        await call(proxy.url + "/loki/api/v1/push", method=b"POST", body=b"01234567890")  # 413
        await call(proxy.url + "/nowhere")
        await call(proxy.url + "/tempo/x", method=b"PROPFIND")
        await call(proxy.url + "/health")
        await call(proxy.url + "/ready")
        s = proxy.sample
        self.assertEqual(
            s("proxy_requests_total", upstream="prometheus", method="GET", status="200"), 2
        )
        self.assertEqual(s("proxy_requests_total", upstream="loki", method="POST", status="200"), 1)
        self.assertEqual(s("proxy_requests_total", upstream="loki", method="POST", status="413"), 1)
        # Only proxy routes are counted, as in the service we replace.
        self.assertEqual(s("proxy_requests_total", upstream="none", method="GET", status="404"), 0)
        self.assertEqual(
            s("proxy_request_duration_seconds_count", upstream="none", method="GET"), 0
        )
        # What the upstream answered, apart from the proxy's own refusals.
        self.assertEqual(s("proxy_upstream_responses_total", upstream="loki", status="200"), 1)
        self.assertEqual(s("proxy_upstream_responses_total", upstream="loki", status="413"), 0)
        # Methods outside the seven are refused (405), counted as "other".
        self.assertEqual(
            s("proxy_requests_total", upstream="tempo", method="other", status="405"), 1
        )
        self.assertEqual(s("proxy_upstream_errors_total", upstream="loki", reason="body_limit"), 1)
        self.assertEqual(
            s("proxy_request_duration_seconds_count", upstream="prometheus", method="GET"), 2
        )
        # The 413's body (11 bytes, declared over the limit) is answered before
        # it is read and dropped after: never counted as received.
        self.assertEqual(s("proxy_request_body_bytes_total", upstream="loki"), 10)
        self.assertEqual(
            s("proxy_response_body_bytes_total", upstream="prometheus"), 2 * len(up.body)
        )
        self.assertEqual(s("proxy_requests_in_flight", upstream="prometheus"), 0)

        response, body = await call(proxy.url + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        )
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        samples = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for f in families.values()
            for x in f.samples
        }
        key = (
            "proxy_requests_total",
            (("method", "GET"), ("status", "200"), ("upstream", "prometheus")),
        )
        self.assertEqual(samples[key], 2)
        self.assertFalse([name for name, _ in samples if name.endswith("_created")])
        build = [labels for name, labels in samples if name == "lgmt_proxy_build_info"]
        self.assertEqual([dict(b).keys() for b in build], [{"version", "python", "twisted"}])
        buckets = sorted(
            float(x.labels["le"])
            for x in families["proxy_request_duration_seconds"].samples
            if x.name.endswith("_bucket") and x.labels["upstream"] == "prometheus"
        )
        self.assertEqual(buckets, [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")])
        self.assertNotIn(TOKEN, body.decode())

    async def test_in_flight_while_streaming(self) -> None:
        up = _Delayed(0.5)
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        d = Deferred.fromCoroutine(call(proxy.url + "/otlp/v1/metrics", method=b"POST", body=b"{}"))
        await sleep(0.2)
        self.assertEqual(proxy.sample("proxy_requests_in_flight", upstream="otlp"), 1)
        await d
        self.assertEqual(proxy.sample("proxy_requests_in_flight", upstream="otlp"), 0)
        self.assertGreaterEqual(
            proxy.sample("proxy_request_duration_seconds_sum", upstream="otlp", method="POST"), 0.45
        )


class ServiceTests(TestCase):
    """The whole service in-process: logs, readiness, drain."""

    timeout = 60

    def service(self, upstream: Recorder, **extra: str) -> tuple[ProxyService, io.StringIO, str]:
        port = listen(upstream_site(upstream))
        self.addCleanup(port.stopListening)
        env = env_for(f"http://127.0.0.1:{port.getHost().port}", **extra)
        config = parse_config(env)
        assert config.token is not None
        out = io.StringIO()
        listen_port = free_port()
        svc = ProxyService(
            config,
            reactor,
            token=config.token,
            listen=f"tcp:{listen_port}:interface=127.0.0.1",
            stdout=out,
            handle_sigterm=False,
        )
        # twistd installs this observer through the Application component.
        globalLogPublisher.addObserver(svc.log_observer)
        self.addCleanup(globalLogPublisher.removeObserver, svc.log_observer)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc, out, f"http://127.0.0.1:{listen_port}"

    async def test_access_log_json_without_secrets(self) -> None:
        _svc, out, url = self.service(Recorder())
        await call(
            url + "/loki/api/v1/query?query=x",
            headers={
                b"Authorization": [b"Bearer client-bearer-secret"],
                b"User-Agent": [b"test-agent/1"],
                b"X-Request-Id": [b"req-123"],
            },
        )
        await sleep(0.05)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        access = [x for x in lines if x.get("msg") == "request"]
        self.assertEqual(len(access), 1)
        a = access[0]
        for field in (
            "time",
            "method",
            "path",
            "upstream",
            "status",
            "duration",
            "bytes_in",
            "bytes_out",
            "client",
            "user_agent",
            "request_id",
        ):
            self.assertIn(field, a)
        self.assertEqual(
            (
                a["method"],
                a["path"],
                a["upstream"],
                a["status"],
                a["client"],
                a["user_agent"],
                a["request_id"],
            ),
            ("GET", "/loki/api/v1/query", "loki", 200, "127.0.0.1", "test-agent/1", "req-123"),
        )
        startup = [x["msg"] for x in lines if x.get("logger") == "lgmt_proxy"]
        self.assertTrue(any("signal loki on" in m for m in startup), startup)
        raw = await raw_request(
            int(url.rsplit(":", 1)[1]), b"GET http://evil.example/ HTTP/1.1\r\n\r\n"
        )
        self.assertEqual(status_of(raw), 400)
        raw = await raw_request(int(url.rsplit(":", 1)[1]), b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n")
        self.assertEqual(status_of(raw), 400)
        await sleep(0.05)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        refused = [x for x in lines if x.get("msg") == "request" and x["status"] == 400]
        self.assertEqual(len(refused), 2, refused)
        self.assertEqual(refused[1]["error"], "obsolete line folding is not accepted")
        text = out.getvalue()
        self.assertNotIn(TOKEN, text)
        self.assertNotIn("client-bearer-secret", text)
        self.assertNotIn("Basic ", text)

    async def test_access_log_of_refusals_names_request_and_bytes(self) -> None:
        """Issue 20 item 10: bytes_out is the JSON body each answer carried,
        and method and path are logged whenever the request line was read
        (cut to a bound for a 414), never for a line that was not."""
        _svc, out, url = self.service(Recorder())
        port = int(url.rsplit(":", 1)[1])
        cases = [
            (b"GET /nowhere HTTP/1.1\r\nHost: p\r\n\r\n", 404),
            (b"TRACE /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n", 405),
            (b"GET /loki/" + b"a" * 9000 + b"?q=1 HTTP/1.1\r\nHost: p\r\n\r\n", 414),
            (b"POST /api/prom/push HTTP/1.1\r\nX-Big: " + b"v" * 20000 + b"\r\n\r\n", 431),
            (b"GET /x HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),
        ]
        sent = {}
        for raw, status in cases:
            answer = await raw_request(port, raw)
            self.assertEqual(status_of(answer), status, answer[:200])
            sent[status] = len(answer.partition(b"\r\n\r\n")[2])
        await sleep(0.05)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        logged = {x["status"]: x for x in lines if x.get("msg") == "request"}
        for status, length in sent.items():
            self.assertGreater(length, 0, status)
            self.assertEqual(logged[status]["bytes_out"], length, status)
        self.assertEqual(
            (logged[405]["method"], logged[405]["path"]), ("TRACE", "/loki/api/v1/labels")
        )
        self.assertEqual(logged[414]["method"], "GET")
        self.assertEqual(logged[414]["path"], "/loki/" + "a" * (512 - 6))
        self.assertEqual((logged[431]["method"], logged[431]["path"]), ("POST", "/api/prom/push"))
        # The folded header broke a head whose request line was read.
        self.assertEqual((logged[400]["method"], logged[400]["path"]), ("GET", "/x"))

    async def test_drain(self) -> None:
        up = _Delayed(1.0)
        svc, out, url = self.service(up, SHUTDOWN_DELAY_SECONDS="0.5", SHUTDOWN_GRACE_SECONDS="5")
        port = int(url.rsplit(":", 1)[1])
        # an idle keep-alive connection, which the drain must close
        idle = await raw_connect(port)
        idle.transport.write(b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n")
        slow = Deferred.fromCoroutine(call(url + "/prometheus/api/v1/query_range"))
        await sleep(0.2)
        stopped = svc.stopService()
        raw = await raw_request(
            port, b"GET /ready HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status_of(raw), 503)
        self.assertIn(b'{"status":"draining"}', raw)
        await sleep(0.5)
        with self.assertRaises(ConnectionRefusedError):
            await call(url + "/health")
        response, body = await slow
        self.assertEqual((response.code, len(body)), (200, 100000))
        await stopped
        await idle.closed
        self.assertEqual(svc.proxy_factory.connections, set())
        self.assertIn('"msg":"stopped"', out.getvalue())
