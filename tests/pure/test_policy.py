"""Issue 13, pure rules: methods, Host and Origin, tenants, look-alike headers,
nested route prefixes, the digest lookup and the new configuration."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from twisted.web.resource import getChildForRequest

from lgmt_proxy.config.clientauth import ClientAuth, Consumer, parse_client_auth
from lgmt_proxy.config.routesfile import parse_routes, tenant_problems
from lgmt_proxy.config.settings import ConfigError, parse_config, upstream_from_url
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.dataplane.resources import build_root, route_table
from lgmt_proxy.dataplane.upstream import Upstream, build_upstream
from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.headers import forward_request_headers
from lgmt_proxy.rules.policy import (
    ALLOWED_METHODS,
    Policy,
    choose_tenant,
    duplicate_host,
    normalise_host,
)
from lgmt_proxy.rules.routes import Proxied, Route
from tests.support.helpers import env_for


def facts(method: bytes, headers: list[tuple[bytes, bytes]]) -> Incoming:
    """A request's facts as the header pass gathers them."""
    req = Incoming(0.0)
    req.method = method
    req.headers = headers
    assert req.read_head() is None
    return req


SEVEN = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]


class MethodTests(TestCase):
    def test_seven_pass_others_405(self) -> None:
        policy = Policy()
        for method in SEVEN:
            self.assertIsNone(policy.check(facts(method, [])), method)
        for method in (b"TRACE", b"CONNECT", b"PROPFIND", b"QUERY", b"PURGE", b"get"):
            refused = policy.check(facts(method, []))
            assert refused is not None, method
            self.assertEqual(refused.status, 405)
            self.assertIn(
                (b"Allow", b"GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH"), refused.headers
            )

    def test_client_auth_star_means_the_seven(self) -> None:
        auth = parse_client_auth(
            'consumers: [{name: a, token: "aaaaaaaaaaaaaaaaaaaa", '
            'allow: [{methods: "*", paths: ["/*"]}]}]'
        )
        (consumer,) = auth.consumers
        self.assertEqual(frozenset(SEVEN), ALLOWED_METHODS)
        for method in SEVEN:
            self.assertTrue(consumer.allows(method, b"/loki/x"), method)
        for method in (b"TRACE", b"CONNECT", b"FOO"):
            self.assertFalse(consumer.allows(method, b"/loki/x"), method)


