"""TLS on the upstream connection's socket (`io/tlswire.py`), against real
TLS servers on loopback: what a client sees when the upstream closes, resets,
stops reading or streams faster than the client takes, and that pooled
connections and WebSocket tunnels work over it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lgmt_proxy.dataplane.upstream import trust_root
from lgmt_proxy.io.tlswire import WireTLS
from tests.loopback.test_streaming import Downloader, MiB, _Head, _Pump
from tests.loopback.test_tls import make_ca, make_leaf, pem
from tests.support.helpers import (
    ProxyFixture,
    call,
    env_for,
    raw_connect,
    sleep,
    status_of,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@implementer(IHandshakeListener)
class _Scripted(protocol.Protocol):
    """A TLS upstream whose answer to each request head is the factory's
    ``answer(protocol, body_so_far)``; bodies are read by Content-Length."""

    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]
        self.h = _Head()
        self.body = hashlib.sha256()
        self.got = 0

    def handshakeCompleted(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        rest = self.h.feed(data)
        if self.h.head is None:
            return
        self.body.update(rest)
        self.got += len(rest)
        length = 0
        if b"content-length" in self.h.head.lower():
            length = self.h.length()
        if self.got >= length:
            self.h = _Head()
            self.got = 0
            body, self.body = self.body, hashlib.sha256()
            self.factory.answer(self, body.hexdigest())  # type: ignore[attr-defined]


class WireTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        ca_key, ca = make_ca("lgmt-proxy test CA")
        key_pem, cert_pem = make_leaf(ca_key, ca, "localhost")
        self.server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        self.trust = trust_root(pem(ca))

    def upstream(
        self, answer: Callable[[Any, str], None], proto: type[protocol.Protocol] = _Scripted
    ) -> Any:
        factory = protocol.Factory.forProtocol(proto)
        factory.noisy = False
        factory.answer = answer  # type: ignore[attr-defined]
        factory.accepted = 0  # type: ignore[attr-defined]
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, factory, self.server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def later(self, delay: float, f: Callable[[], object]) -> None:
        call = reactor.callLater(delay, f)  # type: ignore[attr-defined]
        self.addCleanup(lambda: call.cancel() if call.active() else None)

    def proxy(self, port: int, **extra: str) -> ProxyFixture:
        fixture = ProxyFixture(env_for(f"https://localhost:{port}", **extra), trust=self.trust)
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        return fixture

    async def idle_emptied(self, proxy: ProxyFixture, name: str) -> bool:
        for _ in range(200):
            if not proxy.upstreams[name].pool.idle:
                return True
            await sleep(0.01)
        return False

    async def test_pooled_connection_reused_on_the_socket(self) -> None:
        factory, port = self.upstream(lambda p, _: p.transport.write(OK))
        proxy = self.proxy(port)
        for _ in range(3):
            response, body = await call(proxy.url + "/loki/api/v1/labels")
            self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(factory.accepted, 1)
        (pooled,) = proxy.upstreams["loki"].pool.idle
        # TLS runs on the socket itself, not through Twisted's TLS layer.
        self.assertIsInstance(pooled.sender.transport, WireTLS)
        self.assertIsNotNone(pooled.sender.ssl)

    async def _idle_close_seen(self, close: str, what: str) -> Any:
        """An idle pooled connection the upstream closes (``close``: the TLS
        transport's method) is dropped at once, and the next request opens a
        new one; the proxy, for further checks."""

        def answer_then_close(p: Any, _: str) -> None:
            p.transport.write(OK)
            self.later(0.05, getattr(p.transport, close))

        factory, port = self.upstream(answer_then_close)
        proxy = self.proxy(port)
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 200)
        self.assertTrue(await self.idle_emptied(proxy, "loki"), f"{what} not seen")
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 200)
        self.assertEqual(factory.accepted, 2)
        return proxy

    async def test_close_notify_on_an_idle_connection_is_seen_at_once(self) -> None:
        proxy = await self._idle_close_seen("loseConnection", "close_notify")
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="reset"), 0
        )

    async def test_reset_of_an_idle_connection_is_seen_at_once(self) -> None:
        await self._idle_close_seen("abortConnection", "reset")

    async def test_reset_mid_response_cuts_the_client(self) -> None:
        def half_then_reset(p: Any, _: str) -> None:
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
            self.later(0.05, p.transport.abortConnection)

        _, port = self.upstream(half_then_reset)
        proxy = self.proxy(port)
        client = await raw_connect(proxy.port.getHost().port)
        client.transport.write(b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n")
        data = await client.closed
        self.assertEqual(status_of(data), 200)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 100000", head)
        self.assertEqual(body, b"x" * 100)  # cut: never as if complete
        self.assertEqual(proxy.upstreams["loki"].pool.idle, [])

    async def test_an_upload_the_upstream_pauses_arrives_whole(self) -> None:
        # The upstream stops reading for a while: the sender's backlog (the
        # plaintext OpenSSL asked to be retried with, and what came after)
        # goes out in order once it reads again.
        answers: list[str] = []

        @implementer(IHandshakeListener)
        class Pausing(_Scripted):
            def handshakeCompleted(self) -> None:
                self.transport.pauseProducing()  # type: ignore[union-attr]
                reactor.callLater(0.5, self.transport.resumeProducing)  # type: ignore[attr-defined,union-attr]

        def record(p: Any, digest: str) -> None:
            answers.append(digest)
            p.transport.write(OK)

        _, port = self.upstream(record, Pausing)
        proxy = self.proxy(port, MAX_REQUEST_BODY_BYTES="0")
        block = bytes(range(256)) * (MiB // 256)
        total = 24 * MiB
        sent = hashlib.sha256()
        for i in range(total // MiB):
            sent.update(block[i:] + block[:i])
        client = await raw_connect(proxy.port.getHost().port)
        client.transport.write(
            b"POST /api/prom/push HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        for i in range(total // MiB):
            client.transport.write(block[i:] + block[:i])
        data = await client.closed
        self.assertEqual(status_of(data), 200, data[:300])
        self.assertEqual(answers, [sent.hexdigest()])

    async def test_a_slow_client_holds_the_upstream_back(self) -> None:
        # The client stops reading a big download: the proxy stops reading
        # the upstream (the wire's reader is paused), so what the upstream
        # managed to write stays bounded by the buffers on the way.
        total = 96 * MiB
        pumped: list[_Pump] = []

        def stream(p: Any, _: str) -> None:
            p.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            pump = _Pump(p.transport, total)
            pumped.append(pump)
            p.transport.registerProducer(pump, False)

        _, port = self.upstream(stream)
        proxy = self.proxy(port)
        client = Downloader()
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port.getHost().port), client
        )
        client.transport.write(b"GET /loki/api/v1/query_range HTTP/1.1\r\nHost: p\r\n\r\n")
        await client.first
        client.transport.pauseProducing()
        await sleep(1.0)
        written = total - pumped[0].left
        self.assertLess(written, 32 * MiB, "the upstream was not held back")
        client.transport.resumeProducing()
        await client.closed
        self.assertEqual(client.got, total)

    async def test_websocket_tunnel_over_tls(self) -> None:
        class Echo(_Scripted):
            switched = False

            def dataReceived(self, data: bytes) -> None:
                if self.switched:
                    self.transport.write(data.upper())  # type: ignore[union-attr]
                    return
                if b"\r\n\r\n" in data:
                    self.switched = True
                    self.transport.write(  # type: ignore[union-attr]
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n"
                        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                    )

        _, port = self.upstream(lambda p, _: None, Echo)
        proxy = self.proxy(port)
        client = await raw_connect(proxy.port.getHost().port)
        client.transport.write(
            b"GET /loki/api/v1/tail HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        for _ in range(300):
            if b"\r\n\r\n" in client.data:
                break
            await sleep(0.01)
        self.assertEqual(status_of(bytes(client.data)), 101, client.data[:200])
        del client.data[:]
        client.transport.write(b"hello over tls")
        for _ in range(300):
            if client.data:
                break
            await sleep(0.01)
        self.assertEqual(bytes(client.data), b"HELLO OVER TLS")
        client.transport.loseConnection()
        await client.closed

    async def test_verification_failure_reason_unchanged(self) -> None:
        # Against a CA nobody trusts: the same 502 and failure reason as
        # through Twisted's TLS layer.
        _, port = self.upstream(lambda p, _: p.transport.write(OK))
        proxy = ProxyFixture(env_for(f"https://localhost:{port}"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, body = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "upstream TLS verification failed")
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="tls"), 1
        )
