"""The shared limiter's deadline and fall back, on a fake clock and a fake
pool: what a replica decides when Redis is late, refuses or is down."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lgmt_proxy.limits.budget import BYTES, Budget, Limits, Verdict
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.resp import RedisError
from lgmt_proxy.limits.shared import SCRIPT_SHA, SharedLimiter
from lgmt_proxy.obs.metrics import ProxyMetrics

LIMITS = Limits(Budget(rate=1, burst=2), Budget(rate=1000, burst=1000))


class FakePool:
    def __init__(self) -> None:
        self.ready = True
        self.sent: list[tuple[tuple[Any, ...], Deferred[Any]]] = []

    def command(self, *args: Any) -> Deferred[Any] | None:
        if not self.ready:
            return None
        d: Deferred[Any] = Deferred()
        self.sent.append((args, d))
        return d


class SharedLimiterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.pool = FakePool()
        self.registry = CollectorRegistry()
        metrics = ProxyMetrics(self.registry, process_collectors=False)
        self.limiter = SharedLimiter(
            self.clock, self.pool, LocalLimiter(self.clock), metrics, timeout=0.05, where="redis"
        )

    def errors(self, reason: str) -> float:
        found = self.registry.get_sample_value(
            "proxy_ratelimit_backend_errors_total", {"reason": reason}
        )
        return found or 0.0

    def decided(self, d: Deferred[Verdict]) -> Verdict:
        results: list[Verdict] = []
        d.addCallback(results.append)
        self.assertEqual(len(results), 1, "not decided")
        return results[0]

    def test_redis_decides(self) -> None:
        d = self.limiter.check("team-a", LIMITS, 10)
        (args, sent), = self.pool.sent  # fmt: skip
        self.assertEqual(args[:2], (b"EVALSHA", SCRIPT_SHA))
        self.assertEqual(
            args[3:5], (b"lgmt:budget:{team-a}:requests", b"lgmt:budget:{team-a}:bytes")
        )
        sent.callback([0, b"1500000", b"bytes"])
        self.assertEqual(self.decided(d), Verdict(False, 1.5, BYTES))
        self.assertTrue(self.limiter.shared)
        self.assertEqual(self.registry.get_sample_value("proxy_ratelimit_shared"), 1.0)

    def test_deadline_then_local(self) -> None:
        """No answer within the deadline: the local limiter decides; the
        late answer changes nothing."""
        self.limiter.up()
        d = self.limiter.check("team-a", LIMITS, None)
        self.clock.advance(0.049)
        self.assertFalse(d.called)
        self.clock.advance(0.001)
        self.assertTrue(self.decided(d).allowed)
        self.assertEqual(self.errors("timeout"), 1)
        self.assertFalse(self.limiter.shared)
        self.assertEqual(self.registry.get_sample_value("proxy_ratelimit_shared"), 0.0)
        self.pool.sent[0][1].callback([0, b"1", b"requests"])  # too late
        self.assertFalse(self.limiter.shared)
        # The local budget counts the request it admitted: one more, then no.
        self.pool.ready = False
        self.assertTrue(self.decided(self.limiter.check("team-a", LIMITS, None)).allowed)
        self.assertFalse(self.decided(self.limiter.check("team-a", LIMITS, None)).allowed)
        self.assertEqual(self.errors("down"), 2)

    def test_refusals_are_local_decisions(self) -> None:
        for message, reason in [
            ("OOM command not allowed when used memory > 'maxmemory'", "oom"),
            ("READONLY You can't write against a read only replica.", "readonly"),
            ("NOAUTH Authentication required.", "auth"),
            ("BUSY Redis is busy running a script", "error"),
        ]:
            d = self.limiter.check("team-a", Limits(Budget(1, 1000), None), None)
            self.pool.sent[-1][1].errback(RedisError(message))
            self.assertTrue(self.decided(d).allowed)
            self.assertEqual(self.errors(reason), 1, reason)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_noscript_then_eval(self) -> None:
        d = self.limiter.check("team-a", LIMITS, 10)
        self.pool.sent[0][1].errback(RedisError("NOSCRIPT No matching script"))
        args, sent = self.pool.sent[1]
        self.assertEqual(args[0], b"EVAL")
        sent.callback([1, b"0", b""])
        self.assertTrue(self.decided(d).allowed)
        self.assertEqual(self.errors("error"), 0)

    def test_streamed_bytes_one_call_in_flight(self) -> None:
        self.limiter.charge("team-a", LIMITS, 100)
        self.limiter.charge("team-a", LIMITS, 200)
        self.limiter.charge("team-a", LIMITS, 300)
        self.assertEqual(len(self.pool.sent), 1)
        self.assertEqual(self.pool.sent[0][0][5], b"charge")
        self.assertEqual(self.pool.sent[0][0][-1], 100)
        self.pool.sent[0][1].callback([1, b"0", b""])
        self.assertEqual(len(self.pool.sent), 2)
        self.assertEqual(self.pool.sent[1][0][-1], 500)
        self.pool.sent[1][1].callback([1, b"0", b""])
        self.assertEqual(len(self.pool.sent), 2)

    def test_unlimited_and_too_large_never_ask(self) -> None:
        self.assertTrue(self.decided(self.limiter.check("team-a", Limits(), 10**9)).allowed)
        self.assertTrue(self.decided(self.limiter.check("team-a", LIMITS, 1001)).too_large)
        self.assertEqual(self.pool.sent, [])


class KeeperTests(TestCase):
    def test_local_is_synchronous_shared_is_not(self) -> None:
        clock = Clock()
        local = LocalLimiter(clock)
        keeper = BudgetKeeper(local)
        self.assertIsInstance(keeper.check("team-a", LIMITS, 10), Verdict)
        keeper.charge("team-a", LIMITS, 5000)
        self.assertFalse(local.check("team-a", LIMITS, None).allowed)
        pool = FakePool()
        metrics = ProxyMetrics(CollectorRegistry(), process_collectors=False)
        shared = SharedLimiter(clock, pool, local, metrics, timeout=0.05, where="redis")
        keeper = BudgetKeeper(local, shared)
        self.assertIsInstance(keeper.check("team-a", LIMITS, 10), Deferred)
        self.assertIsInstance(keeper.check("team-a", Limits(), 10), Verdict)
        keeper.charge("team-a", LIMITS, 10)
        self.assertEqual(pool.sent[-1][0][5], b"charge")
        clock.advance(1)
