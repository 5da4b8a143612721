"""Route matching and the raw-target rules (pure)."""

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import SIGNALS, parse_config
from lgmt_proxy.dataplane.resources import build_root, route_table
from lgmt_proxy.rules.routes import Proxied, Refusal, split_target, upstream_target

# The route table as the factory derives it from the resource tree; it
# matches raw path segments.
TABLE = route_table(build_root({name: object() for name in SIGNALS}, {}))  # type: ignore[misc]


def target(raw: bytes, base: bytes = b"") -> bytes | None:
    path, query = split_target(raw)
    match = TABLE.match(path)
    if not isinstance(match, Proxied):
        return None
    return upstream_target(match.route, base, path, query)


class RouteTests(TestCase):
    def test_table(self) -> None:
        self.assertEqual(target(b"/api/prom/push"), b"/api/prom/push")
        self.assertEqual(
            target(b"/prometheus/api/v1/query?query=up"), b"/api/prom/api/v1/query?query=up"
        )
        self.assertEqual(target(b"/loki/api/v1/push"), b"/loki/api/v1/push")
        self.assertEqual(target(b"/tempo/api/search"), b"/tempo/api/search")
        self.assertEqual(target(b"/otlp/v1/traces"), b"/otlp/v1/traces")
        self.assertEqual(target(b"/pyroscope/ingest?name=app"), b"/ingest?name=app")
        self.assertEqual(
            target(b"/pyroscope/push.v1.PusherService/Push"), b"/push.v1.PusherService/Push"
        )
        self.assertEqual(target(b"/pyroscope"), b"/")

    def test_whole_segments(self) -> None:
        for raw in (
            b"/lokix",
            b"/prometheusx/a",
            b"/api/promx",
            b"/api",
            b"/",
            b"/otl",
            b"//loki/x",
        ):
            self.assertIsNone(target(raw), raw)
        self.assertEqual(target(b"/loki"), b"/loki")
        self.assertEqual(target(b"/prometheus"), b"/api/prom")
        self.assertEqual(target(b"/prometheus/"), b"/api/prom/")

    def test_query_byte_for_byte(self) -> None:
        q = b"/prometheus/api/v1/query_range?query=sum%28rate%28x%5B5m%5D%29%29&start=1&step=15s&a=%2F..%2F&&=&x"
        self.assertEqual(target(q), b"/api/prom/api/v1/query_range" + q[q.index(b"?") :])
        self.assertEqual(target(b"/loki/x?"), b"/loki/x?")

    def test_path_as_encoded(self) -> None:
        self.assertEqual(target(b"/loki/a%20b/%7Bx%7D"), b"/loki/a%20b/%7Bx%7D")

    def test_base_path(self) -> None:
        self.assertEqual(target(b"/otlp/v1/logs", b"/base"), b"/base/otlp/v1/logs")


def portal(signal: str, url: str) -> bytes:
    """The base path the proxy derives from a signal's URL, as configured."""
    env = {
        "GRAFANA_CLOUD_ACCESS_TOKEN": "glc_token",
        f"GRAFANA_CLOUD_{signal.upper()}_URL": url,
        f"GRAFANA_CLOUD_{signal.upper()}_ORG_ID": "123",
    }
    return parse_config(env).signals[signal].base_path.encode()