class HostOriginTests(TestCase):
    def test_normalise_host(self) -> None:
        for raw, want in (
            ("Proxy.Example:8085", "proxy.example"),
            ("proxy.example.", "proxy.example"),
            ("[::1]:8085", "::1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("127.0.0.1:80", "127.0.0.1"),
        ):
            self.assertEqual(normalise_host(raw), want, raw)

    def test_allowed_hosts(self) -> None:
        policy = Policy.build(hosts=["localhost", "Proxy.Example", "::1"])
        for host in (b"localhost", b"LOCALHOST:8085", b"proxy.example:1", b"[::1]:8085"):
            self.assertIsNone(policy.check(facts(b"GET", [(b"Host", host)])), host)
        for headers in ([(b"Host", b"attacker.example")], [(b"Host", b"localhost.evil")], []):
            refused = policy.check(facts(b"GET", headers))
            assert refused is not None, headers
            self.assertEqual(refused.status, 421)

    def test_no_allowed_hosts_means_any(self) -> None:
        self.assertIsNone(Policy().check(facts(b"GET", [(b"Host", b"x.example")])))

    def test_origin(self) -> None:
        policy = Policy.build(origins=["https://Grafana.example.com/"])
        foreign = [(b"Origin", b"https://attacker.example")]
        refused = policy.check(facts(b"GET", foreign))
        assert refused is not None
        self.assertEqual(refused.status, 403)
        self.assertEqual(Policy().check(facts(b"GET", foreign)), refused)
        null = Policy().check(facts(b"GET", [(b"Origin", b"null")]))
        assert null is not None
        self.assertEqual(null.status, 403)
        # Every method, WebSocket or not: a page could read a query's answer
        # (upstreams send Access-Control-Allow-Origin: *) or push (CSRF).
        for method in SEVEN:
            self.assertEqual(policy.check(facts(method, foreign)), refused, method)
        # No Origin (logcli, Grafana's server side) or a listed origin: forwarded.
        self.assertIsNone(policy.check(facts(b"GET", [])))
        listed = [(b"origin", b"https://grafana.example.com")]
        for method in SEVEN:
            self.assertIsNone(policy.check(facts(method, listed)), method)

    def test_one_host_one_origin(self) -> None:
        policy = Policy.build(origins=["https://grafana.example.com"], hosts=["localhost"])
        listed = (b"Origin", b"https://grafana.example.com")
        foreign = (b"Origin", b"https://attacker.example")
        two_hosts = Refusal(400, "more than one Host header")
        for hosts in ([b"attacker.example", b"localhost"], [b"localhost", b"localhost"]):
            headers = [(b"Host", h) for h in hosts]
            # Refused on every route before the policy runs (which reads the first).
            self.assertEqual(duplicate_host(facts(b"GET", headers)), two_hosts)
            mixed = [(b"HOST", hosts[0]), (b"host", hosts[1])]
            self.assertEqual(duplicate_host(facts(b"GET", mixed)), two_hosts)
        self.assertIsNone(
            duplicate_host(facts(b"GET", [(b"Host", b"localhost"), (b"X-Host", b"a")]))
        )
        self.assertIsNone(duplicate_host(facts(b"GET", [])))
        for origins in ([foreign, listed], [listed, listed], [listed, (b"origin", b"")]):
            refused = policy.check(facts(b"GET", [(b"Host", b"localhost"), *origins]))
            assert refused is not None, origins
            self.assertEqual(refused.status, 403, origins)
        self.assertIsNone(policy.check(facts(b"GET", [(b"Host", b"localhost"), listed])))


class TenantTests(TestCase):
    def test_choose_tenant(self) -> None:
        self.assertEqual(choose_tenant(["a"], []), b"a")
        self.assertEqual(choose_tenant(["a"], [b"a"]), b"a")
        self.assertEqual(choose_tenant(["a", "b"], []), b"a")
        self.assertEqual(choose_tenant(["a", "b"], [b" b "]), b"b")
        for tenants, requested in (
            (["a", "b"], [b"c"]),
            (["a"], [b"b"]),
            (["a", "b"], [b"a", b"b"]),
            ([], []),
            ([], [b"a"]),
        ):
            refused = choose_tenant(tenants, requested)
            self.assertIsInstance(refused, Refusal, (tenants, requested))
            assert isinstance(refused, Refusal)
            self.assertEqual(refused.status, 403)

    def test_consumer_tenants_parsed(self) -> None:
        auth = parse_client_auth(
            """
consumers:
  - {name: a, token: aaaaaaaaaaaaaaaaaaaa, allow: [{paths: ["/*"]}], tenant: team-a}
  - {name: b, token: bbbbbbbbbbbbbbbbbbbb, allow: [{paths: ["/*"]}], tenant: [t1, '0123']}
  - {name: c, token: cccccccccccccccccccc, allow: [{paths: ["/*"]}]}
"""
        )
        self.assertEqual([c.tenants for c in auth.consumers], [("team-a",), ("t1", "0123"), ()])

    def test_bad_tenants_listed(self) -> None:
        # YAML reads 0123 as 83 and 1:30 as 90: unquoted numbers are refused,
        # not sent as another tenant's id; . and .. are no tenant.
        for bad in (
            "[]",
            "''",
            "'a b'",
            "{x: 1}",
            "true",
            "'a\\x01'",
            "0123",
            "[a, 1:30]",
            "'.'",
            "'..'",
        ):
            with self.assertRaises(ConfigError) as caught:
                parse_client_auth(
                    "consumers: [{name: a, token: aaaaaaaaaaaaaaaaaaaa, "
                    f'allow: [{{paths: ["/*"]}}], tenant: {bad}}}]'
                )
            (line,) = caught.exception.problems
            self.assertIn("consumer a.tenant", line)
            self.assertNotIn("aaaaaaaaaaaaaaaaaaaa", line)

    def test_route_tenant_must_be_a_string(self) -> None:
        for bad in (123, ".", ".."):
            with self.assertRaises(ConfigError) as caught:
                parse_routes(
                    {
                        "routes": [
                            {"name": "m", "prefix": "/m", "upstream": "https://m", "tenant": bad}
                        ]
                    },
                    {},
                    allow_insecure=False,
                )
            self.assertIn("route m: tenant", caught.exception.problems[0])

    def test_from_consumer_route(self) -> None:
        doc = {
            "routes": [
                {"name": "m", "prefix": "/m", "upstream": "https://m", "tenant": "from_consumer"},
                {"name": "n", "prefix": "/n", "upstream": "https://n", "tenant": "fixed"},
            ]
        }
        m, n = sorted(parse_routes(doc, {}, allow_insecure=False), key=lambda s: s.upstream.name)
        self.assertTrue(m.route.tenant_from_consumer)
        self.assertIsNone(m.upstream.tenant)
        self.assertFalse(n.route.tenant_from_consumer)
        self.assertEqual(n.upstream.tenant, "fixed")
        self.assertEqual(
            tenant_problems([m, n], client_auth=False),
            ["ROUTES_FILE: route m: tenant: from_consumer needs CLIENT_AUTH_FILE"],
        )
        self.assertEqual(tenant_problems([m, n], client_auth=True), [])


class LookAlikeHeaderTests(TestCase):
    def test_underscore_spellings_of_injected_headers_dropped(self) -> None:
        incoming = [
            (b"X_Scope_OrgID", b"999"),
            (b"x-scope_orgid", b"998"),
            (b"AUTHORIZATION_", b"x"),
            (b"Authorization", b"Bearer client"),
            (b"authorization", b"x"),
            (b"X_Forwarded_For", b"6.6.6.6"),
            (b"Host_", b"x"),
            (b"X_Custom_Header", b"kept"),
        ]
        out = forward_request_headers(
            incoming,
            host=b"up.example",
            authorization=b"Basic abc",
            tenant=b"111",
            client_address=b"10.0.0.1",
        )
        lowered = [(n.lower().replace(b"_", b"-"), v) for n, v in out]
        self.assertEqual([v for n, v in lowered if n == b"x-scope-orgid"], [b"111"])
        self.assertEqual([v for n, v in lowered if n == b"authorization"], [b"Basic abc"])
        self.assertEqual([v for n, v in lowered if n == b"x-forwarded-for"], [b"10.0.0.1"])
        self.assertEqual([v for n, v in lowered if n == b"host"], [b"up.example"])
        self.assertIn((b"X_Custom_Header", b"kept"), out)
        # "Authorization_" is not Authorization read with _ as -: only names
        # equal to an injected one once _ is read as - are dropped.
        self.assertIn((b"AUTHORIZATION_", b"x"), out)
        self.assertIn((b"Host_", b"x"), out)


class _Walk:
    def __init__(self, path: bytes) -> None:
        self.prepath: list[bytes] = []
        self.postpath = path[1:].split(b"/")


def _upstreams(*names: str) -> dict[str, Upstream]:
    """An upstream per name (never connected to): the tree holds real ones."""
    config = parse_config(env_for("http://127.0.0.1:9"))
    return {
        name: build_upstream(
            MemoryReactorClock(),
            upstream_from_url(name, "http://127.0.0.1:9", user="u", tenant=None),
            config,
            None,
            None,
        )
        for name in names
    }


def routed_by(root: Any) -> Any:
    """The upstream name the route table matches a path to (None: no route),
    checked against a walk of the resource tree it is derived from."""
    table = route_table(root)

    def routed(path: bytes) -> str | None:
        match = table.match(path)
        name = match.route.upstream_name if isinstance(match, Proxied) else None
        walked = getattr(getChildForRequest(root, _Walk(path)), "route", None)
        assert (None if walked is None else walked.upstream_name) == name, path
        return name

    return routed


class NestedRouteTests(TestCase):
    """With /a, /a/b/c and /a/b/c/d/e the longest whole-segment prefix wins at
    every depth (before issue 13, /a/b, /a/b/x and /a/b/cc answered 404)."""

    def test_three_levels(self) -> None:
        routes = (
            Route(b"/a/b/c/d/e", b"/e", "e"),
            Route(b"/a", b"/a", "a"),
            Route(b"/a/b/c", b"/c", "c"),
        )
        routed = routed_by(build_root(_upstreams("a", "c", "e"), {}, routes))

        for path, want in (
            (b"/a", "a"),
            (b"/a/", "a"),
            (b"/a/x", "a"),
            (b"/a/b", "a"),
            (b"/a/b/", "a"),
            (b"/a/b/x", "a"),
            (b"/a/b/cc", "a"),
            (b"/a/b/x/c/d/e", "a"),
            (b"/a/b/c", "c"),
            (b"/a/b/c/x", "c"),
            (b"/a/b/c/d", "c"),
            (b"/a/b/c/d/x", "c"),
            (b"/a/b/c/d/ee", "c"),
            (b"/a/b/c/d/e", "e"),
            (b"/a/b/c/d/e/f/g", "e"),
            (b"/ab", None),
            (b"/b", None),
            (b"/", None),
        ):
            self.assertEqual(routed(path), want, path)

    def test_inner_segment_under_no_route_is_404(self) -> None:
        root = build_root(_upstreams("p"), {}, (Route(b"/api/prom", b"/api/prom", "p"),))
        routed = routed_by(root)
        for path in (b"/api", b"/api/x", b"/api/promx"):
            self.assertIsNone(routed(path))
        self.assertEqual(routed(b"/api/prom/x"), "p")


class _Counting(tuple):  # type: ignore[type-arg]
    """A consumer tuple that counts how often it is walked."""

    walks = 0

    def __iter__(self) -> Any:
        type(self).walks += 1
        return super().__iter__()


class DigestLookupTests(TestCase):
    def test_one_lookup_whatever_the_number_of_consumers(self) -> None:
        consumers = _Counting(
            Consumer(f"c{i}", hashlib.sha256(b"token-%d" % i).digest(), ()) for i in range(10000)
        )
        auth = ClientAuth(consumers)
        _Counting.walks = 0
        self.assertEqual(auth.authenticate([b"Bearer token-9999"]).name, "c9999")  # type: ignore[union-attr]
        self.assertIsNone(auth.authenticate([b"Bearer token-10000"]))
        basic = b"Basic " + base64.b64encode(b"c5:token-5")
        self.assertEqual(auth.authenticate([basic]).name, "c5")  # type: ignore[union-attr]
        wrong_user = b"Basic " + base64.b64encode(b"c6:token-5")
        self.assertIsNone(auth.authenticate([wrong_user]))
        # Authentication never walked the consumers (a loop would, per request).
        self.assertEqual(_Counting.walks, 0)


class ConfigTests(TestCase):
    def test_new_variables(self) -> None:
        config = parse_config(
            env_for(
                "https://x.example",
                ALLOWED_ORIGINS="https://grafana.example.com, http://localhost:3000",
                ALLOWED_HOSTS="lgmt-proxy.monitoring.svc,localhost,[::1]",
                METRICS_TENANT_LABEL="true",
            )
        )
        self.assertEqual(
            config.allowed_origins, ("https://grafana.example.com", "http://localhost:3000")
        )
        self.assertEqual(config.allowed_hosts, ("lgmt-proxy.monitoring.svc", "localhost", "[::1]"))
        self.assertTrue(config.metrics_tenant_label)
        default = parse_config(env_for("https://x.example"))
        self.assertEqual((default.allowed_origins, default.allowed_hosts), ((), ()))
        self.assertFalse(default.metrics_tenant_label)

    def test_bad_entries_one_line_each(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(
                env_for(
                    "https://x.example",
                    ALLOWED_ORIGINS="grafana.example.com",
                    ALLOWED_HOSTS="proxy.example:8085",
                    METRICS_TENANT_LABEL="maybe",
                )
            )
        problems = caught.exception.problems
        self.assertEqual(len(problems), 3, problems)
        self.assertTrue(problems[0].startswith("ALLOWED_ORIGINS: 'grafana.example.com'"))
        self.assertTrue(problems[1].startswith("ALLOWED_HOSTS: 'proxy.example:8085'"))
        self.assertTrue(problems[2].startswith("METRICS_TENANT_LABEL:"))
