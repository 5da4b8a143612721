"""The data plane waiting for a shared budget, in memory: the real factory
and dispatcher, a fake Redis pool, a fake clock. While Redis decides,
nothing goes upstream and the client's reading is held; the body bytes
already read are kept and forwarded once admitted; a refusal is a 429 with
``Retry-After``; no answer by the deadline is decided by this replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import parse_client_auth
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.shared import SharedLimiter
from lgmt_proxy.obs.metrics import ProxyMetrics
from tests.memory.test_shared_budgets import FakePool, ask_of, granted, refused
from tests.support.memory import MemoryProxy, sent_requests

TOKEN = b"team-a-token-0123456789"
PUSH = (
    b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer " + TOKEN + b"\r\n"
    b"Content-Length: 10\r\n\r\n0123456789"
)


def status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


class WaitingForRedisTests(TestCase):
    def setUp(self) -> None:
        self.proxy = MemoryProxy()
        auth = parse_client_auth(
            f"consumers: [{{name: team-a, token: {TOKEN.decode()}, allow: [{{paths: ['/*']}}], "
            "rate_limit: {requests_per_second: 1, burst: 1, bytes_per_second: 100}}]"
        )
        factory = self.proxy.factory
        factory.client_auth = lambda: auth
        self.pool = FakePool()
        clock = self.proxy.clock
        metrics = ProxyMetrics(CollectorRegistry(), process_collectors=False)
        local = LocalLimiter(clock)
        shared = SharedLimiter(clock, self.pool, local, metrics, timeout=0.05, where="redis")
        factory.budgets = BudgetKeeper(local, shared)

    def test_held_until_admitted_then_the_body_goes_up_whole(self) -> None:
        _, client = self.proxy.send(PUSH)
        self.assertEqual(len(self.pool.sent), 1)
        self.assertEqual(ask_of(self.pool.sent[0][0])["bytes"][0], 10)  # needed up front
        self.assertEqual(self.proxy.endpoints["loki"].connections, [])
        self.assertEqual(client.producerState, "paused")
        self.assertEqual(client.value(), b"")
        self.pool.sent[0][1].callback(granted(2, 110))
        self.assertEqual(client.producerState, "producing")
        self.proxy.clock.advance(0)
        up, upstream = self.proxy.upstream("loki")
        self.proxy.clock.advance(0)
        ((method, _, _, body),) = sent_requests(upstream.value())
        self.assertEqual((method, body), (b"POST", b"0123456789"))
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.proxy.clock.advance(0)
        self.assertEqual(status(client.value()), 204)

    def test_the_next_request_spends_the_lease_at_once(self) -> None:
        """Redis granted a lease with the first request: the second is
        proxied without waiting (a top-up goes out beside it)."""
        self.proxy.send(PUSH)
        self.pool.sent[0][1].callback(granted(2, 110))
        self.proxy.clock.advance(0)
        _, client = self.proxy.send(PUSH)
        self.assertEqual(client.producerState, "producing")
        self.proxy.clock.advance(0)
        self.assertEqual(len(self.proxy.endpoints["loki"].connections), 2)
        ((args, _),) = self.pool.sent[1:]
        self.assertEqual(ask_of(args)["requests"], (0, 1))  # the top-up

    def test_refused_429_nothing_upstream(self) -> None:
        _, client = self.proxy.send(PUSH)
        self.pool.sent[0][1].callback(refused(b"bytes", 2.5))
        self.proxy.clock.advance(0)
        raw = client.value()
        self.assertEqual(status(raw), 429, raw)
        self.assertIn(b"Retry-After: 3\r\n", raw)
        self.assertIn(b"byte budget of consumer team-a exceeded", raw)
        self.assertEqual(self.proxy.endpoints["loki"].connections, [])
        self.assertFalse(client.disconnecting)  # the body was in: keep-alive

    def test_no_answer_by_the_deadline(self) -> None:
        """This replica decides: admitted once (burst 1), then 429."""
        self.proxy.factory.budgets.shared.up()  # type: ignore[union-attr]
        self.proxy.send(PUSH)
        self.proxy.clock.advance(0.05)
        self.proxy.clock.advance(0)
        self.assertEqual(len(self.proxy.endpoints["loki"].connections), 1)
        _, second = self.proxy.send(PUSH)
        self.proxy.clock.advance(0.05)
        self.proxy.clock.advance(0)
        self.assertEqual(status(second.value()), 429)
        # Redis's late answers change nothing.
        for _, d in self.pool.sent:
            d.callback(granted(2, 110))
        self.assertEqual(len(self.proxy.endpoints["loki"].connections), 1)

    def test_client_gone_while_waiting(self) -> None:
        proto, _ = self.proxy.send(PUSH)
        proto.connectionLost(Failure(ConnectionDone()))
        self.pool.sent[0][1].callback(granted(2, 110))
        self.proxy.clock.advance(0)
        self.assertEqual(self.proxy.endpoints["loki"].connections, [])
