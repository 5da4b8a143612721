"""Compressed egress (UPSTREAM_COMPRESSION) on real sockets: OTLP JSON and
protobuf bodies and a Loki JSON push arrive upstream gzip'd, chunked, and
decompress byte-identical, with the credentials; remote write, a Loki
protobuf push, a body already gzip'd and queries arrive untouched; the
metrics show the bytes before and after; the gRPC bridge compresses the same
way. ``BigBodyTests``: 32 MiB through a real ``twistd`` to an upstream that
stops reading, then reads slowly: the client is held back and the proxy's
memory stays flat."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import zlib
from typing import Any

import httptools
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from lgmt_proxy.dataplane.grpc_server import GrpcFactory
from lgmt_proxy.service import ProxyService
from lgmt_proxy.tap import load
from tests.loopback.test_grpc import METRICS, TRACES, h2_connect
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    call,
    env_for,
    free_port,
    listen,
    raw_connect,
    sleep,
    spawn_proxy,
    upstream_site,
)
from tests.support.otlp_bodies import loki_json, otlp_json, otlp_protobuf

MiB = 1024 * 1024
JSON = b"application/json"
PROTOBUF = b"application/x-protobuf"


class CompressedEgressTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.up = Recorder()
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"

    def start_proxy(self, **env: str) -> ProxyFixture:
        proxy = ProxyFixture(env_for(self.upstream_url, **env))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        return proxy

    async def post(
        self, proxy: ProxyFixture, path: str, body: bytes, content_type: bytes, **more: bytes
    ) -> Any:
        headers = {b"Content-Type": [content_type]}
        headers.update({k.replace("_", "-").encode(): [v] for k, v in more.items()})
        response, _ = await call(proxy.url + path, b"POST", headers, body)
        self.assertEqual(response.code, 200)
        return self.up.seen[-1]

    def counted(self, proxy: ProxyFixture, upstream: str, stage: str) -> float:
        return proxy.sample(
            "proxy_upstream_compression_bytes_total", upstream=upstream, stage=stage
        )

    async def test_otlp_and_loki_pushes_arrive_gzipd(self) -> None:
        proxy = self.start_proxy(UPSTREAM_COMPRESSION="gzip")
        cases = [
            ("/otlp/v1/traces", otlp_json(500), JSON, "otlp"),
            ("/otlp/v1/traces", otlp_protobuf(500), PROTOBUF, "otlp"),
            ("/loki/api/v1/push", loki_json(500), JSON, "loki"),
        ]
        sent = {"otlp": 0, "loki": 0}
        arrived = {"otlp": 0, "loki": 0}
        for path, body, content_type, signal in cases:
            seen = await self.post(proxy, path, body, content_type)
            self.assertEqual(seen.uri, path.encode())
            self.assertEqual(seen.header(b"Content-Encoding"), [b"gzip"])
            self.assertEqual(seen.header(b"Transfer-Encoding"), [b"chunked"])
            self.assertIsNone(seen.header(b"Content-Length"))
            self.assertEqual(seen.header(b"Content-Type"), [content_type])
            self.assertEqual(seen.header(b"Authorization"), [basic(ORG[signal])])
            self.assertEqual(seen.header(b"X-Scope-OrgID"), [ORG[signal].encode()])
            self.assertEqual(gzip.decompress(seen.body), body, path)
            self.assertLess(len(seen.body) * 3, len(body))
            sent[signal] += len(body)
            arrived[signal] += len(seen.body)
        for signal in ("otlp", "loki"):
            self.assertEqual(self.counted(proxy, signal, "before"), sent[signal])
            self.assertEqual(self.counted(proxy, signal, "after"), arrived[signal])
            # The client's bytes, as before compression existed.
            self.assertEqual(
                proxy.sample("proxy_request_body_bytes_total", upstream=signal), sent[signal]
            )
        text = proxy.metrics_text()
        self.assertIn(
            'proxy_upstream_compression_bytes_total{stage="before",upstream="otlp"}', text
        )

    async def test_untouched_pushes_and_queries(self) -> None:
        proxy = self.start_proxy(UPSTREAM_COMPRESSION="gzip", UPSTREAM_COMPRESSION_LEVEL="9")
        body = otlp_protobuf(200)
        zipped = gzip.compress(otlp_json(200))
        cases = [
            # Remote write: never, whatever its headers say.
            ("/api/prom/push", body, PROTOBUF, {"Content_Encoding": b"snappy"}),
            ("/api/prom/push", body, PROTOBUF, {}),
            # Loki's protobuf push is snappy already.
            ("/loki/api/v1/push", body, PROTOBUF, {}),
            # A body the client compressed passes as it came.
            ("/otlp/v1/traces", zipped, JSON, {"Content_Encoding": b"gzip"}),
            ("/otlp/v1/logs", body, PROTOBUF, {"Content_Encoding": b"deflate"}),
        ]
        for path, data, content_type, more in cases:
            seen = await self.post(proxy, path, data, content_type, **more)
            self.assertEqual(seen.body, data, path)
            self.assertEqual(seen.header(b"Content-Length"), [b"%d" % len(data)])
            expected = more.get("Content_Encoding")
            self.assertEqual(
                seen.header(b"Content-Encoding"), None if expected is None else [expected]
            )
        response, _ = await call(proxy.url + "/loki/api/v1/query_range?query=%7Bjob%3D%22a%22%7D")
        self.assertEqual(response.code, 200)
        self.assertIsNone(self.up.seen[-1].header(b"Content-Encoding"))
        for signal in ("prometheus", "loki", "otlp"):
            self.assertEqual(self.counted(proxy, signal, "before"), 0)

    async def test_off_by_default_and_per_signal(self) -> None:
        body = otlp_json(100)
        proxy = self.start_proxy()
        seen = await self.post(proxy, "/otlp/v1/traces", body, JSON)
        self.assertEqual((seen.body, seen.header(b"Content-Encoding")), (body, None))
        proxy = self.start_proxy(UPSTREAM_COMPRESSION="otlp=none,loki=gzip")
        seen = await self.post(proxy, "/otlp/v1/traces", body, JSON)
        self.assertEqual((seen.body, seen.header(b"Content-Encoding")), (body, None))
        lines = loki_json(100)
        seen = await self.post(proxy, "/loki/api/v1/push", lines, JSON)
        self.assertEqual(gzip.decompress(seen.body), lines)

    async def test_grpc_bridge_compresses_uncompressed_messages(self) -> None:
        self.up.headers = [(b"Content-Type", b"application/x-protobuf")]
        self.up.body = b""
        proxy = self.start_proxy(UPSTREAM_COMPRESSION="gzip")
        grpc_factory = GrpcFactory(proxy.factory)
        port = listen(grpc_factory)
        self.addCleanup(port.stopListening)
        client = await h2_connect(port.getHost().port)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]

        message = otlp_protobuf(300)  # past one window: flow control opens it again
        call_ = await client.unary(message, TRACES)
        self.assertEqual(call_.status, 0, call_)
        seen = self.up.seen[-1]
        self.assertEqual((seen.method, seen.uri), (b"POST", b"/otlp/v1/traces"))
        self.assertEqual(seen.header(b"Content-Encoding"), [b"gzip"])
        self.assertIsNone(seen.header(b"Content-Length"))
        self.assertEqual(gzip.decompress(seen.body), message)
        self.assertEqual(seen.header(b"Authorization"), [basic(ORG["otlp"])])
        self.assertEqual(self.counted(proxy, "otlp", "before"), len(message))
        self.assertEqual(self.counted(proxy, "otlp", "after"), len(seen.body))

        # A message the client gzip'd goes up as it came.
        zipped = gzip.compress(message)
        call_ = await client.unary(zipped, METRICS, [(b"grpc-encoding", b"gzip")], compressed=True)
        self.assertEqual(call_.status, 0, call_)
        seen = self.up.seen[-1]
        self.assertEqual(seen.body, zipped)
        self.assertEqual(seen.header(b"Content-Encoding"), [b"gzip"])
        self.assertEqual(seen.header(b"Content-Length"), [b"%d" % len(zipped)])
        self.assertEqual(self.counted(proxy, "otlp", "before"), len(message))


class RoutesFileTests(TestCase):
    """A ROUTES_FILE route's own ``compression``, and the start-up line
    naming the upstreams whose pushes are gzip'd."""

    timeout = 30

    async def test_route_compression_and_startup_line(self) -> None:
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        path = os.path.join(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(
                "routes:\n"
                f"  - {{name: otel, prefix: /otlp, upstream: '{url}'}}\n"
                f"  - {{name: logs, prefix: /loki, upstream: '{url}', compression: none}}\n"
            )
        env = {"ROUTES_FILE": path, "UPSTREAM_COMPRESSION": "gzip", "SHUTDOWN_DELAY_SECONDS": "0"}
        main = free_port()
        config, _, _, specs = load(env)
        out = io.StringIO()
        svc = ProxyService(
            config,
            reactor,
            token=None,
            routes=specs,
            listen=f"tcp:{main}:interface=127.0.0.1",
            stdout=out,
            handle_sigterm=False,
        )
        globalLogPublisher.addObserver(svc.log_observer)
        self.addCleanup(globalLogPublisher.removeObserver, svc.log_observer)
        svc.startService()
        self.addCleanup(svc.stopService)
        await sleep(0.05)
        said = [json.loads(line)["msg"] for line in out.getvalue().splitlines()]
        self.assertIn("uncompressed pushes gzip'd on the way to: otel", said)

        proxy = f"http://127.0.0.1:{main}"
        body = otlp_json(100)
        for route, zipped in (("/otlp/v1/traces", True), ("/loki/api/v1/push", False)):
            headers = {b"Content-Type": [JSON]}
            response, _ = await call(proxy + route, b"POST", headers, body)
            self.assertEqual(response.code, 200)
            seen = up.seen[-1]
            self.assertEqual(gzip.decompress(seen.body) if zipped else seen.body, body)
            self.assertEqual(seen.header(b"Content-Encoding"), [b"gzip"] if zipped else None)


class _GunzipUpstream(protocol.Protocol):
    """Reads a chunked gzip body, decompressing and hashing it as it comes
    (nothing kept), then answers 200 with what it got. Reads nothing while
    its factory's ``hold`` is set."""

    def connectionMade(self) -> None:
        f: Any = self.factory
        f.conns.append(self)
        self.parser = httptools.HttpRequestParser(self)
        self.z = zlib.decompressobj(31)
        self.hash = hashlib.sha256()
        self.size = 0
        self.wire = 0
        self.headers: list[tuple[bytes, bytes]] = []
        if f.hold:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.wire += len(data)
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        out = self.z.decompress(body)
        self.hash.update(out)
        self.size += len(out)

    def on_message_complete(self) -> None:
        out = self.z.flush()
        self.hash.update(out)
        self.size += len(out)
        answer = b"%d %s" % (self.size, self.hash.hexdigest().encode())
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )


class BigBodyTests(TestCase):
    """32 MiB of an OTLP push through a real ``twistd`` process (its RSS read
    from /proc) to an upstream that first reads nothing, then reads slowly."""

    timeout = 120

    async def test_32mib_streams_with_backpressure(self) -> None:
        if not os.path.exists("/proc/self/status"):
            raise SkipTest("needs /proc to read the proxy's RSS")
        factory = protocol.Factory.forProtocol(_GunzipUpstream)
        factory.conns = []  # type: ignore[attr-defined]
        factory.hold = True  # type: ignore[attr-defined]
        port = listen(factory)
        self.addCleanup(port.stopListening)
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            UPSTREAM_COMPRESSION="gzip",
            MAX_REQUEST_BODY_BYTES="0",
            SHUTDOWN_DELAY_SECONDS="0",
        )
        proc = await spawn_proxy(env)
        self.addCleanup(lambda: proc.ended)
        self.addCleanup(proc.signal, "TERM")
        await call(proc.url + "/health")
        await sleep(0.2)
        base = proc.vm("VmRSS")

        # Half text that shrinks, half random bytes that do not: the upstream
        # gets about 18 MiB, so its not reading must hold the client back.
        total = 32 * MiB
        rnd = random.Random(22)
        text = otlp_json(200)
        body = bytearray()
        while len(body) < total:
            body += text if len(body) % (2 * len(text)) < len(text) else rnd.randbytes(len(text))
        body = body[:total]
        client = await raw_connect(proc.port)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        client.transport.write(  # type: ignore[union-attr]
            b"POST /otlp/v1/traces HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        pump = _Pump(client.transport, memoryview(body))
        client.transport.registerProducer(pump, False)  # type: ignore[union-attr]

        # The upstream reads nothing: the client is held back well short of
        # the end (no progress for a whole second; a loaded machine may pause
        # any process for a moment).
        stalled, still = -1, 0
        for _ in range(600):
            await sleep(0.05)
            still = still + 1 if pump.sent == stalled else 0
            stalled = pump.sent
            if still == 20 or stalled == total:
                break
        self.assertLess(pump.sent, total - 8 * MiB, "the proxy took the body regardless")

        # Then it reads, a little at a time, then all.
        (upstream,) = factory.conns  # type: ignore[attr-defined]
        for _ in range(10):
            upstream.transport.resumeProducing()
            await sleep(0.02)
            upstream.transport.pauseProducing()
            await sleep(0.05)
        upstream.transport.resumeProducing()
        for _ in range(1200):
            if b"\r\n\r\n" in client.data:
                break
            await sleep(0.05)
        answer = bytes(client.data).split(b"\r\n\r\n", 1)
        self.assertTrue(answer[0].startswith(b"HTTP/1.1 200"), answer[0])
        self.assertEqual(answer[1], b"%d %s" % (total, hashlib.sha256(body).hexdigest().encode()))
        headers = dict(upstream.headers)
        self.assertEqual(headers.get(b"content-encoding"), b"gzip")
        self.assertEqual(headers.get(b"transfer-encoding"), b"chunked")
        self.assertLess(upstream.wire, total * 0.7)

        grew = (proc.vm("VmHWM") - base) / MiB
        print(f"\ngzip'd 32 MiB push: proxy RSS idle {base / MiB:.1f} MiB, grew {grew:.1f} MiB")
        self.assertLess(grew, 12)


class _Pump:
    """Writes ``body`` to a transport, 256 KiB each time it asks."""

    def __init__(self, transport: Any, body: memoryview) -> None:
        self.transport = transport
        self.body = body
        self.sent = 0

    def resumeProducing(self) -> None:
        piece = self.body[self.sent : self.sent + 256 * 1024]
        self.sent += len(piece)
        self.transport.write(bytes(piece))
        if self.sent == len(self.body):
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.sent = len(self.body)
