"""Bodies stream both ways with backpressure: first bytes pass before the last
are sent, and 512 MiB each way through a real ``twistd`` process keeps its
peak RSS well under 64 MiB above idle.

Placed with the loopback tests (its dominant kind): ``BigBodyTests`` spawns
``twistd`` (to measure a real process's RSS) and so is a process test; it
shares this module's upstream and client protocols."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import protocol, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from lgmt_proxy.dataplane.upstream import trust_root
from tests.loopback.test_tls import make_ca, make_leaf, pem
from tests.support.helpers import (
    ProxyFixture,
    call,
    env_for,
    listen,
    raw_connect,
    sleep,
    spawn_proxy,
)

CHUNK = 256 * 1024
MiB = 1024 * 1024


@implementer(IPullProducer)
class _Pump:
    """Writes ``total`` bytes to a transport, a chunk each time it asks."""

    def __init__(self, transport: Any, total: int, done: Deferred[None] | None = None) -> None:
        self.transport = transport
        self.left = total
        self.done = done
        self.block = b"x" * CHUNK

    def resumeProducing(self) -> None:
        n = min(CHUNK, self.left)
        self.left -= n
        self.transport.write(self.block if n == CHUNK else self.block[:n])
        if self.left == 0:
            self.transport.unregisterProducer()
            if self.done is not None:
                self.done.callback(None)

    def stopProducing(self) -> None:
        self.left = 0


class _Head:
    """Splits an HTTP message head from what follows it."""

    def __init__(self) -> None:
        self.buf = b""
        self.head: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        if self.head is not None:
            return data
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return b""
        self.head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = b""
        return rest

    def length(self) -> int:
        assert self.head is not None
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        raise AssertionError(f"no Content-Length in {self.head!r}")


class SinkUpstream(protocol.Protocol):
    """Reads a Content-Length body to the end (counting), then answers 200."""

    def connectionMade(self) -> None:
        self.h = _Head()
        self.got = 0

    def dataReceived(self, data: bytes) -> None:
        data = self.h.feed(data)
        if self.h.head is None:
            return
        self.got += len(data)
        f = self.factory
        if self.got and not f.first.called:  # type: ignore[attr-defined]
            f.first.callback(self.got)  # type: ignore[attr-defined]
        if self.got >= self.h.length():
            body = b"%d" % self.got
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


class SourceUpstream(protocol.Protocol):
    """Answers with ``total`` body bytes; optionally waits on ``gate`` after the first chunk."""

    def dataReceived(self, data: bytes) -> None:
        if getattr(self, "started", False) or b"\r\n\r\n" not in data:
            return
        self.started = True
        f = self.factory
        total = f.total  # type: ignore[attr-defined]
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        gate = getattr(f, "gate", None)
        if gate is None:
            self.transport.registerProducer(_Pump(self.transport, total), False)
            return
        self.transport.write(b"y" * CHUNK)
        gate.addCallback(
            lambda _: self.transport.registerProducer(_Pump(self.transport, total - CHUNK), False)
        )


class Downloader(protocol.Protocol):
    """Counts response body bytes; fires ``first`` at the first body byte."""

    def __init__(self) -> None:
        self.h = _Head()
        self.got = 0
        self.first: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.expected = -1

    def dataReceived(self, data: bytes) -> None:
        data = self.h.feed(data)
        if self.h.head is None:
            return
        if self.expected < 0:
            self.expected = self.h.length()
        self.got += len(data)
        if self.got and not self.first.called:
            self.first.callback(None)
        if self.got >= self.expected:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


async def _first_of(**events: Deferred[Any]) -> str:
    """The name of whichever of ``events`` happens first."""
    winner: Deferred[str] = Deferred()
    for name, event in events.items():

        def note(result: object, name: str = name) -> object:
            if not winner.called:
                winner.callback(name)
            return result  # the event's own result stays for whoever else waits

        event.addBoth(note)
    return await winner


class FirstByteTests(TestCase):
    """Each test holds one side back after its first bytes, so the other side
    only sees bytes if the proxy streams; a proxy that buffered would instead
    cut the stalled exchange at ``UPSTREAM_TIMEOUT_SECONDS`` (its body silence
    rule), and the test says which came first."""

    timeout = 60

    def proxy_to(self, upstream: protocol.Factory) -> ProxyFixture:
        port = listen(upstream)
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(
            env_for(f"http://127.0.0.1:{port.getHost().port}", UPSTREAM_TIMEOUT_SECONDS="10")
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        return proxy

    async def test_upstream_gets_first_bytes_before_client_finishes(self) -> None:
        factory = protocol.Factory.forProtocol(SinkUpstream)
        factory.first = Deferred()  # type: ignore[attr-defined]
        proxy = self.proxy_to(factory)
        client = await raw_connect(proxy.port.getHost().port)
        total, sent = 4 * MiB, 65536
        client.transport.write(
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % total
        )
        client.transport.write(b"x" * sent)
        # Nothing more is sent until the upstream has seen body bytes.
        answered: Deferred[None] = Deferred()
        client.dataReceived = lambda data: (  # type: ignore[method-assign]
            client.data.extend(data),
            None if answered.called else answered.callback(None),
        )
        first = await _first_of(
            upstream=factory.first,  # type: ignore[attr-defined]
            answered=answered,
            closed=client.closed,
        )
        self.assertEqual(
            first,
            "upstream",
            f"the proxy held the first {sent} bytes of a {total}-byte body: the client "
            f"was {first} ({bytes(client.data[:100])!r}) before the upstream saw any",
        )
        got = factory.first.result  # type: ignore[attr-defined]
        self.assertTrue(0 < got <= sent, got)
        client.transport.write(b"x" * (total - sent))
        for _ in range(500):
            if b"\r\n\r\n" in client.data:
                break
            await sleep(0.01)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 200"), client.data[:100])
        self.assertTrue(client.data.endswith(b"%d" % total))
        client.transport.loseConnection()

    async def test_client_gets_first_bytes_before_upstream_finishes(self) -> None:
        factory = protocol.Factory.forProtocol(SourceUpstream)
        factory.total = 4 * MiB  # type: ignore[attr-defined]
        factory.gate = Deferred()  # type: ignore[attr-defined]
        proxy = self.proxy_to(factory)
        client = Downloader()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port.getHost().port), client
        )
        client.transport.write(b"GET /loki/api/v1/query_range HTTP/1.1\r\nHost: p\r\n\r\n")
        # The upstream sends one chunk, then waits for the gate.
        first = await _first_of(body=client.first, closed=client.closed)
        self.assertEqual(
            first, "body", "the client got no body byte while the upstream held the rest"
        )
        self.assertLessEqual(client.got, CHUNK)
        factory.gate.callback(None)  # type: ignore[attr-defined]
        await client.closed
        self.assertEqual(client.got, 4 * MiB)


class _Deaf(protocol.Protocol):
    """An upstream that accepts the connection and never reads from it."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]


