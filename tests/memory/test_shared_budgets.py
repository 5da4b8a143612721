"""The shared limiter on a fake clock and a fake pool: leases (one call,
then requests spend locally, a top-up ahead of need, forgotten unused),
the deadline and the fall back: what a replica decides when Redis is late,
refuses or is down. `FakeRedis` runs the script's arithmetic in Python for
the accuracy of three replicas together; the real script runs in
tests/loopback/test_budgets_redis.py."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lgmt_proxy.limits.budget import ADMITTED, BYTES, REQUESTS, Budget, Limits, Verdict
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.limits.lease import LEASE_SECONDS, lease_size
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.resp import RedisError
from lgmt_proxy.limits.shared import SCRIPT_SHA, SharedLimiter
from lgmt_proxy.obs.metrics import ProxyMetrics

LIMITS = Limits(Budget(rate=1, burst=2), Budget(rate=1000, burst=1000))
#: Budgets whose leases are more than one unit: 10 requests, 100 bytes.
ROOMY = Limits(Budget(rate=100, burst=100), Budget(rate=1000, burst=1000))


def granted(requests: int, nbytes: int = 0, ahead: float = 0.0) -> list[Any]:
    """A reply granting units; ``ahead``: the TATs, seconds ahead of now."""
    micros = b"%r" % (ahead * 1e6)
    return [requests, nbytes, b"", b"0", micros, micros]


def refused(budget: bytes, retry: float, ahead: float = 0.0) -> list[Any]:
    """A refusal; ``ahead``: the refusing budget's TAT, seconds ahead."""
    micros = b"%r" % (ahead * 1e6)
    aheads = [micros, b"0"] if budget == b"requests" else [b"0", micros]
    return [0, 0, budget, b"%r" % (retry * 1e6), *aheads]


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


def ask_of(args: tuple[Any, ...]) -> dict[str, Any]:
    """The script's ARGV by name, from a command sent."""
    mode, r_per, _, r_need, r_want, b_per, _, b_need, b_want = args[5:]
    return {
        "mode": mode,
        "requests": (r_need, r_want) if r_per else None,
        "bytes": (b_need, b_want) if b_per else None,
    }


