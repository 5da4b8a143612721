"""Consumers' budgets as metrics, read at scrape time from the client-auth
file in force: dashboards and alerts can then divide what a consumer sends
(``proxy_request_body_bytes_total``, ``proxy_requests_total``) by what it may
send, and a budget changed on reload shows at the next scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from lgmt_proxy.config.clientauth import ClientAuth


class BudgetSeries:
    """``proxy_consumer_budget{consumer, budget, kind}``: each consumer's
    rate (units per second) and burst, for ``budget`` requests or bytes."""

    def __init__(self, client_auth: Callable[[], ClientAuth]) -> None:
        self._client_auth = client_auth

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "proxy_consumer_budget",
            "Consumers' budgets from CLIENT_AUTH_FILE's rate_limit: the rate per second "
            "and the burst, of requests or of request body bytes.",
            labels=["consumer", "budget", "kind"],
        )
        for consumer in self._client_auth().consumers:
            for name, budget in (
                ("requests", consumer.limits.requests),
                ("bytes", consumer.limits.bytes),
            ):
                if budget is not None:
                    family.add_metric([consumer.name, name, "rate"], budget.rate)
                    family.add_metric([consumer.name, name, "burst"], budget.burst)
        yield family
