"""OTLP over gRPC (OTLP_GRPC_LISTEN) with real gRPC peers: the OpenTelemetry
SDK's OTLP/gRPC exporters (grpcio underneath) send traces, metrics and logs,
plain and gzip, through a ``twistd`` proxy to an OTLP/HTTP upstream that
parses every message with opentelemetry-proto and accepts it only with the
proxy's credentials, and the same spans arrive as the same bytes as from
the SDK's OTLP/HTTP exporter; a 429 upstream makes the SDK retry after the
``Retry-After`` delay; a bare grpcio client sees each upstream status as the
gRPC status the OTLP specification names, ``RetryInfo`` included."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET

from lgmt_proxy.dataplane.grpc_server import GrpcFactory
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    env_for,
    free_port,
    listen,
    sleep,
    spawn_proxy,
    upstream_site,
)

from .clients import OTLP_GRPC_MODULES, otlp_export
from .peers import need_modules, start_proxy
from .test_otlp import OtlpExportTests
from .upstream import FakeCloud

TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class SdkGrpcExportTests(TestCase):
    timeout = 90

    async def _export(self, gzip: bool) -> None:
        need_modules(*OTLP_GRPC_MODULES)
        cloud = FakeCloud()
        port = listen(upstream_site(cloud))
        self.addCleanup(port.stopListening)
        direct = f"http://127.0.0.1:{port.getHost().port}"
        grpc_port = free_port()
        proxy = await start_proxy(
            self,
            {"otlp": direct},
            {"OTLP_GRPC_LISTEN": f"tcp:{grpc_port}:interface=127.0.0.1"},
        )
        run = await otlp_export(proxy.url, gzip=gzip, grpc=f"127.0.0.1:{grpc_port}")
        # The same checks as for the SDK's OTLP/HTTP exporters: every span,
        # metric and log arrived, parsed, with the proxy's credentials.
        OtlpExportTests._assert_arrived(self, cloud, run, gzip)  # type: ignore[arg-type]
        self.assertEqual(
            {s.uri for s in cloud.seen}, {b"/otlp/v1/logs", b"/otlp/v1/metrics", b"/otlp/v1/traces"}
        )

    async def test_traces_metrics_logs(self) -> None:
        await self._export(gzip=False)

    async def test_same_bytes_as_the_http_exporter(self) -> None:
        """The same spans through the SDK's HTTP and gRPC exporters arrive
        upstream as the same bytes, with the same credentials."""
        need_modules(*OTLP_GRPC_MODULES)
        cloud = FakeCloud()
        port = listen(upstream_site(cloud))
        self.addCleanup(port.stopListening)
        grpc_port = free_port()
        proxy = await start_proxy(
            self,
            {"otlp": f"http://127.0.0.1:{port.getHost().port}"},
            {"OTLP_GRPC_LISTEN": f"tcp:{grpc_port}:interface=127.0.0.1"},
        )
        results = await deferToThread(_both_exporters, proxy.url, f"127.0.0.1:{grpc_port}")
        self.assertEqual(results, ("SUCCESS", "SUCCESS"))
        over_http, over_grpc = [r for r in cloud.otlp if r.kind == "traces"]
        self.assertEqual(over_grpc.raw, over_http.raw)
        self.assertEqual(len(over_http.message.resource_spans[0].scope_spans[0].spans), 2)
        auth = {tuple(s.header(b"Authorization") or ()) for s in cloud.seen}
        self.assertEqual(auth, {(basic(ORG["otlp"]),)})

    async def test_traces_metrics_logs_gzip(self) -> None:
        await self._export(gzip=True)


def _both_exporters(http_base: str, grpc_target: str) -> tuple[str, str]:
    """Two spans exported once over OTLP/HTTP, then over OTLP/gRPC."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("lgmt-e2e")
    with tracer.start_as_current_span("same-root"), tracer.start_as_current_span("same-child"):
        pass
    spans = memory.get_finished_spans()
    over_http = HttpExporter(endpoint=f"{http_base}/otlp/v1/traces", timeout=10).export(spans)
    over_grpc = GrpcExporter(endpoint=grpc_target, insecure=True, timeout=10).export(spans)
    provider.shutdown()
    return over_http.name, over_grpc.name