class StalledUpstreamTests(TestCase):
    timeout = 60

    async def test_upstream_that_stops_reading_gets_504_not_408(self) -> None:
        # The client keeps sending; the proxy pauses it only because the
        # upstream takes nothing: a timeout then is the upstream's (504).
        port = listen(protocol.Factory.forProtocol(_Deaf))
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(
            env_for(
                f"http://127.0.0.1:{port.getHost().port}",
                UPSTREAM_TIMEOUT_SECONDS="1",
                MAX_REQUEST_BODY_BYTES="0",
            )
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        client = await raw_connect(proxy.port.getHost().port)
        total = 1024 * MiB
        client.transport.write(
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % total
        )
        client.transport.registerProducer(_Pump(client.transport, total), False)
        data = await client.closed
        self.assertEqual(data.split(b"\r\n", 1)[0], b"HTTP/1.1 504 Gateway Timeout", data[:300])
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="prometheus", reason="timeout"), 1
        )


@implementer(IHandshakeListener)
class _DeafAfterHandshake(protocol.Protocol):
    """A TLS upstream that completes the handshake, then never reads."""

    def handshakeCompleted(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]


class StalledTLSUpstreamTests(TestCase):
    timeout = 60

    async def test_tls_upstream_that_stops_reading_gets_504_not_408(self) -> None:
        # The TLS twin of the test above: the records wait in the sender's
        # backlog as the plaintext would, so the timeout is the upstream's.
        ca_key, ca = make_ca("lgmt-proxy test CA")
        key_pem, cert_pem = make_leaf(ca_key, ca, "localhost")
        server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0,
            protocol.Factory.forProtocol(_DeafAfterHandshake),
            server.options(),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(
            env_for(
                f"https://localhost:{port.getHost().port}",
                UPSTREAM_TIMEOUT_SECONDS="1",
                MAX_REQUEST_BODY_BYTES="0",
            ),
            trust=trust_root(pem(ca)),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        client = await raw_connect(proxy.port.getHost().port)
        total = 1024 * MiB
        client.transport.write(
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % total
        )
        client.transport.registerProducer(_Pump(client.transport, total), False)
        data = await client.closed
        self.assertEqual(data.split(b"\r\n", 1)[0], b"HTTP/1.1 504 Gateway Timeout", data[:300])
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="prometheus", reason="timeout"), 1
        )


