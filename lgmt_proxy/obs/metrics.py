"""The proxy's Prometheus metrics, on a registry that is passed in.

Names and buckets of the first two series match the service we replace, so
dashboards and alerts keep working.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: Methods that keep their own label value; anything else is "other".
METHODS = {
    m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")
}


def method_label(method: bytes | None) -> str:
    return METHODS.get(method or b"", "other")


class ProxyMetrics:
    """All series the proxy exports.

    The per-request series are plain counts in dicts, turned into metric
    families when scraped (`_RequestSeries`): prometheus_client's labelled
    children take a lock per increment and walk the buckets per observation,
    a tenth of a small request's CPU. Only the reactor thread touches them,
    /metrics included, so no lock is needed.

    The ``upstream`` label is the upstream's name: a signal's, or a
    ROUTES_FILE route's (docs/architecture.md, Vocabulary)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        process_collectors: bool = True,
        consumer_label: bool = False,
        tenant_label: bool = False,
    ) -> None:
        self.registry = registry
        self.consumer_label = consumer_label
        self.tenant_label = tenant_label
        if process_collectors:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        # The consumer label exists only with client auth on, the tenant label
        # only with METRICS_TENANT_LABEL: their values come from the client
        # auth file, so they stay bounded, and the default label set is the
        # one of the service we replace.
        who = []
        if consumer_label:
            who.append("consumer")
        if tenant_label:
            who.append("tenant")
        labels = ["upstream", "method", "status", *who]
        #: (upstream, method, status[, consumer][, tenant]) -> requests
        self.requests: dict[tuple[str, ...], int] = {}
        #: (upstream, status) -> responses from the upstream itself
        self.upstream_responses: dict[tuple[str, str], int] = {}
        #: (upstream, method) -> counts per bucket (not cumulative), +Inf, then the sum
        self.durations: dict[tuple[str, str], list[float]] = {}
        #: (upstream, reason) -> failed requests
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.in_flight: dict[str, int] = {}
        #: (upstream[, consumer][, tenant]) -> body bytes: who sends what is
        #: what Grafana Cloud bills.
        self.request_bytes: dict[tuple[str, ...], int] = {}
        self.response_bytes: dict[tuple[str, ...], int] = {}
        #: (upstream, stage) -> request body bytes gzip'd on the way up
        #: (UPSTREAM_COMPRESSION): "before" as the client sent them, "after" as sent.
        self.compression_bytes: dict[tuple[str, str], int] = {}
        registry.register(_RequestSeries(self, labels, ["upstream", *who]))
        self.config_reloads = Counter(
            "proxy_config_reloads",
            "Reloads of watched files (token, client auth), by file and result.",
            ["file", "result"],
            registry=registry,
        )
        self.websockets = Gauge(
            "proxy_websockets_open",
            "WebSocket sessions (e.g. Loki live tail) open now.",
            ["upstream"],
            registry=registry,
        )
        # Shared budgets (RATE_LIMIT_REDIS_URL, lgmt_proxy/limits/shared.py).
        self.ratelimit_backend_errors = Counter(
            "proxy_ratelimit_backend_errors",
            "Redis failures of shared budgets, by reason; each decision it did not "
            "answer was taken by this replica alone.",
            ["reason"],
            registry=registry,
        )
        self.ratelimit_shared_state = Gauge(
            "proxy_ratelimit_shared",
            "1 while consumers' budgets are shared by every replica through Redis, "
            "0 while this replica decides alone (no RATE_LIMIT_REDIS_URL, or Redis failing).",
            registry=registry,
        )
        build = Gauge(
            "lgmt_proxy_build_info",
            "lgmt-proxy's version, and the Python and Twisted it runs on; always 1.",
            ["version", "python", "twisted"],
            registry=registry,
        )
        build.labels(*build_labels()).set(1)

    def ratelimit_backend_error(self, reason: str) -> None:
        self.ratelimit_backend_errors.labels(reason).inc()

    def ratelimit_shared(self, shared: bool) -> None:
        self.ratelimit_shared_state.set(1 if shared else 0)

    def websocket(self, upstream: str, delta: int) -> None:
        self.websockets.labels(upstream).inc(delta)

    def compressed(self, upstream: str, before: int, after: int) -> None:
        """A request body that went up gzip'd: its bytes before and after."""
        tally = self.compression_bytes
        for key, n in (((upstream, "before"), before), ((upstream, "after"), after)):
            tally[key] = tally.get(key, 0) + n

    def started(self, upstream: str) -> None:
        self.in_flight[upstream] = self.in_flight.get(upstream, 0) + 1

    def ended(self, upstream: str) -> None:
        self.in_flight[upstream] = self.in_flight.get(upstream, 0) - 1

    def request(
        self,
        upstream: str,
        method: str,
        status: str,
        duration: float,
        body_in: int,
        body_out: int,
        error: str | None,
        consumer: str | None = None,
        *,
        from_upstream: bool = False,
        tenant: str | None = None,
    ) -> None:
        if self.consumer_label or self.tenant_label:
            extra = []
            if self.consumer_label:
                extra.append(consumer or "none")
            if self.tenant_label:
                extra.append(tenant or "none")
            key: tuple[str, ...] = (upstream, method, status, *extra)
            bytes_key: tuple[str, ...] = (upstream, *extra)
        else:
            key = (upstream, method, status)
            bytes_key = (upstream,)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        durations = self.durations
        counts = durations.get((upstream, method))
        if counts is None:
            counts = durations[(upstream, method)] = [0] * (len(BUCKETS) + 2)
        # le is inclusive: the first bound not below the duration.
        counts[bisect_left(BUCKETS, duration)] += 1
        counts[-1] += duration
        if body_in:
            self.request_bytes[bytes_key] = self.request_bytes.get(bytes_key, 0) + body_in
        if body_out:
            self.response_bytes[bytes_key] = self.response_bytes.get(bytes_key, 0) + body_out
        if error is not None:
            errors = self.upstream_errors
            errors[(upstream, error)] = errors.get((upstream, error), 0) + 1
        if from_upstream:
            answers = self.upstream_responses
            answers[(upstream, status)] = answers.get((upstream, status), 0) + 1


