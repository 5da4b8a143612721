"""The graceful drain on a MemoryReactorClock: the service, its listener and
connections driven by a fake clock (moved from tests/loopback/test_ops.py).
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import parse_config
from lgmt_proxy.service import ProxyService
from tests.support.helpers import (
    env_for,
)


class _Socketlike(StringTransport):
    """A `StringTransport` that, like a socket, tells its protocol when it is
    closed; ``cut`` says whether that was an abort."""

    cut = False
    protocol: Any = None

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.cut = True
        self.loseConnection()


class _Reactor(MemoryReactorClock):
    """A fake reactor whose listening ports stop as real ones do (with a
    Deferred), noting the fake time at which they did."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_listening: list[float] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = super().listenTCP(port, factory, backlog, interface)

        def stop_listening() -> Deferred[None]:
            self.stopped_listening.append(self.seconds())
            return succeed(None)

        listening.stopListening = stop_listening
        return listening


class DrainClockTests(TestCase):
    """The shutdown sequence on a fake clock: /ready says draining at once,
    the listener closes after SHUTDOWN_DELAY_SECONDS, the service stops as
    soon as no connection is left, and the grace period only ever cuts the
    ones still busy. (test_rollout runs it through a real process.)"""

    def service(self) -> tuple[ProxyService, _Reactor, io.StringIO]:
        clock = _Reactor()
        config = parse_config(
            env_for(
                "http://127.0.0.1:9",
                SHUTDOWN_DELAY_SECONDS="1.5",
                SHUTDOWN_GRACE_SECONDS="5",
                UPSTREAM_CONNECT_TIMEOUT_SECONDS="600",
            )
        )
        assert config.token is not None
        out = io.StringIO()
        svc = ProxyService(
            config,
            clock,
            token=config.token,
            listen="tcp:8080:interface=127.0.0.1",
            stdout=out,
            handle_sigterm=False,
        )
        globalLogPublisher.addObserver(svc.log_observer)
        self.addCleanup(globalLogPublisher.removeObserver, svc.log_observer)
        svc.startService()
        return svc, clock, out

    def connect(self, svc: ProxyService) -> tuple[Any, _Socketlike]:
        address = IPv4Address("TCP", "10.1.2.3", 4321)
        proto = svc.proxy_factory.buildProtocol(address)
        transport = _Socketlike(peerAddress=address)
        transport.protocol = proto
        proto.makeConnection(transport)
        return proto, transport

    def test_delay_then_stopped_without_waiting_for_the_grace(self) -> None:
        svc, clock, out = self.service()
        _proto, idle = self.connect(svc)
        stopped = svc.stopService()
        self.assertTrue(svc.readiness.draining)
        clock.advance(1.4)
        self.assertEqual(clock.stopped_listening, [])  # open for the delay
        self.assertFalse(idle.disconnecting)
        clock.advance(0.1)
        self.assertEqual([round(t, 6) for t in clock.stopped_listening], [1.5])
        for _ in range(10):  # the drain's ticks
            clock.advance(0.05)
        # The idle keep-alive connection was closed (not cut) and nothing
        # waited for the 5 s grace period.
        self.assertTrue(idle.disconnecting)
        self.assertFalse(idle.cut)
        self.assertTrue(stopped.called, "no connection left, yet the grace period is waited out")
        self.assertIn('"msg":"stopped"', out.getvalue())
        self.assertNotIn("were cut", out.getvalue())

    def test_busy_connection_cut_at_the_end_of_the_grace(self) -> None:
        svc, clock, out = self.service()
        proto, busy = self.connect(svc)
        # In flight: its upstream connect never completes on the fake reactor.
        proto.dataReceived(b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n")
        stopped = svc.stopService()
        for _ in range(int((1.5 + 5 - 0.1) / 0.05)):
            clock.advance(0.05)
        self.assertEqual([round(t, 6) for t in clock.stopped_listening], [1.5])
        self.assertFalse(stopped.called)
        self.assertFalse(busy.disconnecting)
        for _ in range(4):
            clock.advance(0.05)
        self.assertTrue(busy.cut)
        self.assertTrue(stopped.called)
        self.assertIn("1 connections still busy after the grace period were cut", out.getvalue())

    def test_hurry_during_the_delay_cuts_at_once(self) -> None:
        """A second Ctrl-C (or SIGTERM) while the listener is still open for
        the delay: no more waiting, the busy connection is cut, stopped."""
        svc, clock, out = self.service()
        proto, busy = self.connect(svc)
        proto.dataReceived(b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n")
        stopped = svc.stopService()
        clock.advance(0.5)
        self.assertFalse(stopped.called)
        svc.hurry()
        clock.advance(0.05)
        self.assertEqual([round(t, 6) for t in clock.stopped_listening], [0.5])
        self.assertTrue(busy.cut)
        self.assertTrue(stopped.called)
        self.assertIn("drain cut short: 1 open connections cut", out.getvalue())
        self.assertNotIn("after the grace period", out.getvalue())
        self.assertIn('"msg":"stopped"', out.getvalue())

    def test_hurry_during_the_grace_cuts_at_once(self) -> None:
        svc, clock, out = self.service()
        proto, busy = self.connect(svc)
        proto.dataReceived(b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: p\r\n\r\n")
        stopped = svc.stopService()
        for _ in range(int((1.5 + 1) / 0.05)):  # the delay, then 1 s of the 5 s grace
            clock.advance(0.05)
        self.assertFalse(stopped.called)
        self.assertFalse(busy.disconnecting)
        svc.hurry()
        clock.advance(0.05)
        self.assertTrue(busy.cut)
        self.assertTrue(stopped.called)
        self.assertIn("drain cut short: 1 open connections cut", out.getvalue())
