"""The proxy on real loopback sockets: routes, headers, bodies, failures."""

from __future__ import annotations

import gzip
import json
import socket
from typing import Any

import attrs
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from tests.support.helpers import (
    ORG,
    TOKEN,
    ProxyFixture,
    RawClient,
    Recorder,
    basic,
    call,
    env_for,
    listen,
    raw_connect,
    raw_request,
    sleep,
    status_of,
    upstream_site,
)


class _Base(TestCase):
    timeout = 60

    def start(
        self, recorder: Recorder | None = None, **extra: str
    ) -> tuple[ProxyFixture, Recorder]:
        recorder = recorder or Recorder()
        port = listen(upstream_site(recorder))
        self.addCleanup(port.stopListening)
        fixture = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}", **extra))
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        return fixture, recorder


class RouteTests(_Base):
    async def test_each_route_with_injected_credentials(self) -> None:
        proxy, up = self.start()
        cases = [
            ("/api/prom/push", b"/api/prom/push", "prometheus"),
            (
                "/prometheus/api/v1/query?query=up&time=1",
                b"/api/prom/api/v1/query?query=up&time=1",
                "prometheus",
            ),
            (
                "/loki/api/v1/query_range?query=%7Bjob%3D%22x%22%7D",
                b"/loki/api/v1/query_range?query=%7Bjob%3D%22x%22%7D",
                "loki",
            ),
            ("/tempo/api/search?tags=a%3Db", b"/tempo/api/search?tags=a%3Db", "tempo"),
            ("/otlp/v1/traces", b"/otlp/v1/traces", "otlp"),
            ("/pyroscope/ingest?name=app.cpu&from=1", b"/ingest?name=app.cpu&from=1", "profiles"),
            (
                "/pyroscope/querier.v1.QuerierService/SelectMergeStacktraces",
                b"/querier.v1.QuerierService/SelectMergeStacktraces",
                "profiles",
            ),
        ]
        for path, upstream_uri, signal in cases:
            response, body = await call(
                proxy.url + path,
                headers={b"Authorization": [b"Bearer client-token"], b"X-Scope-OrgID": [b"other"]},
            )
            self.assertEqual(response.code, 200)
            self.assertEqual(body, b'{"status":"success"}')
            seen = up.seen[-1]
            self.assertEqual(seen.uri, upstream_uri)
            self.assertEqual(seen.header(b"authorization"), [basic(ORG[signal])])
            self.assertEqual(seen.header(b"x-scope-orgid"), [ORG[signal].encode()])
            self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
            host = seen.header(b"host")
            assert host is not None
            self.assertTrue(host[0].startswith(b"127.0.0.1:"))
        self.assertEqual(len(up.seen), len(cases))

    async def test_tenant_id(self) -> None:
        proxy, up = self.start(GRAFANA_CLOUD_LOKI_TENANT_ID="tenant-7")
        await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(up.seen[-1].header(b"x-scope-orgid"), [b"tenant-7"])
        self.assertEqual(up.seen[-1].header(b"authorization"), [basic(ORG["loki"])])

    async def test_every_method(self) -> None:
        proxy, up = self.start()
        for method in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"):
            body = b"x=1" if method in (b"POST", b"PUT", b"PATCH") else None
            response, _ = await call(proxy.url + "/loki/api/v1/x", method=method, body=body)
            self.assertEqual(response.code, 200, method)
            self.assertEqual(up.seen[-1].method, method)
            if body:
                self.assertEqual(up.seen[-1].body, body)

    async def test_unknown_path_404_nothing_upstream(self) -> None:
        proxy, up = self.start()
        for path in ("/lokix/a", "/", "/api", "/api/promx", "/admin", "/x/loki"):
            response, body = await call(proxy.url + path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertEqual(json.loads(body)["upstream"], "none")
        self.assertEqual(up.seen, [])

    async def test_signal_off_404_says_so(self) -> None:
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        env = {
            "GRAFANA_CLOUD_ACCESS_TOKEN": TOKEN,
            "GRAFANA_CLOUD_LOKI_URL": f"http://127.0.0.1:{port.getHost().port}",
            "GRAFANA_CLOUD_LOKI_ORG_ID": "1",
        }
        proxy = ProxyFixture(env)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, body = await call(proxy.url + "/tempo/api/search")
        self.assertEqual(response.code, 404)
        err = json.loads(body)
        self.assertEqual(err["upstream"], "tempo")
        self.assertIn("not configured", err["error"])
        self.assertEqual(up.seen, [])

    async def test_health(self) -> None:
        proxy, _ = self.start()
        response, body = await call(proxy.url + "/health")
        self.assertEqual((response.code, body), (200, b'{"status":"ok"}\n'))


class ResponseTests(_Base):
    async def test_status_headers_body_unchanged(self) -> None:
        proxy, up = self.start()
        up.status = 429
        up.headers = [
            (b"Retry-After", b"17"),
            (b"X-Custom", b"a"),
            (b"X-Custom", b"b"),
            (b"Content-Type", b"text/plain"),
        ]
        up.body = b"slow down"
        response, body = await call(proxy.url + "/prometheus/api/v1/query")
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"17"])
        self.assertEqual(response.headers.getRawHeaders(b"x-custom"), [b"a", b"b"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(body, b"slow down")

    async def test_errors_passed_through(self) -> None:
        proxy, up = self.start()
        for status in (400, 401, 403, 404, 500, 503):
            up.status = status
            up.body = b'{"status":"error","error":"e%d"}' % status
            response, body = await call(proxy.url + "/loki/api/v1/push", method=b"POST", body=b"{}")
            self.assertEqual((response.code, body), (status, up.body))

    async def test_content_length_kept(self) -> None:
        proxy, _ = self.start()
        raw = await raw_request(
            proxy.port.getHost().port,
            b"GET /loki/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        )
        head = raw.split(b"\r\n\r\n")[0].lower()
        self.assertIn(b"content-length: 20", head)
        self.assertNotIn(b"transfer-encoding", head)

    async def test_no_body_statuses_and_head(self) -> None:
        proxy, up = self.start()
        port = proxy.port.getHost().port
        for status in (204, 304):
            up.status = status
            up.body = b""
            raw = await raw_request(
                port, b"GET /loki/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
            )
            self.assertEqual(status_of(raw), status)
            self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)
            self.assertNotIn(b"transfer-encoding", raw.lower())
        up.status = 200
        up.body = b"0123456789"
        raw = await raw_request(
            port, b"HEAD /loki/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status_of(raw), 200)
        self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)

    async def test_redirect_returned_not_followed(self) -> None:
        proxy, up = self.start()
        up.status = 302
        up.headers = [(b"Location", b"http://127.0.0.1:1/elsewhere")]
        up.body = b""
        response, _ = await call(proxy.url + "/tempo/api/traces/abc")
        self.assertEqual(response.code, 302)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"), [b"http://127.0.0.1:1/elsewhere"]
        )
        self.assertEqual(len(up.seen), 1)

    async def test_gzip_untouched_and_no_accept_encoding_added(self) -> None:
        proxy, up = self.start()
        payload = gzip.compress(b'{"data":"' + b"x" * 5000 + b'"}')
        up.headers = [(b"Content-Encoding", b"gzip"), (b"Content-Type", b"application/json")]
        up.body = payload
        response, body = await call(proxy.url + "/prometheus/api/v1/query")
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(body, payload)
        self.assertIsNone(up.seen[-1].header(b"accept-encoding"))
        gz = gzip.compress(b"request-body")
        await call(
            proxy.url + "/otlp/v1/logs",
            method=b"POST",
            headers={b"Content-Encoding": [b"gzip"]},
            body=gz,
        )
        self.assertEqual(up.seen[-1].body, gz)
        self.assertEqual(up.seen[-1].header(b"content-encoding"), [b"gzip"])

    async def test_cookies_never_carried_between_clients(self) -> None:
        proxy, up = self.start()
        up.headers = [(b"Set-Cookie", b"session=client-a-secret; Path=/")]
        response, _ = await call(proxy.url + "/loki/a")
        self.assertEqual(
            response.headers.getRawHeaders(b"set-cookie"), [b"session=client-a-secret; Path=/"]
        )
        up.headers = []
        await call(proxy.url + "/loki/b")
        self.assertIsNone(up.seen[-1].header(b"cookie"))


class RequestBodyTests(_Base):
    async def test_chunked_request_body(self) -> None:
        proxy, up = self.start()
        raw = await raw_request(
            proxy.port.getHost().port,
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        self.assertEqual(status_of(raw), 200)
        self.assertEqual(up.seen[-1].body, b"hello world")

    async def test_expect_continue(self) -> None:
        proxy, up = self.start()
        client = await raw_connect(proxy.port.getHost().port)
        client.transport.write(
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        for _ in range(100):
            if client.data:
                break
            await sleep(0.02)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), client.data)
        client.transport.write(b"abcde")
        raw = await client.closed
        self.assertEqual(status_of(raw.split(b"\r\n\r\n", 1)[1]), 200)
        self.assertEqual(up.seen[-1].body, b"abcde")
        self.assertIsNone(up.seen[-1].header(b"expect"))

    async def test_body_over_limit_413(self) -> None:
        proxy, up = self.start(MAX_REQUEST_BODY_BYTES="1000")
        response, body = await call(proxy.url + "/api/prom/push", method=b"POST", body=b"x" * 1001)
        self.assertEqual(response.code, 413)
        self.assertEqual(json.loads(body)["upstream"], "prometheus")
        self.assertEqual(up.seen, [])
        response, _ = await call(proxy.url + "/api/prom/push", method=b"POST", body=b"x" * 1000)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="prometheus", reason="body_limit"),
            1,
        )


