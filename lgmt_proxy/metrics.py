"""The proxy's Prometheus metrics, on a registry that is passed in.

Names and buckets of the first two series match the service we replace, so
dashboards and alerts keep working.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: Methods that keep their own label value; anything else is "other".
METHODS = {
    m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")
}


def method_label(method: bytes | None) -> str:
    return METHODS.get(method or b"", "other")


class ProxyMetrics:
    """All series the proxy exports. Label children are cached per value set:
    ``labels()`` per request costs more than the increment."""

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
        labels = ["upstream", "method", "status"]
        if consumer_label:
            labels.append("consumer")
        if tenant_label:
            labels.append("tenant")
        self.requests = Counter(
            "proxy_requests",
            "Requests handled, by upstream, method and status.",
            labels,
            registry=registry,
        )
        self.upstream_responses = Counter(
            "proxy_upstream_responses",
            "Responses that came from the upstream itself, by upstream and status "
            "(the proxy's own refusals and failures are not counted here).",
            ["upstream", "status"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "proxy_config_reloads",
            "Reloads of watched files (token, client auth), by file and result.",
            ["file", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "proxy_request_duration_seconds",
            "Whole-request duration, body streaming included.",
            ["upstream", "method"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "proxy_upstream_errors",
            "Requests that failed, by upstream and reason.",
            ["upstream", "reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "proxy_requests_in_flight",
            "Proxied requests in progress.",
            ["upstream"],
            registry=registry,
        )
        self.request_bytes = Counter(
            "proxy_request_body_bytes",
            "Request body bytes received from clients.",
            ["upstream"],
            registry=registry,
        )
        self.response_bytes = Counter(
            "proxy_response_body_bytes",
            "Response body bytes sent to clients.",
            ["upstream"],
            registry=registry,
        )
        self.websockets = Gauge(
            "proxy_websockets_open",
            "WebSocket sessions (e.g. Loki live tail) open now.",
            ["upstream"],
            registry=registry,
        )
        build = Gauge(
            "lgmt_proxy_build_info",
            "lgmt-proxy's version, and the Python and Twisted it runs on; always 1.",
            ["version", "python", "twisted"],
            registry=registry,
        )
        build.labels(*build_labels()).set(1)
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def websocket(self, upstream: str, delta: int) -> None:
        self._child(self.websockets, upstream).inc(delta)

    def started(self, upstream: str) -> None:
        self._child(self.in_flight, upstream).inc()

    def ended(self, upstream: str) -> None:
        self._child(self.in_flight, upstream).dec()

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
        c = self._child
        if self.consumer_label or self.tenant_label:
            extra = []
            if self.consumer_label:
                extra.append(consumer or "none")
            if self.tenant_label:
                extra.append(tenant or "none")
            c(self.requests, upstream, method, status, *extra).inc()
        else:
            c(self.requests, upstream, method, status).inc()
        c(self.duration, upstream, method).observe(duration)
        if body_in:
            c(self.request_bytes, upstream).inc(body_in)
        if body_out:
            c(self.response_bytes, upstream).inc(body_out)
        if error is not None:
            c(self.upstream_errors, upstream, error).inc()
        if from_upstream:
            c(self.upstream_responses, upstream, status).inc()


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
