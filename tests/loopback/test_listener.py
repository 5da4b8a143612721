"""Closing the listener at the end of SHUTDOWN_DELAY_SECONDS (issue 20 item
16): connections the kernel had already completed, waiting in the accept
queue with their request sent, are answered with ``Connection: close``, never
reset; only connects after the close are refused.

The queued connections are real sockets connected (a blocking connect to
loopback returns once the kernel has completed the handshake, without any
``accept``) and their requests sent, in the same reactor turn as the
service's stop begins: the reactor never had a chance to accept them.
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import parse_config
from lgmt_proxy.listeners import Listener
from lgmt_proxy.service import ProxyService, ipv6_available
from tests.support.helpers import (
    RawClient,
    Recorder,
    env_for,
    free_port,
    listen,
    raw_connect,
    status_of,
    upstream_site,
)

HEALTH = b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n"


def push(n: int) -> bytes:
    body = b'{"streams":[%d]}' % n
    return (
        b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class _To(Factory):
    """Hands a socket connected outside the reactor to one `RawClient`."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.client


def head_and_body(raw: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


class QueuedAtCloseTests(TestCase):
    timeout = 30

    def service(self, **extra: str) -> tuple[ProxyService, int, Recorder]:
        up = Recorder()
        upstream = listen(upstream_site(up))
        self.addCleanup(upstream.stopListening)
        env = env_for(
            f"http://127.0.0.1:{upstream.getHost().port}",
            SHUTDOWN_DELAY_SECONDS="0",
            SHUTDOWN_GRACE_SECONDS="5",
            **extra,
        )
        config = parse_config(env)
        assert config.token is not None
        port = free_port()
        svc = ProxyService(
            config,
            reactor,
            token=config.token,
            listen=f"tcp:{port}:interface=127.0.0.1",
            stdout=io.StringIO(),
            handle_sigterm=False,
        )
        globalLogPublisher.addObserver(svc.log_observer)
        self.addCleanup(globalLogPublisher.removeObserver, svc.log_observer)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc, port, up

    def queue(self, port: int, requests: list[bytes]) -> list[socket.socket]:
        """Connections the kernel completes and holds in the accept queue,
        each with its request sent."""
        queued = []
        for request in requests:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.addCleanup(s.close)
            s.sendall(request)
            queued.append(s)
        return queued

    async def answers(self, queued: list[socket.socket]) -> list[RawClient]:
        """Read each queued connection until the proxy closes it."""
        clients = []
        for s in queued:
            client = RawClient()
            s.setblocking(False)
            reactor.adoptStreamConnection(s.fileno(), socket.AF_INET, _To(client))  # type: ignore[attr-defined]
            s.close()
            clients.append(client)
        timeouts = [
            reactor.callLater(10, c.transport.abortConnection)  # type: ignore[attr-defined]
            for c in clients
        ]
        for client in clients:
            await client.closed
        for t in timeouts:
            if t.active():
                t.cancel()
        return clients

    def assert_answered_and_closed(self, client: RawClient, status: int) -> bytes:
        raw = bytes(client.data)
        self.assertEqual(status_of(raw), status, raw[:300])
        headers, body = head_and_body(raw)
        self.assertEqual(headers.get(b"connection"), b"close", raw[:300])
        self.assertEqual(len(body), int(headers[b"content-length"]), raw[:300])
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionDone), f"reset: {client.reason!r}")
        return body

    async def test_queued_connections_answered_then_connects_refused(self) -> None:
        svc, port, up = self.service()
        requests = [HEALTH, push(1), HEALTH, push(2), push(3), HEALTH]
        queued = self.queue(port, requests)
        stopped = svc.stopService()  # the same reactor turn: nothing accepted yet
        self.assertEqual(svc.proxy_factory.connections, set())
        # Connects while the listener closes (the reactor has stopped
        # reading it, the socket is not closed yet) are queued too.
        late = [HEALTH, push(4)]
        queued += self.queue(port, late)
        requests += late
        clients = await self.answers(queued)
        for request, client in zip(requests, clients, strict=True):
            body = self.assert_answered_and_closed(client, 200)
            if request == HEALTH:
                self.assertEqual(json.loads(body), {"status": "ok"})
        self.assertEqual(
            sorted(seen.body for seen in up.seen),
            [b'{"streams":[%d]}' % n for n in (1, 2, 3, 4)],
        )
        # The listener is closed: a new connect is refused (safe to retry).
        with self.assertRaises(ConnectionRefusedError):
            await raw_connect(port)
        await stopped

    async def test_queued_past_max_connections_get_503(self) -> None:
        # Taken-over connections count against MAX_CONNECTIONS like any
        # other: the first two (the accept queue is first in, first out)
        # are served, the rest get the 503 and are closed.
        svc, port, up = self.service(MAX_CONNECTIONS="2")
        queued = self.queue(port, [push(1), push(2)])
        queued += self.queue(port, [push(3), push(4)])
        stopped = svc.stopService()
        clients = await self.answers(queued)
        for client in clients[:2]:
            self.assert_answered_and_closed(client, 200)
        for client in clients[2:]:
            body = self.assert_answered_and_closed(client, 503)
            self.assertIn(b"too many connections", body)
        self.assertEqual(len(up.seen), 2)
        await stopped


class WithoutTheTakeOverTests(TestCase):
    """The control: what a plain close does to the same queued connections
    (why the listener takes them over). Pins the kernel's behaviour the fix
    relies on; it fails if closing a listening socket stops resetting them."""

    async def test_plain_close_resets_queued_connections(self) -> None:
        port = listen(Factory.forProtocol(Protocol))
        queued = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(queued.close)
        queued.sendall(HEALTH)
        await port.stopListening()
        queued.settimeout(5)
        with self.assertRaises(ConnectionResetError):
            queued.recv(1024)


class _Hello(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


class ListenerTests(TestCase):
    """The listener binds TCP sockets itself (to keep them through the
    close): the descriptions twistd is given still listen as Twisted's
    own ``listenTCP`` would, and a port in use is still `CannotListenError`."""

    async def test_tcp_descriptions_listen(self) -> None:
        cases = [
            ("tcp:0:interface=127.0.0.1", "127.0.0.1"),
            ("tcp:port=0:interface=localhost", "127.0.0.1"),
        ]
        if ipv6_available():
            cases.append(("tcp6:0:interface=\\:\\:1", "::1"))
        for description, host in cases:
            listener = Listener(
                description, Factory.forProtocol(_Hello), reactor, option="--listen"
            )
            listener.privilegedStartService()
            listener.startService()
            port = listener.port.getHost().port
            endpoint = (TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint)(
                reactor, host, port
            )
            client = RawClient()
            await connectProtocol(endpoint, client)
            self.assertEqual(await client.closed, b"hello", description)
            await listener.stopService()
            with self.assertRaises(ConnectionRefusedError):
                await connectProtocol(endpoint, RawClient())

    def test_port_in_use(self) -> None:
        taken = listen(Factory.forProtocol(Protocol))
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        listener = Listener(
            f"tcp:{port}:interface=127.0.0.1", Factory(), reactor, option="--listen"
        )
        with self.assertRaises(CannotListenError) as raised:
            listener.privilegedStartService()
        self.assertEqual((raised.exception.interface, raised.exception.port), ("127.0.0.1", port))
        self.assertEqual(raised.exception.socketError.strerror, "Address already in use")
