"""`lgmt_proxy.io.sending` on real sockets (a connected pair) and a fake
reactor: what goes out, when, in what order, and what happens when the
kernel takes only part of it. The proxy's loopback tests (test_streaming,
test_proxy) cover the same code through the whole data plane."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lgmt_proxy.io.reading import Hold, ReadGate
from lgmt_proxy.io.sending import HIGH_WATER, Sender, SendQueue
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
        first, first_transport = self.sender(0)
        second, _ = self.sender(1)
        first.write(b"one")
        second.write(b"two")

        def broken() -> None:
            raise OSError("no descriptors left")

        first.flush = broken  # type: ignore[method-assign]
        self.reactor.advance(0)
        self.assertEqual(self.socks[1][1].recv(10), b"two")
        self.assertEqual(first_transport.calls, ["abortConnection"])
        self.flushLoggedErrors(OSError)
