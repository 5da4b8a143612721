"""Compressed egress, the pure parts: which request bodies are gzip'd
(`compress_request`), the settings (UPSTREAM_COMPRESSION, its level, a
ROUTES_FILE route's ``compression``) and the header rule."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.compression import Compression, parse_compression
from lgmt_proxy.config.routesfile import parse_routes
from lgmt_proxy.config.settings import ConfigError, parse_config
from lgmt_proxy.rules.compression import compress_request
from lgmt_proxy.rules.headers import forward_request_headers

JSON = [(b"Content-Type", b"application/json")]
PROTOBUF = [(b"Content-Type", b"application/x-protobuf")]

BASE = {
    "GRAFANA_CLOUD_ACCESS_TOKEN": "glc_token",
    "GRAFANA_CLOUD_OTLP_URL": "https://otlp-gateway.grafana.net/otlp",
    "GRAFANA_CLOUD_OTLP_ORG_ID": "1",
    "GRAFANA_CLOUD_LOKI_URL": "https://logs.grafana.net",
    "GRAFANA_CLOUD_LOKI_ORG_ID": "2",
    "GRAFANA_CLOUD_PROMETHEUS_URL": "https://prometheus.grafana.net",
    "GRAFANA_CLOUD_PROMETHEUS_ORG_ID": "3",
}


def problems(env: dict[str, str]) -> list[str]:
    try:
        parse_config(env)
    except ConfigError as e:
        return e.problems
    raise AssertionError("expected a ConfigError")


class DecisionTests(TestCase):
    def test_otlp_pushes_json_and_protobuf(self) -> None:
        for path in (b"/otlp/v1/traces", b"/otlp/v1/metrics", b"/otlp/v1/logs", b"/v1/logs"):
            for headers in (JSON, PROTOBUF, []):
                self.assertTrue(compress_request(b"POST", path, headers, True), (path, headers))

    def test_loki_json_push_but_not_snappy_protobuf(self) -> None:
        self.assertTrue(compress_request(b"POST", b"/loki/api/v1/push", JSON, True))
        self.assertTrue(compress_request(b"POST", b"/mount/loki/api/v1/push?x=1", [], True))
        snappy = [(b"content-type", b"Application/X-Protobuf; charset=binary")]
        self.assertFalse(compress_request(b"POST", b"/loki/api/v1/push", snappy, True))
        # OTLP protobuf is not compressed by itself: it is gzip'd.
        self.assertTrue(compress_request(b"POST", b"/otlp/v1/logs", snappy, True))

    def test_never_remote_write_queries_or_other_paths(self) -> None:
        for path in (
            b"/api/prom/push",
            b"/api/prom/api/v1/query",
            b"/loki/api/v1/query_range",
            b"/tempo/api/search",
            b"/otlp/v1/tracesx",
            b"/otlp/v1/traces/more",
            b"/otlp/xv1/traces",
            b"/loki/api/v1/push/x",
            b"/api/v1/push?target=/v1/traces",
        ):
            self.assertFalse(compress_request(b"POST", path, JSON, True), path)

    def test_only_a_post_with_a_body(self) -> None:
        for method in (b"GET", b"PUT", b"HEAD", b"PATCH", b"post"):
            self.assertFalse(compress_request(method, b"/otlp/v1/traces", JSON, True), method)
        self.assertFalse(compress_request(b"POST", b"/otlp/v1/traces", JSON, False))

    def test_never_a_body_already_encoded(self) -> None:
        path = b"/otlp/v1/traces"
        for value in (b"gzip", b"GZIP", b"deflate", b"snappy", b"zstd", b"gzip, identity"):
            headers = [*JSON, (b"Content-Encoding", value)]
            self.assertFalse(compress_request(b"POST", path, headers, True), value)
        for value in (b"identity", b" Identity ", b""):
            headers = [*JSON, (b"content-encoding", value)]
            self.assertTrue(compress_request(b"POST", path, headers, True), value)
        twice = [(b"Content-Encoding", b"identity"), (b"Content-Encoding", b"gzip")]
        self.assertFalse(compress_request(b"POST", path, twice, True))

    def test_header_rule_replaces_the_clients_encoding(self) -> None:
        out = forward_request_headers(
            [(b"Content-Encoding", b"identity"), (b"content-encoding", b""), *JSON],
            host=b"up",
            authorization=None,
            tenant=None,
            client_address=b"10.0.0.1",
            content_encoding=b"gzip",
        )
        encodings = [v for n, v in out if n.lower() == b"content-encoding"]
        self.assertEqual(encodings, [b"gzip"])
        plain = forward_request_headers(
            [(b"Content-Encoding", b"gzip")],
            host=b"up",
            authorization=None,
            tenant=None,
            client_address=b"10.0.0.1",
        )
        self.assertIn((b"Content-Encoding", b"gzip"), plain)


class SettingsTests(TestCase):
    def levels(self, **env: str) -> dict[str, int | None]:
        config = parse_config({**BASE, **env})
        return {name: s.gzip_level for name, s in config.signals.items()}

    def test_off_by_default(self) -> None:
        self.assertEqual(set(self.levels().values()), {None})
        for value in ("", "none", "off", "NONE"):
            self.assertEqual(set(self.levels(UPSTREAM_COMPRESSION=value).values()), {None})

    def test_gzip_is_otlp_and_loki_never_prometheus(self) -> None:
        self.assertEqual(
            self.levels(UPSTREAM_COMPRESSION="gzip"),
            {"otlp": 1, "loki": 1, "prometheus": None},
        )
        self.assertEqual(
            self.levels(UPSTREAM_COMPRESSION=" GZIP ", UPSTREAM_COMPRESSION_LEVEL="6"),
            {"otlp": 6, "loki": 6, "prometheus": None},
        )

    def test_per_signal(self) -> None:
        self.assertEqual(
            self.levels(UPSTREAM_COMPRESSION="otlp=gzip,loki=none"),
            {"otlp": 1, "loki": None, "prometheus": None},
        )
        self.assertEqual(
            self.levels(UPSTREAM_COMPRESSION="loki = gzip"),
            {"otlp": None, "loki": 1, "prometheus": None},
        )

    def test_bad_values_one_line_each(self) -> None:
        cases = {
            "zstd": "UPSTREAM_COMPRESSION: must be gzip, none, or per signal like "
            "otlp=gzip,loki=none",
            "prometheus=gzip": "UPSTREAM_COMPRESSION: 'prometheus' is not a signal with push "
            "bodies to compress (otlp or loki)",
            "otlp=brotli": "UPSTREAM_COMPRESSION: otlp must be gzip or none, got 'brotli'",
            "otlp=gzip,otlp=none": "UPSTREAM_COMPRESSION: otlp is given twice",
        }
        for value, line in cases.items():
            self.assertEqual(problems({**BASE, "UPSTREAM_COMPRESSION": value}), [line])
        for level in ("0", "10", "fast", "-1", "1.5"):
            self.assertEqual(
                problems({**BASE, "UPSTREAM_COMPRESSION_LEVEL": level}),
                [f"UPSTREAM_COMPRESSION_LEVEL: must be a whole number from 1 to 9, got {level!r}"],
            )

    def test_per_signal_form_needs_the_built_in_routes(self) -> None:
        _, found = parse_compression({"UPSTREAM_COMPRESSION": "otlp=gzip"}, routes_file=True)
        self.assertEqual(len(found), 1)
        self.assertIn("with ROUTES_FILE", found[0])
        compression, found = parse_compression({"UPSTREAM_COMPRESSION": "gzip"}, routes_file=True)
        self.assertEqual((compression.routes, found), (True, []))


ROUTES = {
    "routes": [
        {"name": "otel", "prefix": "/otlp", "upstream": "https://otel.example"},
        {"name": "logs", "prefix": "/loki", "upstream": "https://loki.example",
         "compression": "gzip"},
        {"name": "quiet", "prefix": "/quiet", "upstream": "https://q.example",
         "compression": "none"},
    ]
}  # fmt: skip


class RoutesFileTests(TestCase):
    def levels(self, compression: Compression) -> dict[str, int | None]:
        specs = parse_routes(ROUTES, {}, allow_insecure=False, compression=compression)
        return {s.upstream.name: s.upstream.gzip_level for s in specs}

    def test_route_setting_over_the_variable(self) -> None:
        self.assertEqual(self.levels(Compression()), {"otel": None, "logs": 1, "quiet": None})
        on = Compression(routes=True, level=4)
        self.assertEqual(self.levels(on), {"otel": 4, "logs": 4, "quiet": None})

    def test_bad_value_named(self) -> None:
        doc = {"routes": [{**ROUTES["routes"][0], "compression": "br"}]}
        with self.assertRaises(ConfigError) as caught:
            parse_routes(doc, {}, allow_insecure=False)
        self.assertEqual(
            caught.exception.problems,
            ["ROUTES_FILE: route otel: compression: must be gzip or none"],
        )