class _RequestSeries:
    """`ProxyMetrics`' tallies as metric families, at scrape time; names,
    types and labels as prometheus_client's own Counter/Histogram/Gauge made
    them (the service we replace exported the same)."""

    def __init__(
        self, metrics: ProxyMetrics, request_labels: list[str], bytes_labels: list[str]
    ) -> None:
        self.metrics = metrics
        self.request_labels = request_labels
        self.bytes_labels = bytes_labels
        self.bounds = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield _tally(
            CounterMetricFamily,
            "proxy_requests",
            "Requests answered on proxy routes, by upstream, method and status.",
            self.request_labels,
            m.requests,
        )
        yield _tally(
            CounterMetricFamily,
            "proxy_upstream_responses",
            "Responses that came from the upstream itself, by upstream and status "
            "(the proxy's own refusals and failures are not counted here).",
            ["upstream", "status"],
            m.upstream_responses,
        )
        duration = HistogramMetricFamily(
            "proxy_request_duration_seconds",
            "Whole-request duration, body streaming included.",
            labels=["upstream", "method"],
        )
        for key, counts in m.durations.items():
            cumulative = list(accumulate(counts[:-1]))
            duration.add_metric(
                key, list(zip(self.bounds, cumulative, strict=True)), sum_value=counts[-1]
            )
        yield duration
        yield _tally(
            CounterMetricFamily,
            "proxy_upstream_errors",
            "Requests that did not complete, by upstream and reason: upstream failures, "
            "client aborts, bodies over the limit.",
            ["upstream", "reason"],
            m.upstream_errors,
        )
        yield _tally(
            GaugeMetricFamily,
            "proxy_requests_in_flight",
            "Proxied requests in progress.",
            ["upstream"],
            {(k,): n for k, n in m.in_flight.items()},
        )
        yield _tally(
            CounterMetricFamily,
            "proxy_request_body_bytes",
            "Request body bytes received from clients (by consumer with client auth on).",
            self.bytes_labels,
            m.request_bytes,
        )
        yield _tally(
            CounterMetricFamily,
            "proxy_response_body_bytes",
            "Response body bytes sent to clients (by consumer with client auth on).",
            self.bytes_labels,
            m.response_bytes,
        )
        yield _tally(
            CounterMetricFamily,
            "proxy_upstream_compression_bytes",
            "Request body bytes gzip'd on the way upstream (UPSTREAM_COMPRESSION), by "
            "upstream and stage: before (as the client sent them) and after (as sent).",
            ["upstream", "stage"],
            m.compression_bytes,
        )


def _tally(kind: Any, name: str, doc: str, labels: list[str], tally: Mapping[Any, float]) -> Metric:
    """One counter or gauge family from a tally keyed by label values."""
    family = kind(name, doc, labels=labels)
    for key, value in tally.items():
        family.add_metric(key, value)
    return family


def build_labels() -> tuple[str, str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import twisted

    try:
        ours = version("lgmt-proxy")
    except PackageNotFoundError:
        ours = "unknown"
    return ours, platform.python_version(), twisted.__version__


class WithoutCreated:
    """A registry's metrics less the ``_created`` series prometheus_client
    adds to every counter and histogram: they doubled the series count and
    the service we replace had none. A view, so no process-wide switch."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric
