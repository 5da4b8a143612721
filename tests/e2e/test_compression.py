"""Compressed egress end to end: the OpenTelemetry SDK's OTLP/HTTP exporters
(compression none, their default) and python-logging-loki's JSON pushes
through a ``twistd`` proxy with ``UPSTREAM_COMPRESSION=gzip``; the upstream
receives gzip, decodes the protobuf and the JSON, and accepts them only with
the proxy's credentials. winston-loki's snappy protobuf push is left as it
came, and the proxy's /metrics shows what was saved. The SDK's OTLP/gRPC
exporters through ``OTLP_GRPC_LISTEN`` get the same compression."""

from __future__ import annotations

import uuid

from twisted.trial.unittest import TestCase

from ..support.helpers import ORG, call, free_port, listen, upstream_site
from ..support.otlp_bodies import otlp_protobuf
from . import test_otlp
from .clients import OTLP_GRPC_MODULES, otlp_export, python_logging_loki, winston_loki
from .peers import need_modules, start_proxy
from .upstream import FakeCloud

LINES = ["compressed egress", "a second line, the same labels"]


class CompressedEgressTests(TestCase):
    timeout = 120

    async def _stack(self) -> tuple[FakeCloud, str, str]:
        cloud = FakeCloud()
        port = listen(upstream_site(cloud))
        self.addCleanup(port.stopListening)
        direct = f"http://127.0.0.1:{port.getHost().port}"
        urls = {"otlp": direct, "loki": direct}
        proxy = await start_proxy(self, urls, {"UPSTREAM_COMPRESSION": "gzip"})
        return cloud, direct, proxy.url

    async def _metric(self, proxy: str, upstream: str, stage: str) -> float:
        _, body = await call(proxy + "/metrics")
        name = f'proxy_upstream_compression_bytes_total{{stage="{stage}",upstream="{upstream}"}}'
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    async def test_sdk_http_exporter_without_compression_arrives_gzipd(self) -> None:
        cloud, direct, proxy = await self._stack()
        run = await otlp_export(proxy)  # the exporters' default: no compression
        # Arrived gzip'd (the exporter sent none), parsed, with the credentials.
        test_otlp.OtlpExportTests._assert_arrived(self, cloud, run, gzip=True)  # type: ignore[arg-type]
        for seen in cloud.seen:
            self.assertEqual(seen.header(b"Transfer-Encoding"), [b"chunked"])
            self.assertIsNone(seen.header(b"Content-Length"))
        before = await self._metric(proxy, "otlp", "before")
        after = await self._metric(proxy, "otlp", "after")
        self.assertEqual(after, sum(len(r.raw) for r in cloud.otlp))
        self.assertGreater(before, after)

        # The same exporters straight at the upstream: refused (no credentials).
        run = await otlp_export(direct)
        self.assertNotIn("SUCCESS", run.results["traces"])

    async def test_sdk_grpc_exporter_without_compression_arrives_gzipd(self) -> None:
        # The gRPC bridge's POSTs are compressed like the HTTP exporter's.
        need_modules(*OTLP_GRPC_MODULES)
        cloud = FakeCloud()
        port = listen(upstream_site(cloud))
        self.addCleanup(port.stopListening)
        grpc_port = free_port()
        env = {
            "UPSTREAM_COMPRESSION": "gzip",
            "OTLP_GRPC_LISTEN": f"tcp:{grpc_port}:interface=127.0.0.1",
        }
        direct = f"http://127.0.0.1:{port.getHost().port}"
        proxy = await start_proxy(self, {"otlp": direct}, env)
        run = await otlp_export(proxy.url, grpc=f"127.0.0.1:{grpc_port}")
        test_otlp.OtlpExportTests._assert_arrived(self, cloud, run, gzip=True)  # type: ignore[arg-type]
        for seen in cloud.seen:
            self.assertEqual(seen.header(b"Transfer-Encoding"), [b"chunked"])

    async def test_loki_json_gzipd_snappy_protobuf_untouched(self) -> None:
        cloud, direct, proxy = await self._stack()
        run_id = uuid.uuid4().hex[:12]
        errors = await python_logging_loki(
            f"{proxy}/loki/api/v1/push", {"app": "lgmt-e2e", "run": run_id}, LINES
        )
        self.assertEqual(errors, [], f"the upstream refused {len(cloud.rejected)} pushes")
        pushes = [s for s in cloud.seen if s.method == b"POST"]
        self.assertEqual(len(pushes), len(LINES))
        for push in pushes:
            self.assertEqual(push.header(b"Content-Encoding"), [b"gzip"])
            self.assertEqual(push.body[:2], b"\x1f\x8b")
            self.assertEqual(push.header(b"X-Scope-OrgID"), [ORG["loki"].encode()])
        self.assertEqual([log.line for log in cloud.logs], LINES)

        code, out = await winston_loki(proxy, {"app": "lgmt-e2e-node", "run": run_id}, LINES)
        self.assertEqual(code, 0, out)
        push = [s for s in cloud.seen if s.method == b"POST"][-1]
        self.assertEqual(push.header(b"Content-Type"), [b"application/x-protobuf"])
        self.assertIsNone(push.header(b"Content-Encoding"))
        self.assertEqual([log.line for log in cloud.logs], LINES + LINES)
        self.assertEqual(
            await self._metric(proxy, "loki", "after"), sum(len(p.body) for p in pushes)
        )

        # Straight at the upstream, without the proxy: refused.
        errors = await python_logging_loki(f"{direct}/loki/api/v1/push", {"run": run_id}, LINES[:1])
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("401", errors[0])

    def test_bench_protobuf_body_is_a_valid_export(self) -> None:
        # The hand-encoded body of the compression tests and the bench parses
        # as what the OTLP gateway expects.
        need_modules("opentelemetry.proto")
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        request = trace_service_pb2.ExportTraceServiceRequest.FromString(otlp_protobuf(50))
        (resource_spans,) = request.resource_spans
        (scope_spans,) = resource_spans.scope_spans
        self.assertEqual(len(scope_spans.spans), 50)
        self.assertEqual(len(scope_spans.spans[0].trace_id), 16)
        self.assertEqual(scope_spans.spans[0].kind, 2)
        self.assertEqual(scope_spans.spans[0].attributes[0].key, "http.request.method")
