"""WebSocket passthrough end to end: a real autobahn client, the proxy, and a
loopback autobahn upstream that checks the injected credentials and echoes."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support.helpers import ORG, TOKEN, ProxyFixture, basic, call, env_for, listen, sleep


class NotOpened(Exception):
    pass


class EchoUpstream(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        f = self.factory
        f.requests.append(request)
        headers = request.headers
        if headers.get("authorization") != basic(ORG["loki"], f.token).decode():
            raise ConnectionDeny(401, "bad credentials")
        if headers.get("x-scope-orgid") != ORG["loki"]:
            raise ConnectionDeny(403, "bad tenant")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(b"echo:" + payload, isBinary)


class Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append(payload)
        waiting = self.factory.waiting
        if waiting and len(self.factory.messages) >= waiting[0][0]:
            waiting.pop(0)[1].callback(None)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(NotOpened(f"closed before open: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


async def open_websocket(proxy: ProxyFixture, path: str, **options: Any) -> Any:
    """A `Client` connected through ``proxy``; ``options`` go to autobahn's
    factory (``headers``, ``origin``). Its ``opened``/``closed`` Deferreds
    say how the handshake went."""
    port = proxy.port.getHost().port
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", **options)
    factory.protocol = Client
    factory.opened = Deferred()
    factory.closed = Deferred()
    factory.messages = []
    factory.waiting = []
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return factory


class WebSocketTests(TestCase):
    timeout = 30

    def start(
        self, token: str = TOKEN, **extra: str
    ) -> tuple[ProxyFixture, WebSocketServerFactory]:
        upstream = WebSocketServerFactory()
        upstream.protocol = EchoUpstream
        upstream.requests = []
        upstream.token = token
        port = listen(upstream)
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}", **extra))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        return proxy, upstream

    async def connect(
        self, proxy: ProxyFixture, path: str, headers: dict[str, str] | None = None
    ) -> Any:
        return await open_websocket(proxy, path, headers=headers or {})

    async def test_tail_echo_with_injected_credentials(self) -> None:
        proxy, upstream = self.start()
        f = await self.connect(
            proxy,
            "/loki/api/v1/tail?query=%7Bjob%3D%22x%22%7D",
            {"Authorization": "Bearer client-secret"},
        )
        client = await f.opened
        self.assertEqual(proxy.sample("proxy_websockets_open", upstream="loki"), 1)
        got: Deferred[None] = Deferred()
        f.waiting.append((3, got))
        client.sendMessage(b"hello")
        client.sendMessage(b"x" * 200000, isBinary=True)
        client.sendMessage(b"bye")
        await got
        self.assertEqual(f.messages, [b"echo:hello", b"echo:" + b"x" * 200000, b"echo:bye"])
        (request,) = upstream.requests
        self.assertEqual(request.path, "/loki/api/v1/tail")
        self.assertEqual(request.params["query"], ['{job="x"}'])
        client.sendClose()
        await f.closed
        for _ in range(50):
            if proxy.sample("proxy_websockets_open", upstream="loki") == 0:
                break
            await sleep(0.02)
        self.assertEqual(proxy.sample("proxy_websockets_open", upstream="loki"), 0)
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="loki", method="GET", status="101"), 1
        )

    async def test_upstream_refusal_is_relayed(self) -> None:
        proxy, _ = self.start(token="not-what-the-proxy-sends")
        f = await self.connect(proxy, "/loki/api/v1/tail")
        with self.assertRaises(NotOpened):
            await f.opened
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="loki", method="GET", status="401"), 1
        )

    async def test_cap_on_open_sessions(self) -> None:
        proxy, _ = self.start(MAX_WEBSOCKETS="1")
        first = await self.connect(proxy, "/loki/api/v1/tail")
        first_client = await first.opened
        second = await self.connect(proxy, "/loki/api/v1/tail")
        with self.assertRaises(NotOpened):
            await second.opened
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="loki", method="GET", status="503"), 1
        )
        first_client.sendClose()
        await first.closed
        await sleep(0.1)
        third = await self.connect(proxy, "/loki/api/v1/tail")
        (await third.opened).sendClose()
        await third.closed

    async def test_plain_requests_unaffected(self) -> None:
        proxy, _ = self.start()
        response, _ = await call(proxy.url + "/loki/api/v1/tail")
        self.assertNotEqual(response.code, 101)

    async def test_idle_session_closed(self) -> None:
        proxy, _ = self.start(WEBSOCKET_IDLE_TIMEOUT_SECONDS="0.3")
        said: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            said.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        f = await self.connect(proxy, "/loki/api/v1/tail")
        await f.opened
        # Nobody else closes the session: only the idle rule can (or the test
        # times out), and the proxy says it did.
        await f.closed
        self.assertIn("closing idle WebSocket session to loki", said)
        await sleep(0.05)
        self.assertEqual(proxy.sample("proxy_websockets_open", upstream="loki"), 0)
