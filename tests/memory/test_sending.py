"""`lgmt_proxy.io.sending` on real sockets (a connected pair) and a fake
reactor: what goes out, when, in what order, and what happens when the
kernel takes only part of it. The proxy's loopback tests (test_streaming,
test_proxy) cover the same code through the whole data plane."""

from __future__ import annotations

import os
import socket
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lgmt_proxy.dataplane.upstream import trust_root
from lgmt_proxy.io.reading import Hold, ReadGate
from lgmt_proxy.io.sending import HIGH_WATER, Sender, SendQueue
from lgmt_proxy.io.tls import ClientTLS, TLSCarrier
from tests.loopback.test_tls import make_ca, make_leaf, pem
from tests.support.memory import small_socket_pair


class FakeTransport:
    """The calls a `Sender` makes on its transport, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")

    def pauseProducing(self) -> None:
        self.calls.append("pauseProducing")


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")


def received(sock: socket.socket) -> bytes:
    """Everything the kernel holds for ``sock`` now."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class SenderTests(TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.queue = SendQueue(self.reactor)
        ours, self.peer = small_socket_pair(self)
        self.transport = FakeTransport()
        self.sender = Sender(self.transport, self.queue, ours)
        # Lambdas: trial names a cleanup by its __name__, which a method
        # compiled by mypyc (make venv-compiled) does not have.
        self.addCleanup(lambda: self.sender.connection_lost())

    def test_writes_of_a_turn_go_out_together_at_the_next(self) -> None:
        self.sender.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.sender.write(b"body")
        self.assertEqual(received(self.peer), b"", "sent before the turn ended")
        self.reactor.advance(0)
        self.assertEqual(received(self.peer), b"HTTP/1.1 200 OK\r\n\r\nbody")
        self.assertEqual(self.reactor.getWriters(), [], "registered for writing without need")

    def test_short_write_keeps_the_rest_in_order(self) -> None:
        data = os.urandom(3 * HIGH_WATER)
        for i in range(0, len(data), 1000):
            self.sender.write(data[i : i + 1000])
        self.reactor.advance(0)
        got = received(self.peer)
        self.assertLess(len(got), len(data), "the kernel took everything: no backlog to test")
        self.assertEqual(len(self.reactor.getWriters()), 1, "backlog not watched for room")
        self.sender.write(b"after")
        self.reactor.advance(0)
        while len(got) < len(data) + 5:
            (watch,) = self.reactor.getWriters()
            watch.doWrite()
            got += received(self.peer)
        self.assertEqual(got, data + b"after")
        self.assertEqual(self.reactor.getWriters(), [], "still watching once drained")

    def test_producer_paused_over_high_water_resumed_when_drained(self) -> None:
        producer = Producer()
        self.sender.register_producer(producer)
        self.sender.write(os.urandom(HIGH_WATER // 2))
        self.reactor.advance(0)
        self.assertEqual(producer.events, [], "paused under the high-water mark")
        self.sender.write(os.urandom(2 * HIGH_WATER))
        self.reactor.advance(0)
        self.assertEqual(producer.events, ["pause"])
        while self.reactor.getWriters():
            received(self.peer)
            self.reactor.getWriters()[0].doWrite()
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_unregistering_a_paused_producer_resumes_it(self) -> None:
        # A pooled upstream connection left paused would never read again.
        producer = Producer()
        self.sender.register_producer(producer)
        self.sender.write(os.urandom(3 * HIGH_WATER))
        self.reactor.advance(0)
        self.sender.unregister_producer()
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_close_waits_for_the_backlog(self) -> None:
        data = os.urandom(3 * HIGH_WATER)
        self.sender.write(data)
        self.sender.close()
        self.assertIn("pauseProducing", self.transport.calls, "kept reading while closing")
        self.assertNotIn("loseConnection", self.transport.calls, "closed with bytes unsent")
        got = received(self.peer)
        while self.reactor.getWriters():
            self.reactor.getWriters()[0].doWrite()
            got += received(self.peer)
        self.assertEqual(got, data)
        self.assertEqual(self.transport.calls[-1], "loseConnection")

    def test_abort_drops_the_backlog_and_the_duplicate(self) -> None:
        self.sender.write(os.urandom(3 * HIGH_WATER))
        self.reactor.advance(0)
        (watch,) = self.reactor.getWriters()
        fd = watch.fileno()
        self.sender.abort()
        self.assertEqual(self.transport.calls, ["abortConnection"])
        self.assertEqual(self.reactor.getWriters(), [])
        with self.assertRaises(OSError):
            os.fstat(fd)  # the duplicate descriptor is closed
        self.sender.write(b"late")
        self.reactor.advance(0)
        self.assertEqual(self.transport.written, [])

    def test_installed_as_the_transport_nothing_writes_around_it(self) -> None:
        # What a protocol writes to its transport after install goes through
        # the sender, in order with what the sender holds.
        ours, peer = small_socket_pair(self)
        raw = _Socketed(ours)
        protocol = Protocol()
        protocol.makeConnection(raw)
        sender = self.queue.install(protocol)
        self.addCleanup(lambda: sender.connection_lost())
        self.assertIs(protocol.transport, sender)
        self.assertTrue(sender.direct)
        sender.write(b"head ")
        assert protocol.transport is not None
        protocol.transport.write(b"body")
        self.reactor.advance(0)
        self.assertEqual(received(peer), b"head body")
        self.assertEqual(raw.value(), b"", "written around the sender")

    def test_a_broken_connection_is_aborted(self) -> None:
        self.peer.close()
        self.sender.write(b"x")
        self.reactor.advance(0)
        self.assertEqual(self.transport.calls, ["abortConnection"])


class _Socketed(StringTransport):
    """A transport over a real socket, as a TCP transport hands out."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class ReadGateTests(TestCase):
    def test_resumed_only_when_no_reason_is_left(self) -> None:
        transport = StringTransport()
        gate = ReadGate(transport)
        gate.hold(Hold.QUEUED)
        self.assertEqual(transport.producerState, "paused")
        gate.pauseProducing()  # a peer's backlog, for another reason
        gate.release(Hold.REQUEST)
        self.assertEqual(transport.producerState, "paused", "resumed under a backlog")
        gate.release(Hold.REQUEST)  # nothing of that left: no effect
        gate.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(gate.held, 0)

    def test_written_through_unregistering_resumes_a_gate_the_transport_paused(self) -> None:
        # A TLS transport pauses its producer itself and does not resume it
        # when it is unregistered: a pooled connection would never read again.
        consumer = StringTransport()
        sender = SendQueue(MemoryReactorClock()).sender(consumer)
        source = StringTransport()
        gate = ReadGate(source)
        sender.register_producer(gate)
        self.assertIs(consumer.producer, gate)
        gate.pauseProducing()  # the consumer's buffer is full
        self.assertEqual(source.producerState, "paused")
        sender.unregister_producer()
        self.assertIsNone(consumer.producer)
        self.assertEqual(source.producerState, "producing")


class ThroughTransportTests(TestCase):
    def test_not_a_socket_is_written_through(self) -> None:
        reactor = MemoryReactorClock()
        transport: Any = StringTransport()
        sender = SendQueue(reactor).sender(transport)
        self.assertFalse(sender.direct)
        sender.write(b"now")
        self.assertEqual(transport.value(), b"now")
        sender.close()
        self.assertTrue(transport.disconnecting)


class UnixSocketTests(TestCase):
    def test_unix_socket_sent_directly_without_tcp_options(self) -> None:
        # A listener on a Unix socket (``--listen unix:...``) has no Nagle to
        # turn off; it is still sent to directly.
        reactor = MemoryReactorClock()
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)

        class UnixTransport(FakeTransport):
            def getHandle(self) -> socket.socket:
                return ours

            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError("not a TCP socket")

        sender = SendQueue(reactor).sender(UnixTransport())
        self.assertTrue(sender.direct)
        sender.write(b"ok")
        reactor.advance(0)
        self.assertEqual(peer.recv(10), b"ok")


class FakeTLS:
    """A TLS layer's surface, recorded: each write is "encrypted" into two
    records, each handed to the carrier as `TLSMemoryBIOProtocol` does."""

    def __init__(self) -> None:
        self.plaintext: list[bytes] = []
        self.calls: list[str] = []
        self.transport: TLSCarrier

    def getHandle(self) -> None:
        return None  # no OpenSSL connection: every write goes through here

    def write(self, data: bytes) -> None:
        self.plaintext.append(data)
        self.transport.write(b"<" + data + b">")
        self.transport.write(b"|")

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")
        self.transport.write(b"close_notify")

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")
        self.transport.abortConnection()


class TLSRecordTests(TestCase):
    """TLS over a `TLSCarrier` on a socket: the plaintext of a turn goes
    through the TLS layer in one write, its records out in one send."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        ours, self.peer = small_socket_pair(self)

        class TCP(FakeTransport):
            def getHandle(self) -> socket.socket:
                return ours

        self.tcp = TCP()
        self.tls = FakeTLS()
        self.carrier = TLSCarrier(self.tls)  # type: ignore[arg-type]
        self.carrier.transport = self.tcp  # type: ignore[assignment]
        self.tls.transport = self.carrier
        self.sender = SendQueue(self.reactor).sender(self.tls)
        self.addCleanup(lambda: self.sender.connection_lost())

    def test_a_turns_plaintext_encrypted_once_records_sent_together(self) -> None:
        self.assertTrue(self.sender.direct and self.sender.tls)
        self.assertIs(self.carrier.sink, self.sender)
        self.sender.write(b"GET / HTTP/1.1\r\n\r\n")
        self.sender.write(b"body")
        self.assertEqual(self.tls.plaintext, [], "encrypted before the turn ended")
        self.reactor.advance(0)
        self.assertEqual(self.tls.plaintext, [b"GET / HTTP/1.1\r\n\r\nbody"])
        self.assertEqual(received(self.peer), b"<GET / HTTP/1.1\r\n\r\nbody>|")
        self.assertEqual(self.tcp.written, [], "written around the sender")

    def test_records_made_outside_a_turns_writes_go_out_next_turn(self) -> None:
        # A handshake message, made while reading: queued like any write.
        self.carrier.write(b"ClientHello")
        self.assertEqual(received(self.peer), b"")
        self.reactor.advance(0)
        self.assertEqual(received(self.peer), b"ClientHello")

    def test_backlog_of_records_is_backed_up_and_sent_in_order(self) -> None:
        # What tells 504 (the upstream stopped reading) from 408; the records
        # the kernel did not take (of a gathered send) follow in order.
        data = os.urandom(3 * HIGH_WATER)
        self.sender.write(data)
        self.reactor.advance(0)
        self.assertTrue(self.sender.backed_up)
        self.assertEqual(len(self.reactor.getWriters()), 1)
        self.carrier.write(b"late")  # a record made after the backlog formed
        self.reactor.advance(0)
        got = b""
        while self.reactor.getWriters():
            got += received(self.peer)
            self.reactor.getWriters()[0].doWrite()
        got += received(self.peer)
        self.assertEqual(got, b"<" + data + b">|late")
        self.assertFalse(self.sender.backed_up)

    def test_close_goes_through_the_tls_layer_then_waits_for_the_records(self) -> None:
        self.sender.write(os.urandom(3 * HIGH_WATER))
        self.sender.close()
        self.assertEqual(self.tls.calls, ["loseConnection"])
        self.assertEqual(self.tcp.calls, [], "TCP closed before TLS finished")
        self.carrier.loseConnection()  # the TLS layer is done
        self.assertEqual(self.tcp.calls, ["pauseProducing"], "closed with records unsent")
        got = b""
        while self.reactor.getWriters():
            got += received(self.peer)
            self.reactor.getWriters()[0].doWrite()
        got += received(self.peer)
        self.assertTrue(got.endswith(b">|close_notify"), got[-20:])
        self.assertEqual(self.tcp.calls, ["pauseProducing", "loseConnection"])

    def test_abort_drops_the_records_and_cuts_the_socket(self) -> None:
        self.sender.write(b"unsent")
        self.sender.abort()
        self.reactor.advance(0)
        self.assertEqual(received(self.peer), b"")
        self.assertEqual(self.tls.calls, ["abortConnection"])
        self.assertEqual(self.tcp.calls, ["abortConnection"])

    def test_without_a_socket_the_carrier_writes_to_its_transport(self) -> None:
        # TLS inside TLS (an https forward proxy): nothing to send on directly.
        tls = FakeTLS()
        carrier = TLSCarrier(tls)  # type: ignore[arg-type]
        below = FakeTransport()
        carrier.transport = below  # type: ignore[assignment]
        tls.transport = carrier
        sender = SendQueue(self.reactor).sender(tls)
        self.assertFalse(sender.direct)
        sender.write(b"x")
        self.assertEqual(below.written, [b"<x>", b"|"])


@implementer(IHandshakeListener)
class _Upstream(Protocol):
    """The application protocol over a client TLS layer, as the pool's is."""

    def __init__(self, queue: SendQueue) -> None:
        self.queue = queue
        self.handshaken = False

    def connectionMade(self) -> None:
        self.sender = self.queue.install(self)

    def handshakeCompleted(self) -> None:
        self.handshaken = True


class _Server(Protocol):
    def __init__(self) -> None:
        self.got = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.got += data


class _ServerWire:
    """The server TLS layer's transport: its records go to the client's carrier."""

    def __init__(self) -> None:
        self.carrier: TLSCarrier

    def write(self, data: bytes) -> None:
        self.carrier.dataReceived(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        pass

    def abortConnection(self) -> None:
        pass

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None


class RealTLSTests(TestCase):
    """Twisted's TLS layer at both ends, in memory, the client's records on
    a socket: once the handshake is done a turn's plaintext is encrypted in
    one go on the OpenSSL connection, not cut in 16 KiB writes by the layer."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        queue = SendQueue(self.reactor)
        ours, self.peer = small_socket_pair(self)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ca_key, ca = make_ca("lgmt-proxy test CA")
        key_pem, cert_pem = make_leaf(ca_key, ca, "localhost")
        server_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()

        class TCP(FakeTransport):
            def getHandle(self) -> socket.socket:
                return ours

        client = TLSMemoryBIOFactory(
            ClientTLS("localhost", trust_root(pem(ca))),
            True,
            Factory.forProtocol(lambda: _Upstream(queue)),
            self.reactor,
        )
        client.protocol = TLSMemoryBIOProtocol
        server = TLSMemoryBIOFactory(
            server_options, False, Factory.forProtocol(_Server), self.reactor
        )
        server.protocol = TLSMemoryBIOProtocol
        self.client_tls = client.buildProtocol(None)
        self.carrier = TLSCarrier(self.client_tls)
        self.server_tls = server.buildProtocol(None)
        wire = _ServerWire()
        wire.carrier = self.carrier
        self.server_tls.makeConnection(wire)
        self.carrier.makeConnection(TCP())  # type: ignore[arg-type]
        self.app: _Upstream = self.client_tls.wrappedProtocol
        self.addCleanup(lambda: self.app.sender.connection_lost())
        self.layer_writes: list[int] = []
        write = self.client_tls.write
        self.client_tls.write = lambda data: (  # type: ignore[method-assign]
            self.layer_writes.append(len(data)),
            write(data),
        )

    def pump(self) -> None:
        for _ in range(500):
            self.reactor.advance(0)
            for watch in self.reactor.getWriters():
                watch.doWrite()  # type: ignore[attr-defined]
            data = received(self.peer)
            if data:
                self.server_tls.dataReceived(data)
            elif not self.reactor.getDelayedCalls() and not self.reactor.getWriters():
                return

    def test_after_the_handshake_plaintext_skips_the_layers_write(self) -> None:
        self.pump()
        self.assertTrue(self.app.handshaken)
        body = os.urandom(200 * 1024)
        self.app.sender.write(b"POST / HTTP/1.1\r\n\r\n")
        self.app.sender.write(body)
        self.pump()
        self.assertEqual(
            bytes(self.server_tls.wrappedProtocol.got), b"POST / HTTP/1.1\r\n\r\n" + body
        )
        self.assertEqual(self.layer_writes, [], "encrypted through the layer's 16 KiB writes")

    def test_one_ssl_write_takes_a_whole_turn(self) -> None:
        # ClientTLS's context has pyOpenSSL's partial writes off: one call
        # encrypts 64 KiB, not one 16 KiB record (a quarter of the calls).
        self.pump()
        conn = self.client_tls.getHandle()
        self.assertEqual(conn.send(b"x" * 65536), 65536)
        self.assertGreater(len(conn.bio_read(128 * 1024)), 65536)

    def test_written_while_handshaking_the_layer_keeps_the_order(self) -> None:
        # Before the handshake the layer buffers; from then on it writes
        # everything, so nothing can overtake what it holds.
        self.app.sender.write(b"first ")
        self.pump()
        self.app.sender.write(b"second")
        self.pump()
        self.assertEqual(bytes(self.server_tls.wrappedProtocol.got), b"first second")
        self.assertEqual(self.layer_writes, [6, 6])


def _pump_handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Move records between two memory-BIO connections until both are done."""
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert client.get_finished() is not None and server.get_finished() is not None


class ClientTLSTests(TestCase):
    """What `ClientTLS` adds to optionsForClientTLS's policy, at the OpenSSL
    level (the verification itself: tests/loopback/test_tls.py)."""

    def connect(self, server_max: int | None = None) -> tuple[SSL.Connection, SSL.Connection]:
        ca_key, ca = make_ca("lgmt-proxy test CA")
        key_pem, cert_pem = make_leaf(ca_key, ca, "localhost")
        server_ctx = SSL.Context(SSL.TLS_METHOD)
        server_ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
        server_ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
        if server_max is not None:
            server_ctx.set_max_proto_version(server_max)
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        layer = TLSMemoryBIOFactory(
            ssl.CertificateOptions(), True, Factory.forProtocol(Protocol), self.clock
        ).buildProtocol(None)
        client = ClientTLS("localhost", trust_root(pem(ca))).clientConnectionForTLS(layer)
        client.set_connect_state()
        _pump_handshake(client, server)
        return client, server

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def test_renegotiation_refused(self) -> None:
        # TLS 1.2: the server asks to renegotiate; the client answers with an
        # alert (record type 21), never a ClientHello (22), so a write can
        # never wait half-way for a handshake.
        client, server = self.connect(server_max=SSL.TLS1_2_VERSION)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")
        self.assertTrue(server.renegotiate())
        try:
            server.do_handshake()  # writes the HelloRequest
        except SSL.WantReadError:
            pass
        client.bio_write(server.bio_read(65536))
        with self.assertRaises(SSL.Error):
            client.recv(1024)
        answer = client.bio_read(65536)
        self.assertEqual(answer[0], 21, "the client renegotiated")
        self.assertEqual(client.total_renegotiations(), 0)

    def test_sni_and_verified_leaf(self) -> None:
        client, server = self.connect()
        self.assertEqual(server.get_servername(), b"localhost")
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(client.send(b"x" * 65536), 65536)  # partial writes off


class FailureTests(TestCase):
    """What the review of the write path found: each failure must end the
    connection cleanly, whatever state the sender is in."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.queue = SendQueue(self.reactor)
        self.socks = [small_socket_pair(self) for _ in range(2)]

    def sender(self, i: int = 0) -> tuple[Sender, FakeTransport]:
        transport = FakeTransport()
        sender = Sender(transport, self.queue, self.socks[i][0])
        self.addCleanup(lambda: sender.connection_lost())
        return sender, transport

    def test_error_on_the_watched_descriptor_cuts_the_connection(self) -> None:
        # A reset arrives as an error on the duplicate (registered for
        # writing only) while the transport is not reading: the reactor calls
        # connectionLost on the duplicate, and the connection must end.
        sender, transport = self.sender()
        sender.write(os.urandom(3 * HIGH_WATER))
        sender.close()  # the transport stops reading
        (watch,) = self.reactor.getWriters()
        fd = watch.fileno()
        self.reactor.removeWriter(watch)
        watch.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(transport.calls[-1], "abortConnection")
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_connection_lost_while_paused_resumes_the_producer(self) -> None:
        sender, _ = self.sender()
        producer = Producer()
        sender.register_producer(producer)
        sender.write(os.urandom(3 * HIGH_WATER))
        self.reactor.advance(0)
        self.assertEqual(producer.events, ["pause"])
        sender.connection_lost()
        self.assertEqual(producer.events, ["pause", "resume"])
        sender.unregister_producer()  # the exchange lets go afterwards: no error

    def test_send_error_while_draining_the_backlog_aborts(self) -> None:
        sender, transport = self.sender()
        sender.write(os.urandom(3 * HIGH_WATER))
        self.reactor.advance(0)
        (watch,) = self.reactor.getWriters()
        peer = self.socks[0][1]
        peer.close()  # unread data: the next send fails
        watch.doWrite()
        self.assertEqual(transport.calls, ["abortConnection"])
        self.assertEqual(self.reactor.getWriters(), [])

    def test_one_failing_sender_does_not_stall_the_others_of_its_turn(self) -> None:
        # The first sender's flush fails as no socket error would (a bug):
        # through its socket, since a compiled Sender's methods cannot be
        # replaced.
        broken = _BrokenSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(broken.close)
        first_transport = FakeTransport()
        first = Sender(first_transport, self.queue, broken)
        self.addCleanup(lambda: first.connection_lost())
        second, _ = self.sender(1)
        first.write(b"one")
        second.write(b"two")
        self.reactor.advance(0)
        self.assertEqual(self.socks[1][1].recv(10), b"two")
        self.assertEqual(first_transport.calls, ["abortConnection"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _BrokenSocket(socket.socket):
    """A socket whose send raises what no socket error is."""

    def send(self, data: Any, flags: int = 0) -> int:
        raise RuntimeError("a bug in the send path")