class _Sequence(Recorder):
    """Answers with each status of ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[tuple[int, list[tuple[bytes, bytes]]]]) -> None:
        super().__init__()
        self.statuses = statuses
        self.body = b""

    def render(self, request: Any) -> bytes:
        self.status, self.headers = self.statuses.pop(0) if self.statuses else (200, [])
        return super().render(request)


def _unary(target: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """One unary call with grpcio: ("ok", response) or (code, details, trailers)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(TRACES)
        try:
            return ("ok", call(payload, timeout=10, metadata=metadata))
        except grpc.RpcError as e:
            return (e.code().value[0], e.details(), dict(e.trailing_metadata() or ()))  # type: ignore[attr-defined]


class GrpcioStatusTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        need_modules("grpc", "google.rpc.error_details_pb2", "google.rpc.status_pb2")
        self.up = _Sequence([])
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        grpc = GrpcFactory(proxy.factory)
        grpc_port = listen(grpc)
        self.addCleanup(grpc_port.stopListening)

        def cut() -> None:
            for connection in list(grpc.connections):
                connection.close_now()

        self.addCleanup(cut)
        self.target = f"127.0.0.1:{grpc_port.getHost().port}"

    async def test_each_status(self) -> None:
        from google.rpc import error_details_pb2, status_pb2

        expected = {
            400: 3,  # INVALID_ARGUMENT
            401: 16,  # UNAUTHENTICATED
            403: 7,  # PERMISSION_DENIED
            404: 12,  # UNIMPLEMENTED
            413: 8,  # RESOURCE_EXHAUSTED
            429: 8,  # RESOURCE_EXHAUSTED, with RetryInfo
            500: 13,  # INTERNAL
            503: 14,  # UNAVAILABLE
        }
        for status, code in expected.items():
            headers = [(b"Retry-After", b"7")] if status == 429 else []
            self.up.statuses = [(status, headers)]
            answer = await deferToThread(_unary, self.target, b"\x0a\x00")
            self.assertEqual(answer[:2], (code, f"upstream answered {status}"), status)
            trailers = answer[2]
            if status == 429:
                retry = error_details_pb2.RetryInfo()
                retry.ParseFromString(trailers["google.rpc.retryinfo-bin"])
                self.assertEqual(retry.retry_delay.seconds, 7)
                details = status_pb2.Status()
                details.ParseFromString(trailers["grpc-status-details-bin"])
                self.assertEqual((details.code, details.message), (8, "upstream answered 429"))
                unpacked = error_details_pb2.RetryInfo()
                self.assertTrue(details.details[0].Unpack(unpacked))
                self.assertEqual(unpacked.retry_delay.seconds, 7)
            else:
                self.assertNotIn("grpc-status-details-bin", trailers)
        self.assertEqual(len(self.up.seen), len(expected))
        for seen in self.up.seen:
            self.assertEqual(seen.header(b"Authorization"), [basic(ORG["otlp"])])
            self.assertEqual(seen.body, b"\x0a\x00")

    async def test_ok_and_metadata(self) -> None:
        self.up.body = b"\x0a\x02\x08\x05"
        answer = await deferToThread(
            _unary, self.target, b"\x0a\x00", (("x-request-id", "req-1"), ("other", "dropped"))
        )
        self.assertEqual(answer, ("ok", b"\x0a\x02\x08\x05"))
        seen = self.up.seen[-1]
        self.assertEqual(seen.header(b"X-Request-Id"), [b"req-1"])
        self.assertIsNone(seen.header(b"other"))
        self.assertEqual(seen.header(b"X-Scope-OrgID"), [ORG["otlp"].encode()])

    async def test_sdk_retries_after_429(self) -> None:
        """The SDK's gRPC exporter waits the RetryInfo delay and sends again."""
        need_modules(*OTLP_GRPC_MODULES)
        self.up.statuses = [(429, [(b"Retry-After", b"1")])]
        run = await otlp_export("http://unused", grpc=self.target)
        self.assertEqual(run.failures(), {}, run.messages)
        uris = [s.uri for s in self.up.seen]
        self.assertEqual(uris.count(b"/otlp/v1/traces"), 2)  # refused once, then sent again
        self.assertEqual(self.up.seen[0].body, self.up.seen[1].body)


class _Slow(Recorder):
    """Answers 200 (an empty Export response) 1.5 s after each request."""

    def render(self, request: Any) -> Any:
        from twisted.internet import reactor

        super().render(request)

        def answer() -> None:
            request.write(b"")
            request.finish()

        reactor.callLater(1.5, answer)  # type: ignore[attr-defined]
        return NOT_DONE_YET