class UrlPathTests(TestCase):
    """The contract: a path on a signal's URL is where that service is mounted;
    not added again when the upstream path already starts with it (whole
    segments), put in front otherwise."""

    def test_portal_prometheus(self) -> None:
        base = portal(
            "prometheus", "https://prometheus-prod-56-prod-us-east-2.grafana.net/api/prom"
        )
        self.assertEqual(base, b"/api/prom")
        self.assertEqual(target(b"/api/prom/push", base), b"/api/prom/push")
        self.assertEqual(
            target(b"/api/prom/api/v1/query?query=up", base), b"/api/prom/api/v1/query?query=up"
        )
        self.assertEqual(target(b"/prometheus/api/v1/query", base), b"/api/prom/api/v1/query")
        self.assertEqual(
            target(b"/prometheus/api/v1/query_range?query=up&step=15s", base),
            b"/api/prom/api/v1/query_range?query=up&step=15s",
        )
        self.assertEqual(target(b"/prometheus/api/v1/push", base), b"/api/prom/api/v1/push")
        self.assertEqual(target(b"/api/prom", base), b"/api/prom")
        self.assertEqual(target(b"/prometheus", base), b"/api/prom")
        self.assertEqual(target(b"/prometheus/", base), b"/api/prom/")

    def test_portal_otlp(self) -> None:
        base = portal("otlp", "https://otlp-gateway-prod-us-east-2.grafana.net/otlp")
        self.assertEqual(base, b"/otlp")
        for kind in (b"traces", b"metrics", b"logs"):
            self.assertEqual(target(b"/otlp/v1/" + kind, base), b"/otlp/v1/" + kind)

    def test_portal_loki(self) -> None:
        # The portal's Loki URL has no path; a pasted /loki is not doubled either.
        base = portal("loki", "https://logs-prod-036.grafana.net")
        self.assertEqual(base, b"")
        self.assertEqual(target(b"/loki/api/v1/push", base), b"/loki/api/v1/push")
        base = portal("loki", "https://logs-prod-036.grafana.net/loki")
        self.assertEqual(target(b"/loki/api/v1/push", base), b"/loki/api/v1/push")
        self.assertEqual(
            target(b"/loki/api/v1/query_range?query=%7Bjob%3D%22x%22%7D", base),
            b"/loki/api/v1/query_range?query=%7Bjob%3D%22x%22%7D",
        )

    def test_portal_tempo(self) -> None:
        base = portal("tempo", "https://tempo-prod-26-prod-us-east-2.grafana.net/tempo")
        self.assertEqual(base, b"/tempo")
        self.assertEqual(target(b"/tempo/api/search?tags=a", base), b"/tempo/api/search?tags=a")
        self.assertEqual(target(b"/tempo/api/traces/abc123", base), b"/tempo/api/traces/abc123")
        base = portal("tempo", "https://tempo-prod-26-prod-us-east-2.grafana.net")
        self.assertEqual(target(b"/tempo/api/search", base), b"/tempo/api/search")

    def test_pyroscope(self) -> None:
        # Upstream prefix empty: /pyroscope/ingest goes to /ingest on the URL.
        self.assertEqual(target(b"/pyroscope/ingest?name=app", b""), b"/ingest?name=app")
        self.assertEqual(target(b"/pyroscope/ingest", b"/pyroscope"), b"/pyroscope/ingest")
        self.assertEqual(target(b"/pyroscope", b"/pyroscope"), b"/pyroscope")
        self.assertEqual(
            target(b"/pyroscope/pyroscope/ingest", b"/pyroscope"), b"/pyroscope/ingest"
        )

    def test_self_hosted_mount(self) -> None:
        base = portal("prometheus", "https://mimir.internal/mimir")
        self.assertEqual(target(b"/api/prom/push", base), b"/mimir/api/prom/push")
        self.assertEqual(target(b"/prometheus/api/v1/query", base), b"/mimir/api/prom/api/v1/query")
        self.assertEqual(target(b"/loki/api/v1/push", b"/gw/logs"), b"/gw/logs/loki/api/v1/push")
        self.assertEqual(target(b"/loki", b"/gw"), b"/gw/loki")

    def test_whole_segments_only(self) -> None:
        self.assertEqual(target(b"/otlp/v1/traces", b"/ot"), b"/ot/otlp/v1/traces")
        self.assertEqual(target(b"/otlp/v1/traces", b"/otlp/v"), b"/otlp/v/otlp/v1/traces")
        self.assertEqual(target(b"/api/prom/push", b"/api/pro"), b"/api/pro/api/prom/push")
        self.assertEqual(target(b"/api/prom/push", b"/api"), b"/api/prom/push")
        self.assertEqual(target(b"/otlp/v1/traces", b"/otlp/v1"), b"/otlp/v1/traces")
        self.assertEqual(target(b"/otlp/v1/traces", b"/OTLP"), b"/OTLP/otlp/v1/traces")
        # The URL path is a mount, not an endpoint: a pasted push URL stays in front.
        self.assertEqual(
            target(b"/api/prom/api/v1/query", b"/api/prom/push"),
            b"/api/prom/push/api/prom/api/v1/query",
        )

    def test_always_under_the_mount(self) -> None:
        paths = (
            b"/api/prom/push",
            b"/prometheus/api/v1/query",
            b"/prometheus",
            b"/loki/api/v1/push",
            b"/tempo",
            b"/otlp/v1/traces",
            b"/pyroscope",
            b"/pyroscope/ingest",
            b"/pyroscope/otlp/x",
        )
        bases = (b"/api/prom", b"/api", b"/otlp", b"/ot", b"/mimir", b"/a/b", b"/ingest", b"/x/")
        for base in bases:
            mount = base.rstrip(b"/")
            for path in paths:
                sent = target(path, base)
                assert sent is not None
                self.assertTrue(sent == mount or sent.startswith(mount + b"/"), (base, path))
                # Either the path as without a URL path, or that path behind the mount.
                plain = target(path, b"")
                assert plain is not None
                self.assertIn(sent, (plain, mount + plain, mount), (base, path))

    def test_trailing_slash(self) -> None:
        for url in (
            "https://otlp-gateway-prod-us-east-2.grafana.net/otlp/",
            "https://otlp-gateway-prod-us-east-2.grafana.net/otlp//",
        ):
            self.assertEqual(target(b"/otlp/v1/traces", portal("otlp", url)), b"/otlp/v1/traces")
        self.assertEqual(portal("loki", "https://logs-prod-036.grafana.net/"), b"")
        self.assertEqual(target(b"/loki/x", portal("loki", "https://l.example/")), b"/loki/x")
        # upstream_target itself ignores one too.
        self.assertEqual(target(b"/otlp/v1/traces", b"/otlp/"), b"/otlp/v1/traces")
        self.assertEqual(target(b"/api/prom/push", b"/mimir/"), b"/mimir/api/prom/push")
        self.assertEqual(target(b"/loki/x", b"/"), b"/loki/x")

    def test_query_kept_with_url_path(self) -> None:
        q = b"?query=sum%28rate%28x%5B5m%5D%29%29&&=&a=%2F..%2F"
        for base, path, want in (
            (b"/api/prom", b"/prometheus/api/v1/query", b"/api/prom/api/v1/query"),
            (b"/mimir", b"/prometheus/api/v1/query", b"/mimir/api/prom/api/v1/query"),
        ):
            self.assertEqual(target(path + q, base), want + q)
            self.assertEqual(target(path + b"?", base), want + b"?")
            self.assertEqual(target(path, base), want)

    def test_refusals(self) -> None:
        cases = {
            b"/prometheus/../admin": 400,
            b"/prometheus/%2e%2e/admin": 400,
            b"/prometheus/%2E%2e/admin": 400,
            b"/prometheus/.%2e/admin": 400,
            b"/prometheus/./x": 400,
            b"/prometheus/%2e/x": 400,
            b"/prometheus/..": 400,
            b"/loki/a%2Fb": 400,
            b"/loki/a%2fb": 400,
            b"/loki/a%5cb": 400,
            b"/loki/a\\b": 400,
            b"/loki/a#frag": 400,
            b"http://evil.example/loki": 400,
            b"evil.example:443": 400,
            b"*": 400,
            b"/loki/" + b"a" * 9000: 414,
        }
        for raw, status in cases.items():
            with self.assertRaises(Refusal) as ctx:
                split_target(raw)
            self.assertEqual(ctx.exception.status, status, raw)

    def test_dots_inside_names_are_fine(self) -> None:
        self.assertEqual(target(b"/loki/a..b/.x/y."), b"/loki/a..b/.x/y.")
        self.assertEqual(target(b"/loki/x?a=../.."), b"/loki/x?a=../..")
