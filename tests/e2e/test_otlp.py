"""The OpenTelemetry SDK's OTLP/HTTP exporters (traces, metrics, logs) with no
credentials, through the proxy, plain and gzip-compressed; the upstream parses
every body with opentelemetry-proto and accepts it only with the proxy's
credentials. The traces are then read back through Tempo's API."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from twisted.trial.unittest import TestCase

from ..support.helpers import ORG, basic, call
from .clients import OtlpRun, otlp_export
from .peers import fake_cloud_behind_proxy
from .upstream import FakeCloud, Otlp


class OtlpExportTests(TestCase):
    timeout = 90

    async def _stack(self) -> tuple[FakeCloud, str, str]:
        return await fake_cloud_behind_proxy(self, "otlp", "tempo")

    def _assert_arrived(self, cloud: FakeCloud, run: OtlpRun, gzip: bool) -> None:
        self.assertEqual(
            run.failures(),
            {},
            f"exports failed (the upstream refused {len(cloud.rejected)}): {run.messages}",
        )
        by_kind: dict[str, list[Otlp]] = {}
        for request in cloud.otlp:
            by_kind.setdefault(request.kind, []).append(request)
        self.assertEqual(set(by_kind), {"traces", "metrics", "logs"})
        for seen in cloud.seen:
            self.assertEqual(seen.header(b"Authorization"), [basic(ORG["otlp"])])
            self.assertEqual(seen.header(b"Content-Type"), [b"application/x-protobuf"])
        for request in cloud.otlp:
            if gzip:
                # The exporter's gzip bytes, untouched, with their header.
                self.assertEqual(request.content_encoding, b"gzip")
                self.assertEqual(request.raw[:2], b"\x1f\x8b")
            else:
                self.assertIsNone(request.content_encoding)

        spans = {
            span.name: span
            for request in by_kind["traces"]
            for rs in request.message.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        }
        self.assertEqual(set(spans), {run.root_span, run.child_span})
        self.assertEqual(spans[run.root_span].trace_id.hex(), run.trace_id)
        self.assertEqual(spans[run.child_span].parent_span_id, spans[run.root_span].span_id)

        metrics = {
            metric.name: metric
            for request in by_kind["metrics"]
            for rm in request.message.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        self.assertIn(run.metric, metrics)
        point = metrics[run.metric].sum.data_points[0]
        self.assertEqual(point.as_int, 3)

        bodies = [
            record.body.string_value
            for request in by_kind["logs"]
            for rl in request.message.resource_logs
            for sl in rl.scope_logs
            for record in sl.log_records
        ]
        self.assertEqual(bodies, [run.log_body])

    async def _tempo_read_back(self, proxy: str, run: OtlpRun) -> None:
        response, body = await call(f"{proxy}/tempo/api/traces/{run.trace_id}")
        self.assertEqual(response.code, 200, body)
        names = {
            span["name"]
            for batch in json.loads(body)["batches"]
            for ss in batch["scopeSpans"]
            for span in ss["spans"]
        }
        self.assertEqual(names, {run.root_span, run.child_span})
        params = urlencode({"tags": "service.name=lgmt-e2e", "limit": "20"})
        response, body = await call(f"{proxy}/tempo/api/search?{params}")
        self.assertEqual(response.code, 200, body)
        found = {t["traceID"]: t["rootTraceName"] for t in json.loads(body)["traces"]}
        self.assertEqual(found.get(run.trace_id), run.root_span)

    async def test_traces_metrics_logs(self) -> None:
        cloud, direct, proxy = await self._stack()
        run = await otlp_export(proxy)
        self._assert_arrived(cloud, run, gzip=False)
        await self._tempo_read_back(proxy, run)

        # The same exporters straight at the upstream: every export refused.
        accepted = len(cloud.otlp)
        run = await otlp_export(direct)
        self.assertEqual(set(run.results), {"traces", "metrics", "logs"})
        for kind, results in run.results.items():
            self.assertTrue(results, kind)
            self.assertNotIn("SUCCESS", results, kind)
        self.assertTrue(any("401" in m for m in run.messages), run.messages)
        self.assertEqual(len(cloud.otlp), accepted)
        self.assertGreaterEqual(len(cloud.rejected), 3)

    async def test_gzip_compressed_exports_pass_untouched(self) -> None:
        cloud, direct, proxy = await self._stack()
        run = await otlp_export(proxy, gzip=True)
        self._assert_arrived(cloud, run, gzip=True)

        run = await otlp_export(direct, gzip=True)
        self.assertNotIn("SUCCESS", run.results["traces"])