class _Silent(protocol.Protocol):
    """An upstream that reads and never answers: its factory's ``received``
    fires at the first bytes of a request, ``lost`` when the connection goes."""

    def dataReceived(self, data: bytes) -> None:
        if not self.factory.received.called:  # type: ignore[attr-defined]
            self.factory.received.callback(data)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.callback(None)  # type: ignore[attr-defined]


def _silent_upstream(case: TestCase) -> tuple[protocol.Factory, int]:
    factory = protocol.Factory.forProtocol(_Silent)
    factory.received = Deferred()  # type: ignore[attr-defined]
    factory.lost = Deferred()  # type: ignore[attr-defined]
    port = listen(factory)
    case.addCleanup(port.stopListening)
    return factory, port.getHost().port


@implementer(IHostResolution)
@attrs.define
class _Lookup:
    name: str

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
@attrs.define
class _NoInvalidNames:
    """The reactor's name resolver, but a name under ``.invalid`` (which no
    DNS may answer, RFC 6761) fails here at once: no lookup leaves the machine."""

    system: IHostnameResolver

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        if not hostName.rstrip(".").endswith(".invalid"):
            return self.system.resolveHostName(
                resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
            )
        resolution = _Lookup(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolutionReceiver.resolutionComplete()  # no addresses: DNSLookupError
        return resolution


class _Cutter(protocol.Protocol):
    """Answers with a promised length, sends part of it, then closes or stalls."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not getattr(self, "done", False):
            self.done = True
            f = self.factory
            self.transport.write(f.head + f.partial)  # type: ignore[attr-defined]
            if f.close:  # type: ignore[attr-defined]
                self.transport.loseConnection()


class FailureTests(_Base):
    async def test_connection_refused_502(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port}"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, body = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 502)
        err = json.loads(body)
        self.assertEqual(err["upstream"], "loki")
        self.assertNotIn(TOKEN, body.decode())
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="connect"), 1
        )

    async def test_dns_failure_502(self) -> None:
        previous = reactor.nameResolver  # type: ignore[attr-defined]
        reactor.installNameResolver(_NoInvalidNames(previous))  # type: ignore[attr-defined]
        self.addCleanup(reactor.installNameResolver, previous)  # type: ignore[attr-defined]
        proxy = ProxyFixture(
            env_for("http://no-such-host.invalid:80", ALLOW_INSECURE_UPSTREAM="true")
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, body = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "upstream host name did not resolve")
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="connect"), 1
        )

    async def test_no_headers_in_time_504(self) -> None:
        # When the timer fires is checked on a fake clock (test_memory); here,
        # on real sockets, the order: the request reached the upstream, the
        # client got the timeout's 504, and the upstream connection was dropped.
        upstream, port = _silent_upstream(self)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port}", UPSTREAM_TIMEOUT_SECONDS="0.5"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, body = await call(proxy.url + "/tempo/api/search")
        self.assertTrue(upstream.received.called)  # type: ignore[attr-defined]
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(body)["error"], "upstream did not answer in time")
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="tempo", reason="timeout"), 1
        )
        await upstream.lost  # type: ignore[attr-defined]

    async def test_connect_timeout_504(self) -> None:
        # A listener whose accept queue is full: the kernel drops further SYNs,
        # so connecting hangs like a black-holed host.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        self.addCleanup(s.close)
        fillers = []
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(s.getsockname())
            fillers.append(c)
        self.addCleanup(lambda: [c.close() for c in fillers])
        proxy = ProxyFixture(
            env_for(
                f"http://127.0.0.1:{s.getsockname()[1]}", UPSTREAM_CONNECT_TIMEOUT_SECONDS="0.5"
            )
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, _ = await call(proxy.url + "/otlp/v1/traces", method=b"POST", body=b"{}")
        self.assertEqual(response.code, 504)

    async def _cut(self, head: bytes, partial: bytes, close: bool, **env: str) -> RawClient:
        """A client's GET answered by an upstream that sends ``head`` and
        ``partial``, then closes (or stalls); the client once the proxy has
        hung up on it (the test's own timeout bounds the wait)."""
        factory = protocol.Factory.forProtocol(_Cutter)
        factory.head, factory.partial, factory.close = head, partial, close  # type: ignore[attr-defined]
        port = listen(factory)
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}", **env))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        self.proxy = proxy
        client = await raw_connect(proxy.port.getHost().port)
        client.transport.write(b"GET /loki/x HTTP/1.1\r\nHost: p\r\n\r\n")
        await client.closed
        return client

    def assert_reset(self, client: RawClient) -> None:
        """The proxy cut the connection (RST), not closed it as if the
        response were whole (FIN): a client reading to EOF is not fooled."""
        assert client.reason is not None
        how = client.reason.type.__name__
        self.assertFalse(client.reason.check(ConnectionDone), f"closed cleanly ({how}), not cut")
        self.assertTrue(client.reason.check(ConnectionLost), f"closed by {how}, not a reset")

    async def test_cut_body_with_length_aborts_client(self) -> None:
        client = await self._cut(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 100, close=True
        )
        self.assert_reset(client)
        # What was already relayed may or may not arrive before the reset; what
        # does is what the upstream sent, nothing added.
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        if head:
            self.assertEqual(status_of(head), 200, head)
            self.assertIn(b"Content-Length: 1000", head)
        self.assertTrue((b"x" * 100).startswith(body), body)
        self.assertEqual(
            self.proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="reset"), 1
        )

    async def test_cut_chunked_body_never_looks_complete(self) -> None:
        client = await self._cut(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", close=True
        )
        self.assert_reset(client)
        self.assertFalse(client.data.endswith(b"0\r\n\r\n"), client.data)
        self.assertEqual(
            self.proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="reset"), 1
        )

    async def test_stalled_body_aborts_client(self) -> None:
        # The upstream keeps its connection open: only the proxy's timeout can
        # end this exchange (when, is checked on a fake clock in test_memory).
        client = await self._cut(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
            b"x" * 10,
            close=False,
            UPSTREAM_TIMEOUT_SECONDS="0.5",
        )
        self.assert_reset(client)
        self.assertTrue((b"x" * 10).startswith(bytes(client.data).partition(b"\r\n\r\n")[2]))
        self.assertEqual(
            self.proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="timeout"), 1
        )

    async def test_client_abort_cancels_upstream(self) -> None:
        upstream, port = _silent_upstream(self)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port}"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        client = await raw_connect(proxy.port.getHost().port)
        client.transport.write(b"GET /prometheus/api/v1/query?query=up HTTP/1.1\r\nHost: p\r\n\r\n")
        await upstream.received  # type: ignore[attr-defined]
        self.assertFalse(upstream.lost.called)  # type: ignore[attr-defined]
        client.transport.abortConnection()
        # The upstream call is dropped because the client went: nothing else
        # would end it (no upstream timeout fires within the test's time).
        await upstream.lost  # type: ignore[attr-defined]
        await client.closed
        for _ in range(100):  # the request is counted once its connection is gone
            if proxy.sample(
                "proxy_requests_total", upstream="prometheus", method="GET", status="499"
            ):
                break
            await sleep(0.01)
        self.assertEqual(
            proxy.sample(
                "proxy_upstream_errors_total", upstream="prometheus", reason="client_abort"
            ),
            1,
        )
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="prometheus", method="GET", status="499"),
            1,
        )


