"""Consumers' budgets: the GCRA arithmetic and a replica's own limiter, on a
fake clock; `rate_limit` as CLIENT_AUTH_FILE gives it."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import parse_client_auth
from lgmt_proxy.config.settings import ConfigError
from lgmt_proxy.limits.budget import (
    BYTES,
    REQUESTS,
    Budget,
    Limits,
    Verdict,
    admit,
    decide,
    refusal_message,
)
from lgmt_proxy.limits.local import LocalLimiter


def consumer_doc(rate_limit: str) -> str:
    return f"""
consumers:
  - name: team-a
    token: team-a-token-0123456789
    allow: [{{paths: ["/*"]}}]
    rate_limit: {rate_limit}
"""


def limits_of(rate_limit: str) -> Limits:
    (consumer,) = parse_client_auth(consumer_doc(rate_limit)).consumers
    return consumer.limits


class ArithmeticTests(TestCase):
    def test_burst_then_rate(self) -> None:
        """A full burst at once, then one every 1/rate seconds."""
        budget = Budget(rate=20, burst=20)
        tat, now, admitted = 0.0, 100.0, 0
        for _ in range(30):
            tat, wait = admit(tat, now, 1, budget)
            admitted += wait == 0
        self.assertEqual(admitted, 20)
        tat, wait = admit(tat, now, 1, budget)
        self.assertAlmostEqual(wait, 0.05)
        tat, wait = admit(tat, now + 0.05, 1, budget)
        self.assertEqual(wait, 0.0)

    def test_refusal_changes_nothing(self) -> None:
        budget = Budget(rate=10, burst=5)  # a tolerance of 0.5 s
        tat, wait = admit(100.5, 100.0, 1, budget)
        self.assertEqual(tat, 100.5)
        self.assertAlmostEqual(wait, 0.1)

    def test_both_budgets_or_neither(self) -> None:
        limits = Limits(Budget(10, 10), Budget(1000, 1000))
        verdict, tats = decide((0.0, 0.0), 50.0, limits, 800)
        self.assertTrue(verdict.allowed)
        self.assertAlmostEqual(tats[0], 50.1)
        self.assertAlmostEqual(tats[1], 50.8)
        # 300 more bytes do not fit: the request budget is not charged either.
        verdict, after = decide(tats, 50.0, limits, 300)
        self.assertEqual((verdict.allowed, verdict.budget), (False, BYTES))
        self.assertAlmostEqual(verdict.retry_after, 0.1)
        self.assertEqual(after, tats)

    def test_larger_than_the_burst(self) -> None:
        limits = Limits(None, Budget(1000, 4000))
        verdict, tats = decide((0.0, 0.0), 0.0, limits, 4001)
        self.assertEqual(verdict, Verdict(False, 0.0, BYTES, too_large=True))
        self.assertEqual(tats, (0.0, 0.0))
        self.assertEqual(
            refusal_message("team-a", verdict, limits, 4001),
            "request body of 4001 bytes is larger than the whole byte budget of consumer "
            "team-a (burst_bytes 4000): it can never fit",
        )
        self.assertTrue(decide((0.0, 0.0), 0.0, limits, 4000)[0].allowed)

    def test_retry_after_header(self) -> None:
        self.assertEqual(Verdict(False, 0.01, REQUESTS).retry_after_header(), b"1")
        self.assertEqual(Verdict(False, 2.2, REQUESTS).retry_after_header(), b"3")


class LocalLimiterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.limiter = LocalLimiter(self.clock)

    def test_requests(self) -> None:
        limits = limits_of("{requests_per_second: 20, burst: 20}")
        verdicts = [self.limiter.check("team-a", limits, None) for _ in range(25)]
        self.assertEqual(sum(v.allowed for v in verdicts), 20)
        self.assertEqual(verdicts[-1].budget, REQUESTS)
        self.assertEqual(
            refusal_message("team-a", verdicts[-1], limits, None),
            "rate limit of consumer team-a exceeded",
        )
        self.clock.advance(1.0)
        self.assertEqual(
            sum(self.limiter.check("team-a", limits, None).allowed for _ in range(25)), 20
        )
        # Another consumer has its own budgets.
        self.assertTrue(self.limiter.check("team-b", limits, None).allowed)

    def test_declared_length(self) -> None:
        """A Content-Length is charged up front; one that does not fit is
        refused with the wait until it would."""
        limits = limits_of("{bytes_per_second: 1000, burst_bytes: 2000}")
        self.assertTrue(self.limiter.check("team-a", limits, 1500).allowed)
        refused = self.limiter.check("team-a", limits, 1000)
        self.assertFalse(refused.allowed)
        self.assertAlmostEqual(refused.retry_after, 0.5)
        self.assertEqual(
            refusal_message("team-a", refused, limits, 1000),
            "byte budget of consumer team-a exceeded",
        )
        self.assertTrue(self.limiter.check("team-a", limits, 500).allowed)
        self.clock.advance(1.0)
        self.assertTrue(self.limiter.check("team-a", limits, 1000).allowed)
        self.assertTrue(self.limiter.check("team-a", limits, 2001).too_large)

    def test_streamed_body_overdraws(self) -> None:
        """A chunked body is admitted while the budget is not overdrawn,
        charged chunk by chunk past it; the next requests wait until it has
        refilled."""
        limits = limits_of("{bytes_per_second: 1000, burst_bytes: 1000}")
        self.assertTrue(self.limiter.check("team-a", limits, None).allowed)
        for _ in range(5):
            self.limiter.charge("team-a", limits, 1000)
        refused = self.limiter.check("team-a", limits, None)
        self.assertFalse(refused.allowed)
        self.assertAlmostEqual(refused.retry_after, 4.0)
        self.clock.advance(3.9)
        self.assertFalse(self.limiter.check("team-a", limits, 0).allowed)
        self.clock.advance(0.1)
        self.assertTrue(self.limiter.check("team-a", limits, None).allowed)

    def test_reload_changes_the_budget(self) -> None:
        tight = limits_of("{requests_per_second: 1, burst: 1}")
        self.assertTrue(self.limiter.check("team-a", tight, None).allowed)
        self.assertFalse(self.limiter.check("team-a", tight, None).allowed)
        wider = limits_of("{requests_per_second: 1, burst: 3}")
        self.assertEqual([self.limiter.check("team-a", wider, None).allowed for _ in range(4)],
                         [True, True, True, False])  # fmt: skip

    def test_record_keeps_the_fallback_warm(self) -> None:
        """Requests the shared budget admitted are spent here too."""
        limits = limits_of("{requests_per_second: 2, burst: 2}")
        self.limiter.record("team-a", limits, None)
        self.limiter.record("team-a", limits, None)
        self.assertFalse(self.limiter.check("team-a", limits, None).allowed)

    def test_unlimited(self) -> None:
        doc = consumer_doc("{}").replace("    rate_limit: {}\n", "")
        (consumer,) = parse_client_auth(doc).consumers
        self.assertFalse(consumer.limits.limited)
        verdicts = [self.limiter.check("team-a", consumer.limits, 10**9) for _ in range(100)]
        self.assertTrue(all(v.allowed for v in verdicts))


class RateLimitFileTests(TestCase):
    def test_defaults(self) -> None:
        self.assertEqual(limits_of("{requests_per_second: 20}"), Limits(Budget(20, 20), None))
        self.assertEqual(
            limits_of("{bytes_per_second: 1048576}"), Limits(None, Budget(1048576, 1048576))
        )
        self.assertEqual(
            limits_of("{requests_per_second: 0.5, bytes_per_second: 100, burst_bytes: 400}"),
            Limits(Budget(0.5, 1), Budget(100, 400)),
        )

    def test_problems(self) -> None:
        cases = {
            "{}": "consumer team-a.rate_limit: give requests_per_second, bytes_per_second or both",
            "{burst: 3, bytes_per_second: 1}": (
                "consumer team-a.rate_limit.requests_per_second: is required"
            ),
            "{burst_bytes: 3, requests_per_second: 1}": (
                "consumer team-a.rate_limit.bytes_per_second: is required"
            ),
            "{bytes_per_second: -1}": (
                "consumer team-a.rate_limit.bytes_per_second: must be a positive number"
            ),
            "{bytes_per_second: 1, burst_bytes: 0}": (
                "consumer team-a.rate_limit.burst_bytes: must be a positive number"
            ),
            "{requests_per_second: 1, bytes: 3}": "consumer team-a.rate_limit: unknown keys bytes",
        }
        for raw, expected in cases.items():
            with self.assertRaises(ConfigError, msg=raw) as caught:
                parse_client_auth(consumer_doc(raw))
            self.assertEqual(caught.exception.problems, [f"CLIENT_AUTH_FILE: {expected}"], raw)