class BigBodyTests(TestCase):
    """512 MiB each way through a real twistd process; its peak RSS is read
    from /proc. Set LGMT_STREAM_MIB to change the size."""

    timeout = 300

    async def _proxy(self, factory: protocol.Factory) -> Any:
        if not os.path.exists("/proc/self/status"):
            raise SkipTest("needs /proc to read the proxy's RSS")
        port = listen(factory)
        self.addCleanup(port.stopListening)
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            MAX_REQUEST_BODY_BYTES="0",
            SHUTDOWN_DELAY_SECONDS="0",
        )
        proc = await spawn_proxy(env)
        self.addCleanup(lambda: proc.ended)
        self.addCleanup(proc.signal, "TERM")
        # warm up: one proxied request, so pools and imports are in the baseline
        await call(proc.url + "/health")
        await sleep(0.2)
        return proc

    async def test_upload_512mib(self) -> None:
        total = int(os.environ.get("LGMT_STREAM_MIB", "512")) * MiB
        factory = protocol.Factory.forProtocol(SinkUpstream)
        factory.first = Deferred()  # type: ignore[attr-defined]
        proc = await self._proxy(factory)
        base = proc.vm("VmRSS")
        client = await raw_connect(proc.port)
        client.transport.write(
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % total
        )
        sent: Deferred[None] = Deferred()
        client.transport.registerProducer(_Pump(client.transport, total, sent), False)
        await sent
        for _ in range(3000):
            if client.data.endswith(b"%d" % total):
                break
            await sleep(0.01)
        self.assertTrue(client.data.endswith(b"\r\n\r\n%d" % total), client.data[-200:])
        peak = proc.vm("VmHWM")
        grew = (peak - base) / MiB
        print(
            f"\nupload {total // MiB} MiB: proxy RSS idle {base / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB (+{grew:.1f})"
        )
        self.assertLess(grew, 64)
        client.transport.loseConnection()

    async def test_download_512mib(self) -> None:
        total = int(os.environ.get("LGMT_STREAM_MIB", "512")) * MiB
        factory = protocol.Factory.forProtocol(SourceUpstream)
        factory.total = total  # type: ignore[attr-defined]
        proc = await self._proxy(factory)
        base = proc.vm("VmRSS")
        client = Downloader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proc.port), client)
        client.transport.write(b"GET /loki/api/v1/query_range HTTP/1.1\r\nHost: p\r\n\r\n")
        await client.closed
        self.assertEqual(client.got, total)
        peak = proc.vm("VmHWM")
        grew = (peak - base) / MiB
        print(
            f"\ndownload {total // MiB} MiB: proxy RSS idle {base / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB (+{grew:.1f})"
        )
        self.assertLess(grew, 64)