class _Slow(Recorder):
    """Answers after a delay; tracks how many requests it held at once."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.now = 0
        self.peak = 0

    def render(self, request: Any) -> Any:
        self.now += 1
        self.peak = max(self.peak, self.now)

        def answer() -> None:
            self.now -= 1
            request.write(b"done")
            request.finish()

        reactor.callLater(self.delay, answer)
        return NOT_DONE_YET


class ConcurrencyTests(_Base):
    async def test_200_slow_requests_served_together(self) -> None:
        slow = _Slow(3.0)
        proxy, _ = self.start(slow)
        from twisted.internet.defer import gatherResults

        results = await gatherResults(
            [
                Deferred.fromCoroutine(call(proxy.url + f"/loki/api/v1/query?i={i}"))
                for i in range(200)
            ]
        )
        self.assertEqual([body for _, body in results], [b"done"] * 200)
        self.assertEqual(slow.peak, 200)


class _Peers(Recorder):
    """Records which upstream connection (client port) carried each request."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []

    def render(self, request: Any) -> bytes:
        self.ports.append(request.getClientAddress().port)
        return super().render(request)


class PoolTests(_Base):
    async def test_connections_reused_most_recent_first(self) -> None:
        up = _Peers()
        proxy, _ = self.start(up)
        from twisted.internet.defer import gatherResults

        # A burst opens several upstream connections...
        await gatherResults(
            [Deferred.fromCoroutine(call(proxy.url + f"/loki/b{i}")) for i in range(6)]
        )
        burst = set(up.ports)
        self.assertGreater(len(burst), 1)
        del up.ports[:]
        # ...then one client asking in turn keeps to one of them, none new.
        for i in range(8):
            await call(proxy.url + f"/loki/s{i}")
        self.assertEqual(len(set(up.ports)), 1, up.ports)
        self.assertLessEqual(set(up.ports), burst)
