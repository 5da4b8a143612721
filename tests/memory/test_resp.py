"""The Redis protocol in memory: pipelined commands, replies in order,
errors as `RedisError`, a stream that cannot be trusted aborted; the pool
stopped mid-handshake leaves nothing behind."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.ratelimit import RedisSettings
from lgmt_proxy.config.secret import Secret
from lgmt_proxy.io.sending import SendQueue
from lgmt_proxy.limits.resp import NotConnected, RedisError, RedisPool, RespProtocol, encode
from lgmt_proxy.limits.shared import error_reason


def connected() -> tuple[RespProtocol, StringTransport, Clock]:
    clock = Clock()
    protocol = RespProtocol(SendQueue(clock))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


class RespTests(TestCase):
    def test_encode(self) -> None:
        self.assertEqual(
            encode(b"GET", "k", 2, 0.5), b"*4\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\n2\r\n$3\r\n0.5\r\n"
        )

    def test_pipelined_in_order(self) -> None:
        protocol, transport, clock = connected()
        results: list[Any] = []
        protocol.command("PING").addBoth(results.append)
        protocol.command("EVALSHA", "x", 0).addBoth(results.append)
        protocol.command("GET", "k").addBoth(results.append)
        clock.advance(0)
        self.assertEqual(transport.value().count(b"*"), 3)  # all written, none answered
        self.assertEqual(protocol.in_flight, 3)
        protocol.dataReceived(b"+PONG\r\n-NOSCRIPT No matching script\r\n$2")
        self.assertEqual(results[0], b"PONG")
        self.assertEqual(results[1].value.kind, "NOSCRIPT")
        self.assertEqual(error_reason(results[1].value), "error")
        protocol.dataReceived(b"\r\nhi\r\n")
        self.assertEqual(results[2], b"hi")
        self.assertFalse(transport.disconnecting)

    def test_unasked_reply_aborts(self) -> None:
        protocol, transport, _ = connected()
        protocol.dataReceived(b"+OK\r\n")
        self.assertTrue(transport.disconnecting)

    def test_lost_fails_waiting(self) -> None:
        protocol, _, _ = connected()
        results: list[Any] = []
        protocol.command("PING").addErrback(results.append)
        protocol.connectionLost()
        self.assertIsInstance(results[0].value, NotConnected)
        self.assertEqual(error_reason(results[0].value), "connect")
        protocol.command("PING").addErrback(results.append)
        self.assertIsInstance(results[1].value, NotConnected)

    def test_reasons(self) -> None:
        self.assertEqual(error_reason(RedisError("OOM command not allowed")), "oom")
        self.assertEqual(error_reason(RedisError("READONLY You can't write")), "readonly")
        self.assertEqual(error_reason(RedisError("WRONGPASS invalid")), "auth")
        self.assertEqual(error_reason(RedisError("NOAUTH Authentication required.")), "auth")


class PoolTests(TestCase):
    def test_stopped_during_the_handshake(self) -> None:
        """Nothing left behind: no handshake timer, no reply nobody handles."""
        reactor = MemoryReactorClock()
        settings = RedisSettings("127.0.0.1", password=Secret("pw"))
        errors: list[str] = []
        pool = RedisPool(reactor, reactor, settings, on_error=errors.append, on_up=lambda: None,
                         size=1)  # fmt: skip
        pool.start()
        reactor.advance(0)
        ((_, _, factory, _, _),) = reactor.tcpClients
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        reactor.advance(0)
        self.assertIn(b"AUTH", transport.value())
        pool.stop()
        protocol.connectionLost(Failure(ConnectionDone()))
        gc.collect()
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(errors, [])
        self.assertFalse(pool.ready)