class FakeRedis:
    """The script's arithmetic in Python, on the test's clock: answers at
    once (a replica's pool)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.tats: dict[bytes, float] = {}
        self.calls = 0

    def pool(self) -> Any:
        redis = self

        class Pool:
            ready = True

            def command(self, *args: Any) -> Deferred[Any]:
                return succeed(redis.run(args))

        return Pool()

    def run(self, args: tuple[Any, ...]) -> list[Any]:
        self.calls += 1
        now = self.clock.seconds() * 1e6
        keys, mode, argv = args[3:5], args[5], args[6:]
        budgets = []
        for i in range(2):
            per, tol, need, want = argv[i * 4 : i * 4 + 4]
            if per:
                tat = max(self.tats.get(keys[i], now), now)
                budgets.append((i, float(per), float(tol), need, want, tat))
        out: list[Any] = [0, 0, b"", b"0", b"0", b"0"]
        for i, _, _, _, _, tat in budgets:
            out[4 + i] = b"%r" % (tat - now)
        takes = []
        for i, per, tol, need, want, tat in budgets:
            room = tol - (tat - now)
            if mode == b"charge":
                takes.append(want)
                continue
            avail = math.floor((room + 0.001 * max(1, tol / 1e6)) / per)
            if avail < need:
                out[2:4] = [(b"requests", b"bytes")[i], b"%r" % (need * per - room)]
                return out
            takes.append(min(want, avail))
        for (i, per, _, _, _, tat), take in zip(budgets, takes, strict=True):
            tat += take * per
            if take:
                self.tats[keys[i]] = tat
            out[i] = take
            out[4 + i] = b"%r" % (tat - now)
        return out


class Fixture(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.pool = FakePool()
        self.registry = CollectorRegistry()
        metrics = ProxyMetrics(self.registry, process_collectors=False)
        self.local = LocalLimiter(self.clock)
        self.limiter = SharedLimiter(
            self.clock, self.pool, self.local, metrics, timeout=0.05, where="redis"
        )

    def errors(self, reason: str) -> float:
        found = self.registry.get_sample_value(
            "proxy_ratelimit_backend_errors_total", {"reason": reason}
        )
        return found or 0.0

    def decided(self, d: Verdict | Deferred[Verdict]) -> Verdict:
        if isinstance(d, Verdict):
            return d
        results: list[Verdict] = []
        d.addCallback(results.append)
        self.assertEqual(len(results), 1, "not decided")
        return results[0]

    def at_once(self, name: str, limits: Limits, length: int | None) -> Verdict:
        """A decision taken from the lease: no Deferred, no call."""
        calls = len(self.pool.sent)
        verdict = self.limiter.check(name, limits, length)
        self.assertIsInstance(verdict, Verdict)
        assert isinstance(verdict, Verdict)
        self.assertEqual(len(self.pool.sent), calls, "asked Redis")
        return verdict


class LeaseTests(Fixture):
    def test_one_call_then_the_lease(self) -> None:
        """The first request asks for what it needs and a lease more; the
        next ones spend the lease at once; a top-up goes out ahead of need
        and nobody waits for it."""
        size_r, size_b = lease_size(ROOMY.requests), lease_size(ROOMY.bytes)
        self.assertEqual((size_r, size_b), (10, 100))
        d = self.limiter.check("team-a", ROOMY, 10)
        self.assertIsInstance(d, Deferred)
        ((args, sent),) = self.pool.sent
        self.assertEqual(args[:2], (b"EVALSHA", SCRIPT_SHA))
        self.assertEqual(
            args[3:5], (b"lgmt:budget:{team-a}:requests", b"lgmt:budget:{team-a}:bytes")
        )
        self.assertEqual(ask_of(args), {"mode": b"lease", "requests": (1, 11), "bytes": (10, 110)})
        sent.callback(granted(11, 110, ahead=0.2))
        self.assertTrue(self.decided(d).allowed)
        self.assertTrue(self.limiter.shared)
        self.assertEqual(self.registry.get_sample_value("proxy_ratelimit_shared"), 1.0)
        # Held: 10 requests, 100 bytes. Five of 10 bytes, then under half.
        for _ in range(5):
            self.assertTrue(self.at_once("team-a", ROOMY, 10).allowed)
        self.assertTrue(self.limiter.check("team-a", ROOMY, 10).allowed)  # type: ignore[union-attr]
        ((args, top_up),) = self.pool.sent[1:]
        self.assertEqual(ask_of(args)["requests"], (0, 6))  # back to a whole lease
        self.assertEqual(ask_of(args)["bytes"], (0, 60))
        # Still held meanwhile: 4 requests, 40 bytes.
        self.assertTrue(self.at_once("team-a", ROOMY, 40).allowed)
        top_up.callback(granted(6, 60))
        self.assertTrue(self.at_once("team-a", ROOMY, 10).allowed)
        # Admitted requests count locally too: a fall back starts from them.
        self.assertFalse(self.local.check("team-a", Limits(None, ROOMY.bytes), 950).allowed)

    def test_refused_by_redis_then_here(self) -> None:
        """Redis's refusal says when the budget refills: until then the
        replica refuses without asking."""
        d = self.limiter.check("team-a", LIMITS, 10)
        self.pool.sent[0][1].callback(refused(b"bytes", 1.5, ahead=2.5))
        self.assertEqual(self.decided(d), Verdict(False, 1.5, BYTES))
        refusal = self.at_once("team-a", LIMITS, 10)
        self.assertEqual((refusal.allowed, refusal.budget), (False, BYTES))
        self.assertAlmostEqual(refusal.retry_after, 1.51)
        self.clock.advance(1.6)
        self.assertIsInstance(self.limiter.check("team-a", LIMITS, 10), Deferred)

    def test_requests_that_come_together_take_one_lease(self) -> None:
        """Each request the lease does not cover asks for itself, at once
        (no waiting behind another call); only the first asks for a lease
        more."""
        first = self.limiter.check("team-a", ROOMY, None)
        second = self.limiter.check("team-a", ROOMY, None)
        third = self.limiter.check("team-a", ROOMY, None)
        asks = [ask_of(args)["requests"] for args, _ in self.pool.sent]
        self.assertEqual(asks, [(1, 11), (1, 1), (1, 1)])
        self.pool.sent[1][1].callback(granted(1, 0, ahead=0.5))
        self.assertTrue(self.decided(second).allowed)
        self.pool.sent[0][1].callback(granted(11, 0, ahead=0.6))
        self.assertTrue(self.decided(first).allowed)
        self.pool.sent[2][1].callback(refused(b"requests", 0.01, ahead=1.0))
        self.assertEqual(self.decided(third), Verdict(False, 0.01, REQUESTS))
        self.assertFalse(self.clock.getDelayedCalls())
        # The lease: 10 requests held.
        for _ in range(5):
            self.assertTrue(self.at_once("team-a", ROOMY, None).allowed)

    def test_a_lease_unused_is_forgotten(self) -> None:
        d = self.limiter.check("team-a", ROOMY, None)
        self.pool.sent[0][1].callback(granted(11, 0))
        self.assertTrue(self.decided(d).allowed)
        self.assertTrue(self.at_once("team-a", ROOMY, None).allowed)
        self.clock.advance(LEASE_SECONDS)
        self.assertIsInstance(self.limiter.check("team-a", ROOMY, None), Deferred)

    def test_a_budget_changed_by_a_reload_takes_a_new_lease(self) -> None:
        d = self.limiter.check("team-a", ROOMY, None)
        self.pool.sent[0][1].callback(granted(11, 0))
        self.decided(d)
        tighter = Limits(Budget(rate=10, burst=10), ROOMY.bytes)
        self.assertIsInstance(self.limiter.check("team-a", tighter, None), Deferred)
        self.assertEqual(ask_of(self.pool.sent[1][0])["requests"], (1, 2))

    def test_another_replicas_overdraft_is_seen_within_a_lease(self) -> None:
        """A request of no body cost is admitted from what the last reply
        showed only for `LEASE_SECONDS`: then Redis is asked, and a byte
        budget another replica overdrew refuses it."""
        only_bytes = Limits(None, Budget(rate=1000, burst=1000))
        d = self.limiter.check("team-a", only_bytes, None)
        self.assertEqual(ask_of(self.pool.sent[0][0])["bytes"], (0, 0))
        self.pool.sent[0][1].callback(granted(0, 0))
        self.assertTrue(self.decided(d).allowed)
        self.assertTrue(self.at_once("team-a", only_bytes, None).allowed)
        self.clock.advance(LEASE_SECONDS)
        d = self.limiter.check("team-a", only_bytes, None)
        self.pool.sent[1][1].callback(refused(b"bytes", 4.0, ahead=5.0))
        self.assertEqual(self.decided(d).budget, BYTES)

    def test_what_was_seen_is_renewed_while_in_use(self) -> None:
        """Requests of no body cost under a byte budget alone: past half
        `LEASE_SECONDS` one of them sends a call beside it, so none waits."""
        only_bytes = Limits(None, Budget(rate=1000, burst=1000))
        d = self.limiter.check("team-a", only_bytes, None)
        self.pool.sent[0][1].callback(granted(0, 0))
        self.decided(d)
        self.clock.advance(LEASE_SECONDS / 2)
        self.assertTrue(self.limiter.check("team-a", only_bytes, None).allowed)  # type: ignore[union-attr]
        ((args, renewal),) = self.pool.sent[1:]
        self.assertEqual(ask_of(args)["bytes"], (0, 0))
        renewal.callback(granted(0, 0))
        self.clock.advance(LEASE_SECONDS * 0.6)  # past what the first reply showed
        self.assertEqual(self.limiter.check("team-a", only_bytes, None), ADMITTED)

    def test_streamed_bytes_spend_the_lease_then_one_call_in_flight(self) -> None:
        d = self.limiter.check("team-a", ROOMY, 100)
        self.pool.sent[0][1].callback(granted(11, 200))  # 100 bytes held
        self.decided(d)
        self.limiter.charge("team-a", ROOMY, 60)
        self.assertEqual(len(self.pool.sent), 1)  # from the lease
        self.limiter.charge("team-a", ROOMY, 100)
        self.limiter.charge("team-a", ROOMY, 200)
        self.limiter.charge("team-a", ROOMY, 300)
        self.assertEqual(len(self.pool.sent), 2)
        self.assertEqual(ask_of(self.pool.sent[1][0])["mode"], b"charge")
        self.assertEqual(ask_of(self.pool.sent[1][0])["bytes"], (0, 60))
        self.pool.sent[1][1].callback(granted(0, 60))
        self.assertEqual(len(self.pool.sent), 3)
        self.assertEqual(ask_of(self.pool.sent[2][0])["bytes"], (0, 500))
        self.pool.sent[2][1].callback(granted(0, 500, ahead=1.5))
        self.assertEqual(len(self.pool.sent), 3)
        # Overdrawn: the next request is refused here, without asking.
        refusal = self.at_once("team-a", ROOMY, None)
        self.assertEqual((refusal.allowed, refusal.budget), (False, BYTES))

    def test_unlimited_and_too_large_never_ask(self) -> None:
        self.assertTrue(self.decided(self.limiter.check("team-a", Limits(), 10**9)).allowed)
        self.assertTrue(self.decided(self.limiter.check("team-a", LIMITS, 1001)).too_large)
        self.assertEqual(self.pool.sent, [])


class FallBackTests(Fixture):
    def test_deadline_then_local(self) -> None:
        """No answer within the deadline: the local limiter decides; the
        late answer changes nothing."""
        self.limiter.up()
        d = self.limiter.check("team-a", LIMITS, None)
        self.clock.advance(0.049)
        self.assertFalse(d.called)  # type: ignore[union-attr]
        self.clock.advance(0.001)
        self.assertTrue(self.decided(d).allowed)
        self.assertEqual(self.errors("timeout"), 1)
        self.assertFalse(self.limiter.shared)
        self.assertEqual(self.registry.get_sample_value("proxy_ratelimit_shared"), 0.0)
        self.pool.sent[0][1].callback(refused(b"requests", 1.0))  # too late
        self.assertFalse(self.limiter.shared)
        # The local budget counts the request it admitted: one more, then no.
        self.pool.ready = False
        self.assertTrue(self.decided(self.limiter.check("team-a", LIMITS, None)).allowed)
        self.assertFalse(self.decided(self.limiter.check("team-a", LIMITS, None)).allowed)
        self.assertEqual(self.errors("down"), 2)

    def test_waiting_behind_an_unanswered_call(self) -> None:
        """A frozen Redis: each request waits the deadline, never more."""
        self.limiter.up()
        first = self.limiter.check("team-a", LIMITS, None)
        self.clock.advance(0.03)
        second = self.limiter.check("team-a", LIMITS, None)
        self.assertEqual(len(self.pool.sent), 2)
        self.clock.advance(0.02)
        self.assertTrue(first.called and not second.called)  # type: ignore[union-attr]
        self.clock.advance(0.03)
        self.assertTrue(self.decided(second).allowed)
        self.assertEqual(self.errors("timeout"), 2)

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

    def test_unexpected_reply_is_an_error(self) -> None:
        d = self.limiter.check("team-a", LIMITS, None)
        self.pool.sent[0][1].callback([1, b"0", b""])  # an older script's reply
        self.assertTrue(self.decided(d).allowed)
        self.assertEqual(self.errors("error"), 1)

    def test_noscript_then_eval(self) -> None:
        d = self.limiter.check("team-a", LIMITS, 10)
        self.pool.sent[0][1].errback(RedisError("NOSCRIPT No matching script"))
        args, sent = self.pool.sent[1]
        self.assertEqual(args[0], b"EVAL")
        sent.callback(granted(2, 110))
        self.assertTrue(self.decided(d).allowed)
        self.assertEqual(self.errors("error"), 0)

    def test_lease_spent_while_redis_is_down_then_local(self) -> None:
        """Units leased stay good through an outage; past them the replica
        decides alone, at once."""
        d = self.limiter.check("team-a", ROOMY, None)
        self.pool.sent[0][1].callback(granted(3, 0))
        self.decided(d)
        self.pool.ready = False
        self.limiter.error("connect")
        self.assertTrue(self.at_once("team-a", ROOMY, None).allowed)
        self.assertTrue(self.at_once("team-a", ROOMY, None).allowed)
        self.assertEqual(self.errors("down"), 0)
        self.assertTrue(self.at_once("team-a", ROOMY, None).allowed)  # local
        self.assertEqual(self.errors("down"), 1)
        self.assertFalse(self.limiter.shared)
        self.pool.ready = True
        self.limiter.up()
        self.assertIsInstance(self.limiter.check("team-a", ROOMY, None), Deferred)
        self.assertTrue(self.limiter.shared)


class AccuracyTests(TestCase):
    """Three replicas, one budget, Redis's arithmetic in `FakeRedis`."""

    def drive(self, limits: Limits, length: int | None) -> tuple[int, int]:
        """300 requests a second over three replicas for 5 s: (admitted,
        script calls)."""
        clock = Clock()
        clock.advance(1000)
        redis = FakeRedis(clock)
        replicas = []
        for _ in range(3):
            metrics = ProxyMetrics(CollectorRegistry(), process_collectors=False)
            local = LocalLimiter(clock)
            replicas.append(SharedLimiter(clock, redis.pool(), local, metrics, timeout=0.05,
                                          where="redis"))  # fmt: skip
        admitted = 0
        for i in range(1500):
            clock.advance(1 / 300)
            decision = replicas[i % 3].check("team-a", limits, length)
            verdicts: list[Verdict] = []
            if isinstance(decision, Deferred):
                decision.addCallback(verdicts.append)  # FakeRedis answers at once
            else:
                verdicts.append(decision)
            admitted += verdicts[0].allowed
        return admitted, redis.calls

    def test_requests(self) -> None:
        """Within a few units of 20 + 20 x 5; at most the lease of each
        replica over; Redis asked for a fraction of the requests."""
        limits = Limits(Budget(rate=20, burst=20), None)
        admitted, calls = self.drive(limits, None)
        over = 3 * lease_size(limits.requests)
        self.assertLessEqual(admitted, 120 + over)
        self.assertGreaterEqual(admitted, 120 - over)
        # Refusals are mostly taken here, from what the last reply showed:
        # each replica asks about each time a unit refills (60 a second).
        self.assertLess(calls, 1500 / 3)

    def test_bytes(self) -> None:
        limits = Limits(None, Budget(rate=20_000, burst=20_000))
        admitted, _ = self.drive(limits, 1000)
        over = 3 * lease_size(limits.bytes) / 1000
        self.assertLessEqual(admitted, 120 + over)
        self.assertGreaterEqual(admitted, 120 - over)

    def test_never_exhausted_is_a_call_per_lease(self) -> None:
        limits = Limits(Budget(rate=10_000, burst=10_000), Budget(rate=2**30, burst=2**30))
        admitted, calls = self.drive(limits, None)
        self.assertEqual(admitted, 1500)
        # A lease is renewed at half its life: two calls per replica a second.
        self.assertLessEqual(calls, 3 * (2 * 5 / LEASE_SECONDS + 2))


