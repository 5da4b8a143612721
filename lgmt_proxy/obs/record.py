"""Recording each request once, when it ends: metrics and one access-log line."""

from __future__ import annotations

import itertools
import os
import time

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.obs.logs import ACCESS_NAMESPACE, StreamObserver
from lgmt_proxy.obs.metrics import ProxyMetrics, method_label

_MAX_ID = 128


class _Ids:
    """Request ids unique across processes and restarts: a random per-process
    prefix and a counter (os.urandom per request cost ~1.5% of a small GET),
    in hex from 2**32 on (nine digits for the first 64 Gi requests: ``hex``
    costs half of a fixed-width format)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(5).hex()
        self._next = itertools.count(1 << 32).__next__

    def __call__(self) -> str:
        return self._prefix + hex(self._next())[2:]


_new_id = _Ids()


def request_id(value: bytes | None) -> str:
    """The client's ``X-Request-Id`` if it is short and printable, else a new one."""
    if value and len(value) <= _MAX_ID and value.isascii():
        text = value.decode("ascii")
        if text.isprintable():
            return text
    return _new_id()


class Recorder:
    """Counts and logs each request exactly once, when it ends.

    Only requests on proxy routes are counted (as in the service we replace):
    /health, /ready, /metrics and 404s are not, and probes and scrapes are
    access-logged at debug only."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        clock: IReactorTime,
        access_sink: StreamObserver | None = None,
        *,
        log_quiet: bool = False,
        access_log: bool = True,
    ) -> None:
        """``access_log``: False when the level hides access lines (warn,
        error): no line is built at all. ``log_quiet``: probes and scrapes
        too (debug)."""
        self.metrics = metrics
        self._clock = clock
        self._log = Logger(namespace=ACCESS_NAMESPACE)
        self._sink = access_sink
        self._log_quiet = log_quiet
        self._access_log = access_log

    def _access(self, access: dict[str, object]) -> None:
        if self._sink is not None:
            self._sink.access(access, time.time())
        else:
            self._log.info("request", access=access)

    def started(self, request: Incoming) -> None:
        self.metrics.started(request.upstream_name)

    def websocket(self, upstream: str, delta: int) -> None:
        """A WebSocket session opened (+1) or closed (-1): the open-sessions gauge."""
        self.metrics.websocket(upstream, delta)

    def refused(
        self,
        status: int,
        client: str,
        reason: str,
        *,
        method: bytes = b"",
        path: bytes = b"",
        bytes_out: int = 0,
    ) -> None:
        """A request refused before it could be parsed (hostile input, overload):
        logged, not counted (it has no route). ``method`` and ``path``: what
        was read of its request line (the path already cut to a bound)."""
        if not self._access_log:
            return
        self._access(
            {
                "method": method.decode("latin-1"),
                "path": path.decode("latin-1"),
                "upstream": "none",
                "status": status,
                "duration": 0.0,
                "bytes_in": 0,
                "bytes_out": bytes_out,
                "client": client,
                "user_agent": "",
                "request_id": request_id(None),
                "error": reason,
            }
        )

    def finished(self, request: Incoming, client: str) -> None:
        upstream = request.upstream_name
        status = request.status or 499
        duration = self._clock.seconds() - request.started
        error = request.error
        if request.in_flight:
            request.in_flight = False
            self.metrics.ended(upstream)
        if request.counted:
            request.counted = False
            self.metrics.request(
                upstream,
                method_label(request.method),
                str(status),
                duration,
                request.body_in,
                request.body_out,
                error,
                request.consumer,
                from_upstream=request.from_upstream,
                tenant=None if request.tenant is None else request.tenant.decode("latin-1"),
            )
            gzip = request.gzip
            if gzip is not None:
                self.metrics.compressed(upstream, gzip.before, gzip.after)
        if not self._access_log or (request.quiet and not self._log_quiet):
            return
        ua = request.user_agent
        access = {
            "method": request.method.decode("latin-1"),
            "path": (request.path or request.target).decode("latin-1"),
            "upstream": upstream,
            "status": status,
            "duration": duration,
            "bytes_in": request.body_in,
            "bytes_out": request.body_out,
            "client": client,
            "user_agent": ua.decode("latin-1") if ua else "",
            "request_id": request_id(request.request_id),
        }
        if error is not None:
            access["error"] = error
        if request.consumer is not None:
            access["consumer"] = request.consumer
        if request.tenant is not None:
            access["tenant"] = request.tenant.decode("latin-1")
        self._access(access)
