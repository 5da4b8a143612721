"""`lgmt_proxy.io.tlswire` on a connected socket pair with small kernel
buffers and a fake reactor, the server an OpenSSL connection on the other
end driven by the test: the handshake, writes held until it is done, the
plaintext OpenSSL asks to be retried with (and what came after) sent in
order, ``close_notify`` and errors as the application hears them. The
loopback tests (test_tlswire, test_tls) cover it against real servers."""

from __future__ import annotations

import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lgmt_proxy.dataplane.upstream import trust_root
from lgmt_proxy.io.sending import SendQueue
from lgmt_proxy.io.tls import ClientTLS
from lgmt_proxy.io.tlswire import WireTLS, lost_reason
from tests.loopback.test_tls import make_ca, make_leaf, pem
from tests.support.memory import small_socket_pair


@implementer(IHandshakeListener)
class _App(Protocol):
    """The application over TLS: installs its sender, records what it hears."""

    def __init__(self, queue: SendQueue) -> None:
        self.queue = queue
        self.got = bytearray()
        self.shook = False
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.sender = self.queue.install(self)

    def handshakeCompleted(self) -> None:
        self.shook = True

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason


class _TCP(StringTransport):
    """Twisted's TCP transport as `WireTLS` uses it: the socket, pausing,
    closing (whose ``connectionLost`` the test delivers)."""

    def __init__(self, sock: Any) -> None:
        super().__init__()
        self.sock = sock
        self.closed = ""

    def getHandle(self) -> Any:
        return self.sock

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseConnection(self) -> None:
        self.closed = self.closed or "lose"

    def abortConnection(self) -> None:
        self.closed = self.closed or "abort"


class WireTLSTests(TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.queue = SendQueue(self.reactor)
        ours, self.peer = small_socket_pair(self)
        ca_key, ca = make_ca("lgmt-proxy test CA")
        key_pem, cert_pem = make_leaf(ca_key, ca, "localhost")
        ctx = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options().getContext()
        self.server = SSL.Connection(ctx, self.peer)
        self.server.set_accept_state()
        self.app = _App(self.queue)
        self.wire = WireTLS(
            self.reactor, ClientTLS("localhost", trust_root(pem(ca))), self.queue, self.app
        )
        self.tcp = _TCP(ours)
        self.wire.makeConnection(self.tcp)
        self.addCleanup(
            lambda: self.wire.abortConnection()
        )  # a lambda: compiled methods have no __name__

    def descriptor(self) -> Any:
        (wire,) = self.reactor.getReaders()
        return wire

    def pump(self) -> None:
        """Let both ends move: the server handshakes or reads, our side
        reads, writes its backlog and sends the queued turn."""
        for _ in range(200):
            try:
                self.server.do_handshake()
            except SSL.WantReadError:
                pass
            for wire in list(self.reactor.getReaders()):
                wire.doRead()
            for wire in list(self.reactor.getWriters()):
                wire.doWrite()
            self.reactor.advance(0)

    def server_read(self) -> bytes:
        got = bytearray()
        while True:
            try:
                got += self.server.recv(65536)
            except SSL.WantReadError:
                return bytes(got)

    def test_reading_moved_to_the_duplicate(self) -> None:
        self.assertEqual(self.tcp.producerState, "paused")  # Twisted reads nothing
        wire = self.descriptor()
        self.assertNotEqual(wire.fileno(), self.tcp.sock.fileno())
        self.assertIs(self.app.transport, self.app.sender)

    def test_writes_wait_for_the_handshake_then_go_in_order(self) -> None:
        self.app.transport.write(b"early ")
        self.reactor.advance(0)
        self.assertFalse(self.app.shook)
        self.pump()
        self.assertTrue(self.app.shook)
        self.app.transport.write(b"late")
        self.reactor.advance(0)
        self.assertEqual(self.server_read(), b"early late")

    def test_a_backlog_is_retried_with_the_same_bytes_then_the_rest(self) -> None:
        self.pump()
        first = bytes(range(256)) * 1024  # 256 KiB: far over the 4 KiB buffers
        self.app.transport.write(first)
        self.reactor.advance(0)
        self.assertTrue(self.app.sender.backed_up)
        self.app.transport.write(b"after")  # joins the backlog, never overtakes it
        self.reactor.advance(0)
        got = bytearray()
        for _ in range(2000):
            got += self.server_read()
            for wire in list(self.reactor.getWriters()):
                wire.doWrite()
            if not self.app.sender.backed_up and len(got) >= len(first) + 5:
                break
        got += self.server_read()
        self.assertEqual(bytes(got), first + b"after")

    def test_close_notify_closes_cleanly(self) -> None:
        self.pump()
        self.server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        self.server.shutdown()
        self.descriptor().doRead()
        self.assertEqual(bytes(self.app.got), b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.tcp.closed, "lose")
        self.assertEqual(self.reactor.getReaders(), [])
        self.wire.connectionLost(Failure(ConnectionDone()))
        assert self.app.reason is not None
        self.assertTrue(self.app.reason.check(ConnectionDone))

    def test_eof_without_close_notify_is_a_lost_connection(self) -> None:
        self.pump()
        self.peer.shutdown(socket.SHUT_WR)
        self.descriptor().doRead()
        self.wire.connectionLost(Failure(ConnectionDone()))
        assert self.app.reason is not None
        self.assertTrue(self.app.reason.check(ConnectionLost), self.app.reason)

    def test_garbage_is_a_tls_failure(self) -> None:
        self.pump()
        self.peer.send(b"\x17\x03\x03\x00\x05hello")  # a record nobody encrypted
        self.descriptor().doRead()
        self.wire.connectionLost(Failure(ConnectionDone()))
        assert self.app.reason is not None
        self.assertTrue(self.app.reason.check(SSL.Error), self.app.reason)


class NotASocketTests(TestCase):
    def test_without_a_socket_the_connection_fails(self) -> None:
        reactor = MemoryReactorClock()
        queue = SendQueue(reactor)
        app = _App(queue)
        _, ca = make_ca("lgmt-proxy test CA")
        wire = WireTLS(reactor, ClientTLS("localhost", trust_root(pem(ca))), queue, app)
        tcp = StringTransport()
        wire.makeConnection(tcp)
        self.assertTrue(tcp.disconnecting)
        self.assertEqual(tcp.value(), b"")
        wire.connectionLost(Failure(ConnectionDone()))
        assert app.reason is not None
        self.assertTrue(app.reason.check(ConnectError))


class LostReasonTests(TestCase):
    """What the application hears for OpenSSL's errors on the wire: as
    Twisted's TLS layer says it, a peer gone without ``close_notify`` is a
    lost connection, anything else the TLS error itself."""

    def test_reset_and_eof_are_lost_connections(self) -> None:
        for error in (
            SSL.SysCallError(104, "ECONNRESET"),
            SSL.SysCallError(-1, "Unexpected EOF"),
            SSL.Error([("SSL routines", "", "unexpected eof while reading")]),
            SSL.Error([]),
        ):
            self.assertTrue(lost_reason(error).check(ConnectionLost), error)

    def test_other_errors_are_themselves(self) -> None:
        error = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
        self.assertIs(lost_reason(error).value, error)