class KeeperTests(TestCase):
    def test_local_is_synchronous_shared_when_leased(self) -> None:
        clock = Clock()
        local = LocalLimiter(clock)
        keeper = BudgetKeeper(local)
        self.assertIsInstance(keeper.check("team-a", LIMITS, 10), Verdict)
        keeper.charge("team-a", LIMITS, 5000)
        self.assertFalse(local.check("team-a", LIMITS, None).allowed)
        pool = FakePool()
        metrics = ProxyMetrics(CollectorRegistry(), process_collectors=False)
        shared = SharedLimiter(clock, pool, LocalLimiter(clock), metrics, timeout=0.05,
                               where="redis")  # fmt: skip
        keeper = BudgetKeeper(local, shared)
        d = keeper.check("team-a", ROOMY, 10)
        self.assertIsInstance(d, Deferred)
        self.assertIsInstance(keeper.check("team-a", Limits(), 10), Verdict)
        pool.sent[0][1].callback(granted(11, 110))
        self.assertIsInstance(keeper.check("team-a", ROOMY, 10), Verdict)
        # An upgrade: from the lease too, else this replica's own budgets.
        self.assertTrue(keeper.check_now("team-a", ROOMY, None).allowed)
        keeper.charge("team-a", ROOMY, 1000)
        self.assertEqual(ask_of(pool.sent[-1][0])["mode"], b"charge")
        clock.advance(1)
