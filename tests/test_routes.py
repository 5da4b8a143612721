"""Route matching and the raw-target rules (pure)."""

from twisted.trial.unittest import TestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from lgmt_proxy.config import SIGNALS
from lgmt_proxy.resources import build_root
from lgmt_proxy.routes import Refusal, split_target, upstream_target

# The resource tree as the site builds it; routing walks raw path segments.
ROOT = build_root({name: object() for name in SIGNALS}, {})  # type: ignore[misc]


def target(raw: bytes, base: bytes = b"") -> bytes | None:
    path, query = split_target(raw)
    request = DummyRequest(path[1:].split(b"/"))
    resource = getChildForRequest(ROOT, request)
    route = getattr(resource, "route", None)
    return None if route is None else upstream_target(route, base, path, query)


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
