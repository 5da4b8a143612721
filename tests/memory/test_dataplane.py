"""The data plane's framing, pool, retry and failure rules, in memory: the real
`ClientConnection`, `Exchange` and `UpstreamPool` over `StringTransport`s on a
fake clock. Each defect the issue that introduced this data plane listed has
a test here that failed on the twisted.web/Agent build."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lgmt_proxy.io.timers import IdleTimer
from tests.support.memory import MemoryEndpoint, MemoryProxy, sent_requests, small_socket_pair

GET = b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def open_upstreams(endpoint: MemoryEndpoint) -> list[StringTransport]:
    return [t for _, t in endpoint.connections if not t.disconnecting]


class TargetTests(TestCase):
    def test_high_bytes_in_target_leak_no_connection(self) -> None:
        # The Agent took a pooled connection, then refused the target and
        # never gave it back: 260 such requests exhausted 256 fds.
        proxy = MemoryProxy()
        for i in range(300):
            target = b"/loki/api/v1/query?q=%c" % (0x80 + i % 128) if i % 2 else b"/loki/\xff%d" % i
            _proto, transport = proxy.send(b"GET " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n")
            endpoint = proxy.endpoints["loki"]
            if endpoint.connections and not transport.value():
                up, _ = proxy.upstream("loki")
                if up.sink is not None:
                    up.dataReceived(OK)
            self.assertIn(status(transport.value()), (200, 400), transport.value()[:200])
        self.assertLessEqual(len(open_upstreams(proxy.endpoints["loki"])), 1)


class RequestFramingTests(TestCase):
    def test_transfer_encoding_identity_refused(self) -> None:
        proxy = MemoryProxy()
        for head in (
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: identity\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            # Alone, it made the body parse as a second, forwarded request.
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: identity\r\n\r\n"
            b"GET /loki/smuggled HTTP/1.1\r\nHost: p\r\n\r\n",
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
        ):
            _, transport = proxy.send(head)
            self.assertIn(status(transport.value()), (400, 501), transport.value()[:200])
            self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.calls(), [])

    def test_declared_body_never_sent_gets_408(self) -> None:
        proxy = MemoryProxy(UPSTREAM_TIMEOUT_SECONDS="10", CLIENT_IDLE_TIMEOUT_SECONDS="60")
        _, transport = proxy.send(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\n"
        )
        proxy.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        proxy.clock.advance(0.2)
        self.assertEqual(status(transport.value()), 408, transport.value())
        self.assertTrue(transport.disconnecting)
        # The upstream never got a complete body: its connection was cut.
        self.assertEqual(open_upstreams(proxy.endpoints["loki"]), [])

    def test_upload_held_while_connecting_times_out_504_not_408(self) -> None:
        # The client sent part of its body and is paused while the upstream
        # connection is still being made: the timeout is the upstream's.
        proxy = MemoryProxy(
            UPSTREAM_TIMEOUT_SECONDS="2",
            UPSTREAM_CONNECT_TIMEOUT_SECONDS="30",
            CLIENT_IDLE_TIMEOUT_SECONDS="600",
        )
        proxy.endpoints["loki"].hold = True
        _, transport = proxy.send(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nhalf"
        )
        proxy.clock.advance(2.1)
        self.assertEqual(status(transport.value()), 504, transport.value())

    def test_each_keep_alive_request_gets_the_whole_upstream_timeout(self) -> None:
        # One timer serves a connection's requests in turn: the second request
        # still gets its full UPSTREAM_TIMEOUT_SECONDS from its own start, not
        # what the first request's timer call had left.
        proxy = MemoryProxy(UPSTREAM_TIMEOUT_SECONDS="10", CLIENT_IDLE_TIMEOUT_SECONDS="600")
        client, transport = proxy.send(GET)
        proxy.upstream("loki")[0].dataReceived(OK)
        self.assertEqual(status(transport.value()), 200)
        transport.clear()
        proxy.clock.advance(7)
        client.dataReceived(GET)  # the upstream never answers this one
        proxy.clock.advance(9.9)
        self.assertEqual(transport.value(), b"", "timed out before its own 10 s")
        proxy.clock.advance(0.2)
        self.assertEqual(status(transport.value()), 504, transport.value())

        # A connection that closes leaves no timer call behind.
        def timers() -> list[object]:
            return [
                c
                for c in proxy.clock.getDelayedCalls()
                if c.active() and isinstance(getattr(c.func, "__self__", None), IdleTimer)
            ]

        self.assertEqual(timers(), [], "the timed-out run left its call")
        client, transport = proxy.send(GET)
        self.assertEqual(len(timers()), 1)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(timers(), [], "a closed connection's timer call is still pending")

    def test_head_written_once(self) -> None:
        proxy = MemoryProxy()
        proxy.send(b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhel")
        _, up = proxy.upstream("loki")
        self.assertEqual(up.value().count(b"POST "), 1)
        self.assertTrue(up.value().endswith(b"\r\n\r\nhel"), up.value())


class ResponseFramingTests(TestCase):
    def answer(self, raw: bytes, **extra: str) -> tuple[StringTransport, StringTransport]:
        proxy = MemoryProxy(**extra)
        _, client = proxy.send(GET)
        proto, up = proxy.upstream("loki")
        proto.dataReceived(raw)
        return client, up

    def test_bare_cr_in_reason_phrase_is_502(self) -> None:
        # It reached the client as a line break: an upstream-made header line.
        client, _ = self.answer(b"HTTP/1.1 200 OK\rSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(status(client.value()), 502, client.value())
        self.assertNotIn(b"Set-Cookie", client.value())

    def test_invalid_status_codes_are_502(self) -> None:
        for line in (b"HTTP/1.1 -12 X", b"HTTP/1.1 2_0 X", b"HTTP/1.1 999 X", b"HTTP/1.1 20 X"):
            client, up = self.answer(line + b"\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(status(client.value()), 502, (line, client.value()))
            self.assertTrue(up.disconnecting)

    def close_delimited(self, body: bytes, ending: Exception) -> StringTransport:
        """A response with no length, its body ``body`` ended by ``ending``:
        what the client's transport got."""
        proxy = MemoryProxy()
        _proto, client = proxy.send(GET)
        up_proto, _ = proxy.upstream("loki")
        up_proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        up_proto.connectionLost(Failure(ending))
        return client

    def test_close_delimited_body_cut_by_reset_aborts_client(self) -> None:
        client = self.close_delimited(b"partial", ConnectionLost())
        self.assertIn(b"partial", client.value())
        self.assertFalse(client.value().endswith(b"0\r\n\r\n"), client.value())
        self.assertTrue(client.disconnecting)

    def test_close_delimited_body_ended_cleanly_completes(self) -> None:
        client = self.close_delimited(b"whole", ConnectionDone())
        self.assertTrue(client.value().endswith(b"5\r\nwhole\r\n0\r\n\r\n"), client.value())
        self.assertFalse(client.disconnecting)

    def test_response_head_written_once_with_length(self) -> None:
        client, _ = self.answer(OK)
        self.assertEqual(client.value().count(b"HTTP/1.1 "), 1)
        self.assertIn(b"Content-Length: 2\r\n", client.value())
        self.assertTrue(client.value().endswith(b"\r\n\r\nok"))

    def test_interim_response_not_relayed(self) -> None:
        client, _ = self.answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK\r\n"), client.value())

    def test_head_response_with_length_ends_and_connection_reused(self) -> None:
        proxy = MemoryProxy()
        _, client = proxy.send(b"HEAD /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n")
        proto, _up = proxy.upstream("loki")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        self.assertIn(b"Content-Length: 1234", client.value())
        self.assertTrue(client.value().endswith(b"\r\n\r\n"))
        proxy.send(GET)
        proto.dataReceived(OK)
        self.assertEqual(len(proxy.endpoints["loki"].connections), 1)