class GrpcDrainTests(TestCase):
    timeout = 60

    async def test_sigterm_answers_the_call_in_progress(self) -> None:
        """SIGTERM while a grpcio call waits for the upstream: GOAWAY, the
        call is still answered OK, the process exits 0."""
        need_modules("grpc")
        up = _Slow()
        up.body = b""
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        grpc_port = free_port()
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            OTLP_GRPC_LISTEN=f"tcp:{grpc_port}:interface=127.0.0.1",
            SHUTDOWN_DELAY_SECONDS="0.5",
            SHUTDOWN_GRACE_SECONDS="10",
        )
        proc = await spawn_proxy(env)
        self.addCleanup(lambda: proc.ended)
        call = deferToThread(_unary, f"127.0.0.1:{grpc_port}", b"\x0a\x00")
        while not up.seen:
            await sleep(0.05)
        proc.signal("TERM")
        self.assertEqual(await call, ("ok", b""))
        code = await proc.ended
        out = proc.output.decode()
        self.assertEqual(code, 0, out)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        access = [x for x in lines if x.get("msg") == "request"]
        self.assertEqual([(x["path"], x["status"]) for x in access], [(TRACES, 200)])
        self.assertTrue(any("OTLP over gRPC (h2c) on 127.0.0.1:" in x["msg"] for x in lines))


def _tls_exports(target: str, ca_pem: bytes) -> tuple[Any, str]:
    """Over TLS, trusting only ``ca_pem``: one call with a bare grpcio
    channel, then two spans with the SDK's gRPC exporter (insecure=False)."""
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(target, credentials) as channel:
        try:
            answer: Any = ("ok", channel.unary_unary(TRACES)(b"\x0a\x00", timeout=10))
        except grpc.RpcError as e:
            answer = (e.code(), e.details())  # type: ignore[attr-defined]
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("lgmt-e2e-tls")
    with tracer.start_as_current_span("tls-root"), tracer.start_as_current_span("tls-child"):
        pass
    exporter = OTLPSpanExporter(
        endpoint=f"https://{target}", insecure=False, credentials=credentials, timeout=10
    )
    result = exporter.export(memory.get_finished_spans())
    exporter.shutdown()
    provider.shutdown()
    return answer, result.name


class GrpcTLSTests(TestCase):
    timeout = 90

    async def test_grpcio_and_sdk_over_tls(self) -> None:
        """``twistd`` with OTLP_GRPC_TLS_CERT_FILE/_KEY_FILE: grpcio (which
        requires ALPN h2) and the SDK's exporter, each trusting only the
        test's CA, get their calls through; the start-up line says TLS."""
        from tests.loopback.test_grpc_tls import write_tls_files

        need_modules(*OTLP_GRPC_MODULES)
        cloud = FakeCloud()
        port = listen(upstream_site(cloud))
        self.addCleanup(port.stopListening)
        cert_file, key_file, ca_pem = write_tls_files(self.mktemp())
        grpc_port = free_port()
        proxy = await start_proxy(
            self,
            {"otlp": f"http://127.0.0.1:{port.getHost().port}"},
            {
                "OTLP_GRPC_LISTEN": f"tcp:{grpc_port}:interface=127.0.0.1",
                "OTLP_GRPC_TLS_CERT_FILE": cert_file,
                "OTLP_GRPC_TLS_KEY_FILE": key_file,
                "LOG_LEVEL": "info",
            },
        )
        answer, exported = await deferToThread(_tls_exports, f"localhost:{grpc_port}", ca_pem)
        self.assertEqual(answer[0], "ok", answer)
        self.assertEqual(exported, "SUCCESS")
        traces = [r for r in cloud.otlp if r.kind == "traces"]
        self.assertEqual(len(traces), 2)
        spans = traces[1].message.resource_spans[0].scope_spans[0].spans
        self.assertEqual(sorted(s.name for s in spans), ["tls-child", "tls-root"])
        auth = {tuple(s.header(b"Authorization") or ()) for s in cloud.seen}
        self.assertEqual(auth, {(basic(ORG["otlp"]),)})
        self.assertIn("OTLP over gRPC (TLS, ALPN h2, CN=localhost until", proxy.output.decode())
