"""The real client libraries, driven as their users drive them.

The Python ones block (``requests``), so each runs in a reactor thread
(`deferToThread`) while the reactor serves the upstream; winston-loki runs
under node in a subprocess.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any

import attrs
from twisted.internet.threads import deferToThread

from .peers import NODE_DIR, child_env, need_modules, need_node_packages, run

OTLP_MODULES = (
    "opentelemetry.sdk",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.proto",
    "google.protobuf",
)


@attrs.define
class OtlpRun:
    """What one OTLP export session produced: every exporter's results and the
    names it used, to look for at the upstream."""

    results: dict[str, list[str]]
    trace_id: str
    root_span: str
    child_span: str
    metric: str
    log_body: str
    messages: list[str]  # what the SDK logged (export errors), instead of stderr

    def failures(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.results.items() if not v or set(v) != {"SUCCESS"}}


#: The SDK's OTLP/gRPC exporters (OTLP_GRPC_LISTEN).
OTLP_GRPC_MODULES = (
    "opentelemetry.sdk",
    "opentelemetry.exporter.otlp.proto.grpc",
    "opentelemetry.proto",
    "google.protobuf",
    "grpc",
)


def _otlp_export(base_url: str, run_id: str, gzip: bool, grpc: str | None = None) -> OtlpRun:
    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.name}: {record.getMessage()}")

    messages: list[str] = []
    sdk_logger = logging.getLogger("opentelemetry")
    capture, propagate = Capture(logging.WARNING), sdk_logger.propagate
    sdk_logger.addHandler(capture)
    sdk_logger.propagate = False
    try:
        return _otlp_session(base_url, run_id, gzip, messages, grpc)
    finally:
        sdk_logger.removeHandler(capture)
        sdk_logger.propagate = propagate


def _otlp_session(
    base_url: str, run_id: str, gzip: bool, messages: list[str], grpc: str | None
) -> OtlpRun:
    """``grpc``: the ``host:port`` of the gRPC exporters (else OTLP/HTTP to ``base_url``)."""
    if grpc is not None:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[assignment]
            OTLPLogExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    compression = Compression.Gzip if gzip else Compression.NoCompression
    results: dict[str, list[str]] = {"traces": [], "metrics": [], "logs": []}

    def recording(cls: Any, kind: str) -> Any:
        class Recording(cls):  # type: ignore[misc, valid-type]
            def export(self, *args: Any, **kwargs: Any) -> Any:
                result = super().export(*args, **kwargs)
                results[kind].append(result.name)
                return result

        if grpc is not None:
            import grpc as grpcio

            return Recording(
                endpoint=grpc,
                insecure=True,
                timeout=10,
                compression=grpcio.Compression.Gzip if gzip else grpcio.Compression.NoCompression,
            )
        return Recording(endpoint=f"{base_url}/otlp/v1/{kind}", compression=compression, timeout=10)

    resource = Resource.create({"service.name": "lgmt-e2e", "lgmt.e2e.run": run_id})
    root_span, child_span = f"e2e-root-{run_id}", f"e2e-child-{run_id}"
    metric = f"lgmt_e2e_pushes_{run_id}"
    log_body = f"e2e log line {run_id} ✓"

    # Traces: the SDK's batch processor, flushed.
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(recording(OTLPSpanExporter, "traces")))
    tracer = tracer_provider.get_tracer("lgmt-e2e")
    with tracer.start_as_current_span(root_span) as root:
        with tracer.start_as_current_span(child_span):
            pass
    trace_id = format(root.get_span_context().trace_id, "032x")
    tracer_provider.force_flush(15_000)
    tracer_provider.shutdown()

    # Metrics: a periodic reader that only exports when flushed.
    reader = PeriodicExportingMetricReader(
        recording(OTLPMetricExporter, "metrics"), export_interval_millis=3_600_000
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    counter = meter_provider.get_meter("lgmt-e2e").create_counter(metric, unit="1")
    counter.add(3, {"run": run_id})
    meter_provider.force_flush(15_000)
    meter_provider.shutdown()

    # Logs: the stdlib logging bridge.
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(recording(OTLPLogExporter, "logs"))
    )
    handler = LoggingHandler(level=logging.INFO, logger_provider=logger_provider)
    logger = logging.getLogger(f"lgmt_e2e.otlp.{run_id}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.warning(log_body)
        logger_provider.force_flush(15_000)
    finally:
        logger.removeHandler(handler)
        logger_provider.shutdown()
    return OtlpRun(results, trace_id, root_span, child_span, metric, log_body, messages)


async def otlp_export(base_url: str, *, gzip: bool = False, grpc: str | None = None) -> OtlpRun:
    """Traces, metrics and logs with the OpenTelemetry SDK's OTLP/HTTP exporters
    to ``base_url + /otlp/v1/...``, no credentials of their own; with
    ``grpc`` (``host:port``) its OTLP/gRPC exporters there instead."""
    need_modules(*(OTLP_MODULES if grpc is None else OTLP_GRPC_MODULES))
    return await deferToThread(_otlp_export, base_url, uuid.uuid4().hex[:12], gzip, grpc)


def _python_logging_loki(url: str, tags: dict[str, str], lines: list[str]) -> list[str]:
    import logging_loki

    errors: list[str] = []

    class Handler(logging_loki.LokiHandler):  # type: ignore[misc]
        def handleError(self, record: logging.LogRecord) -> None:
            errors.append(repr(sys.exc_info()[1]))
            self.emitter.close()

    handler = Handler(url=url, tags=tags, version="1")
    logger = logging.getLogger(f"lgmt_e2e.loki.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for line in lines:
            logger.info(line)
    finally:
        logger.removeHandler(handler)
        handler.close()
    return errors


async def python_logging_loki(url: str, tags: dict[str, str], lines: list[str]) -> list[str]:
    """Log ``lines`` through python-logging-loki's LokiHandler (JSON push, one
    request per record); returns its errors (it fails on anything but 204)."""
    need_modules("logging_loki", "requests")
    return await deferToThread(_python_logging_loki, url, tags, lines)


async def winston_loki(host: str, labels: dict[str, str], lines: list[str]) -> tuple[int, str]:
    """Log ``lines`` through winston with winston-loki (``json: false``:
    protobuf + snappy); (node's exit code, its output)."""
    node = need_node_packages("winston", "winston-loki", "snappy")
    import json

    argv = [node, os.path.join(NODE_DIR, "push.js"), host, json.dumps(labels), *lines]
    return await run("winston-loki", argv, env=child_env(), cwd=NODE_DIR, timeout=60)