class PoolTests(TestCase):
    def test_most_recently_used_connection_first(self) -> None:
        proxy = MemoryProxy()
        first = [proxy.send(GET) for _ in range(2)]  # two at once: two connections
        conns = proxy.endpoints["loki"].connections
        self.assertEqual(len(conns), 2)
        conns[0][0].dataReceived(OK)
        proxy.clock.advance(1)
        conns[1][0].dataReceived(OK)  # released last: handed out first
        self.assertEqual([status(t.value()) for _, t in first], [200, 200])
        proxy.send(GET)
        self.assertEqual(len(conns), 2)
        self.assertEqual(sent_requests(conns[1][1].value())[-1][1], b"/loki/api/v1/labels")
        self.assertEqual(len(sent_requests(conns[1][1].value())), 2)
        self.assertEqual(len(sent_requests(conns[0][1].value())), 1)

    def test_idle_timeout_closes_connections(self) -> None:
        proxy = MemoryProxy(UPSTREAM_IDLE_TIMEOUT_SECONDS="30")
        proxy.send(GET)
        proto, up = proxy.upstream("loki")
        proto.dataReceived(OK)
        proxy.clock.advance(29)
        self.assertFalse(up.disconnecting)
        proxy.clock.advance(2)
        self.assertTrue(up.disconnecting)
        proxy.send(GET)
        self.assertEqual(len(proxy.endpoints["loki"].connections), 2)

    def test_bytes_on_an_idle_connection_close_it(self) -> None:
        proxy = MemoryProxy()
        proxy.send(GET)
        proto, up = proxy.upstream("loki")
        proto.dataReceived(OK)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
        self.assertTrue(up.disconnecting)
        _, client = proxy.send(GET)
        self.assertEqual(len(proxy.endpoints["loki"].connections), 2)
        self.assertNotIn(b"stray", client.value())

    def test_extra_bytes_after_a_response_never_reach_the_next_client(self) -> None:
        proxy = MemoryProxy()
        _, first = proxy.send(GET)
        proto, up = proxy.upstream("loki")
        proto.dataReceived(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        self.assertTrue(first.value().endswith(b"\r\n\r\nok"), first.value())
        self.assertTrue(up.disconnecting)
        _, second = proxy.send(GET)
        self.assertEqual(second.value(), b"")
        self.assertEqual(len(proxy.endpoints["loki"].connections), 2)

    def test_dropped_reused_connection_retried_once_for_get(self) -> None:
        proxy = MemoryProxy()
        proxy.send(GET)
        proto, _ = proxy.upstream("loki")
        proto.dataReceived(OK)
        _, client = proxy.send(GET)  # goes out on the kept connection...
        proto.connectionLost(Failure(ConnectionDone()))  # ...which the upstream had closed
        conns = proxy.endpoints["loki"].connections
        self.assertEqual(len(conns), 2)
        conns[1][0].dataReceived(OK)
        self.assertEqual(status(client.value()), 200, client.value())

    def test_dropped_reused_connection_not_retried_for_post(self) -> None:
        proxy = MemoryProxy()
        proxy.send(GET)
        proto, _ = proxy.upstream("loki")
        proto.dataReceived(OK)
        _, client = proxy.send(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nhi"
        )
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(proxy.endpoints["loki"].connections), 1)
        self.assertEqual(status(client.value()), 502, client.value())

    def test_client_gone_during_tls_handshake_aborts_it(self) -> None:
        # The handshake went on (and held an fd) after the client left.
        proxy = MemoryProxy()
        proxy.endpoints["loki"].handshake = False
        proto, _client = proxy.send(GET)
        ((_, up),) = proxy.endpoints["loki"].connections
        self.assertFalse(up.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(up.disconnecting)

    def test_client_gone_while_connecting_cancels(self) -> None:
        proxy = MemoryProxy()
        proxy.endpoints["loki"].hold = True
        proto, _ = proxy.send(GET)
        self.assertEqual(len(proxy.endpoints["loki"].pending), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(proxy.endpoints["loki"].cancelled, 1)

    def test_connect_deadline_covers_the_handshake(self) -> None:
        proxy = MemoryProxy(UPSTREAM_CONNECT_TIMEOUT_SECONDS="5")
        proxy.endpoints["loki"].handshake = False
        _, client = proxy.send(GET)
        ((_, up),) = proxy.endpoints["loki"].connections
        proxy.clock.advance(5.1)
        self.assertTrue(up.disconnecting)
        self.assertEqual(status(client.value()), 504, client.value())


class PipeliningTests(TestCase):
    def test_pipelined_requests_answered_in_order(self) -> None:
        proxy = MemoryProxy()
        second = b"GET /loki/api/v1/second HTTP/1.1\r\nHost: p\r\n\r\n"
        _, client = proxy.send(GET + second)
        proto, up = proxy.upstream("loki")
        self.assertEqual(len(sent_requests(up.value())), 1)  # the second waits
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        (proto2, up2) = proxy.endpoints["loki"].connections[-1]
        last = proto2 if len(sent_requests(up2.value())) else proto
        last.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        value = client.value()
        self.assertLess(value.index(b"first"), value.index(b"second"), value)

    def test_reading_paused_while_a_pipelined_request_waits_its_turn(self) -> None:
        proxy = MemoryProxy()
        second = b"GET /loki/api/v1/second HTTP/1.1\r\nHost: p\r\n\r\n"
        _, client = proxy.send(GET + second)
        self.assertEqual(client.producerState, "paused")
        proto, _up = proxy.upstream("loki")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        # The second is being answered now: nothing holds reading any more.
        self.assertEqual(client.producerState, "producing")


class _SocketTransport(StringTransport):
    """A client transport whose bytes go to a real socket (one end of a
    pair), so the proxy's `Sender` writes to it directly, as on a real
    connection."""

    def __init__(self, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sock = sock
        self.aborted = False

    def getHandle(self) -> socket.socket:
        return self.sock

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class StalledClientTests(TestCase):
    def test_client_that_never_takes_the_answers_tail_is_cut(self) -> None:
        # The answer is complete and the connection closing, its tail still
        # in the proxy's backlog: a client that takes nothing for a whole
        # CLIENT_IDLE_TIMEOUT_SECONDS is cut, not waited for for ever.
        proxy = MemoryProxy(CLIENT_IDLE_TIMEOUT_SECONDS="5")
        ours, _peer = small_socket_pair(self)
        address = IPv4Address("TCP", "10.1.2.3", 4321)
        transport = _SocketTransport(ours, peerAddress=address)
        client = proxy.factory.buildProtocol(address)
        client.makeConnection(transport)
        client.dataReceived(b"GET /loki/api/v1/query_range HTTP/1.0\r\nHost: p\r\n\r\n")
        body = b"y" * (1024 * 1024)
        proxy.upstream("loki")[0].dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        proxy.clock.advance(0)  # the turn's writes go out: most stay in the backlog
        self.assertTrue(client.out.backed_up)
        self.assertFalse(transport.aborted)
        proxy.clock.advance(4)
        self.assertFalse(transport.aborted, "cut before its idle timeout")
        proxy.clock.advance(2)
        self.assertTrue(transport.aborted, "still waiting for a client that takes nothing")
        client.connectionLost(Failure(ConnectionLost()))
