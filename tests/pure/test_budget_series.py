"""proxy_consumer_budget: consumers' budgets exported at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.trial.unittest import SynchronousTestCase

from lgmt_proxy.config.clientauth import ClientAuth, parse_client_auth
from lgmt_proxy.obs.budgets import BudgetSeries
from tests.pure.test_clientauth import DOC


def parsed(text: str) -> ClientAuth:
    return parse_client_auth(text)


class BudgetSeriesTests(SynchronousTestCase):
    def test_each_limited_consumer_rate_and_burst(self) -> None:
        current = [parsed(DOC)]
        registry = CollectorRegistry()
        registry.register(BudgetSeries(lambda: current[0]))

        def value(consumer: str, budget: str, kind: str) -> float | None:
            return registry.get_sample_value(
                "proxy_consumer_budget", {"consumer": consumer, "budget": budget, "kind": kind}
            )

        # alloy: requests_per_second 1, burst 2; kubecost has no rate_limit.
        self.assertEqual(value("alloy", "requests", "rate"), 1.0)
        self.assertEqual(value("alloy", "requests", "burst"), 2.0)
        self.assertIsNone(value("alloy", "bytes", "rate"))
        self.assertIsNone(value("kubecost", "requests", "rate"))
        # A reload with a byte budget shows at the next scrape.
        current[0] = parsed(
            DOC.replace(
                "rate_limit: {requests_per_second: 1, burst: 2}",
                "rate_limit: {bytes_per_second: 1048576, burst_bytes: 4194304}",
            )
        )
        self.assertIsNone(value("alloy", "requests", "rate"))
        self.assertEqual(value("alloy", "bytes", "rate"), 1048576.0)
        self.assertEqual(value("alloy", "bytes", "burst"), 4194304.0)
