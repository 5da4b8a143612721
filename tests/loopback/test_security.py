"""Issue 13 on a real proxy on loopback: methods, control bytes, look-alike
headers, ALLOWED_HOSTS, WebSocket origins, /metrics with client auth, nested
ROUTES_FILE prefixes and per-consumer tenants."""

from __future__ import annotations

import json
import os
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import parse_client_auth
from lgmt_proxy.config.routesfile import parse_routes
from lgmt_proxy.config.settings import ConfigError
from lgmt_proxy.obs.logs import ACCESS_NAMESPACE
from lgmt_proxy.obs.metrics import ProxyMetrics
from lgmt_proxy.obs.ops import Readiness
from lgmt_proxy.service import admin_site
from lgmt_proxy.tap import load
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    call,
    env_for,
    json_body,
    listen,
    raw_request,
    status_of,
    upstream_site,
)

from .test_websocket import EchoUpstream, NotOpened, open_websocket

SEVEN = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]


def head(method: bytes, path: bytes, *lines: bytes) -> bytes:
    extra = b"".join(line + b"\r\n" for line in lines)
    return (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        + extra
        + b"\r\n"
    )


def header_of(raw: bytes, name: bytes) -> bytes | None:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name:
            return v.strip()
    return None


def bearer(token: str) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [b"Bearer " + token.encode()]}


class _Base(TestCase):
    timeout = 30

    def start(self, client_auth: Any = None, **extra: str) -> tuple[ProxyFixture, Recorder]:
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(
            env_for(f"http://127.0.0.1:{port.getHost().port}", **extra), client_auth=client_auth
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        return proxy, up

    async def raw(self, proxy: ProxyFixture, data: bytes) -> bytes:
        return await raw_request(proxy.port.getHost().port, data)


class MethodTests(_Base):
    async def test_trace_and_other_methods_refused_nothing_upstream(self) -> None:
        proxy, up = self.start()
        for method, status in (
            (b"TRACE", 405),
            (b"PROPFIND", 405),
            (b"QUERY", 405),
            (b"FOO", 501),
            (b"get", 501),
        ):
            raw = await self.raw(proxy, head(method, b"/loki/api/v1/labels"))
            self.assertEqual(status_of(raw), status, method)
            self.assertIn("error", json_body(raw))
            if status == 405:
                self.assertEqual(
                    header_of(raw, b"allow"), b"GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH"
                )
        self.assertEqual(up.seen, [])

    async def test_the_seven_methods_pass(self) -> None:
        proxy, up = self.start()
        for method in SEVEN:
            body = b"{}" if method in (b"POST", b"PUT", b"PATCH") else None
            response, _ = await call(proxy.url + "/tempo/api/x", method=method, body=body)
            self.assertEqual(response.code, 200, method)
        self.assertEqual([s.method for s in up.seen], SEVEN)

    async def test_trace_refused_for_a_consumer_allowed_every_method(self) -> None:
        # Two controls: Policy.check refuses TRACE (405) before client auth
        # runs, so the end-to-end answer proves only that one; the consumer's
        # own rules must refuse it too (methods: "*" means the seven), which
        # only Consumer.allows shows.
        auth = parse_client_auth(
            'consumers: [{name: ops, token: "ops-token-0123456789", '
            'allow: [{methods: "*", paths: ["/*"]}]}]'
        )
        (consumer,) = auth.consumers
        for method in (b"TRACE", b"CONNECT", b"PROPFIND", b"FOO"):
            self.assertFalse(consumer.allows(method, b"/loki/x"), method)
        for method in SEVEN:
            self.assertTrue(consumer.allows(method, b"/loki/x"), method)
        proxy, up = self.start(client_auth=lambda: auth)
        raw = await self.raw(
            proxy, head(b"TRACE", b"/loki/x", b"Authorization: Bearer ops-token-0123456789")
        )
        self.assertEqual(status_of(raw), 405)
        response, _ = await call(proxy.url + "/loki/x", headers=bearer("ops-token-0123456789"))
        self.assertEqual(response.code, 200)
        self.assertEqual([s.method for s in up.seen], [b"GET"])


class HeaderTests(_Base):
    async def test_control_characters_in_values_400(self) -> None:
        # llhttp (strict) refuses these itself, the proxy adds no check of its
        # own: this pins the parser's behaviour (a lenient parser fails it).
        proxy, up = self.start()
        for byte in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]:
            raw = await self.raw(
                proxy, head(b"GET", b"/loki/x", b"X-Note: a" + bytes([byte]) + b"b")
            )
            self.assertEqual(status_of(raw), 400, hex(byte))
        self.assertEqual(up.seen, [])
        raw = await self.raw(proxy, head(b"GET", b"/loki/x", b"X-Note: a\tb"))
        self.assertEqual(status_of(raw), 200)
        self.assertEqual(up.seen[-1].header(b"x-note"), [b"a\tb"])

    async def test_look_alike_headers_never_reach_the_upstream(self) -> None:
        proxy, up = self.start()
        raw = await self.raw(
            proxy,
            head(
                b"GET",
                b"/loki/api/v1/labels",
                b"X_Scope_OrgID: 999",
                b"X-Scope_OrgID: 998",
                b"x-scope-orgid: 997",
                b"Authorization: Bearer client",
                b"authorization_: kept-not-a-look-alike",
                b"X_Forwarded_For: 6.6.6.6",
            ),
        )
        self.assertEqual(status_of(raw), 200)
        (seen,) = up.seen
        by_dash: dict[bytes, list[bytes]] = {}
        for name, values in seen.headers:
            by_dash.setdefault(name.lower().replace(b"_", b"-"), []).extend(values)
        self.assertEqual(by_dash[b"x-scope-orgid"], [ORG["loki"].encode()])
        self.assertEqual(by_dash[b"authorization"], [basic(ORG["loki"])])
        self.assertEqual(by_dash[b"x-forwarded-for"], [b"127.0.0.1"])

    async def test_framing_and_hop_by_hop_look_alikes_never_reach_the_upstream(self) -> None:
        # Issue 20 item 15: an upstream mapping _ to - (CGI, WSGI, some
        # gateways) would read these as framing, hop-by-hop or forwarding
        # headers; only the custom underscore header passes.
        proxy, up = self.start()
        raw = await self.raw(
            proxy,
            head(
                b"POST",
                b"/loki/api/v1/push",
                b"Content-Length: 5",
                b"Transfer_Encoding: chunked",
                b"Content_Length: 0",
                b"Keep_Alive: timeout=5",
                b"Proxy_Connection: keep-alive",
                b"Proxy_Authorization: Basic c3RvbGVuOmNyZWRz",
                b"X_Forwarded_Host: evil.example",
                b"X_Forwarded_Proto: http",
                b"X_Custom_Header: kept",
            )
            + b"hello",
        )
        self.assertEqual(status_of(raw), 200)
        (seen,) = up.seen
        self.assertEqual(seen.body, b"hello")
        underscored = sorted(n.lower() for n, _ in seen.headers if b"_" in n)
        self.assertEqual(underscored, [b"x_custom_header"])
        by_dash = {name.lower().replace(b"_", b"-"): values for name, values in seen.headers}
        for name in (b"transfer-encoding", b"keep-alive", b"proxy-authorization"):
            self.assertNotIn(name, by_dash)
        for name in (b"proxy-connection", b"x-forwarded-host", b"x-forwarded-proto"):
            self.assertNotIn(name, by_dash)
        self.assertEqual(by_dash[b"content-length"], [b"5"])


class HostTests(_Base):
    async def test_foreign_host_421_ops_exempt(self) -> None:
        proxy, up = self.start(ALLOWED_HOSTS="proxy.example,localhost")
        raw = await raw_request(
            proxy.port.getHost().port,
            b"GET /loki/x HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(status_of(raw), 421)
        self.assertEqual(json_body(raw)["upstream"], "loki")
        raw = await raw_request(
            proxy.port.getHost().port, b"GET /loki/x HTTP/1.0\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status_of(raw), 421)
        self.assertEqual(up.seen, [])
        for host in (b"LocalHost:8085", b"proxy.example"):
            raw = await raw_request(
                proxy.port.getHost().port,
                b"GET /loki/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            )
            self.assertEqual(status_of(raw), 200, host)
        self.assertEqual(len(up.seen), 2)
        # The kubelet probes with the pod IP as Host: /health and /ready answer.
        for path in (b"/health", b"/ready"):
            raw = await raw_request(
                proxy.port.getHost().port,
                b"GET " + path + b" HTTP/1.1\r\nHost: 10.1.2.3:8085\r\nConnection: close\r\n\r\n",
            )
            self.assertEqual(status_of(raw), 200, path)

    async def test_any_host_without_allowed_hosts(self) -> None:
        proxy, up = self.start()
        raw = await self.raw(proxy, head(b"GET", b"/loki/x", b"X-A: 1").replace(b"proxy", b"x.y"))
        self.assertEqual(status_of(raw), 200)
        self.assertEqual(len(up.seen), 1)


class CrossOriginTests(_Base):
    """Plain HTTP from a browser page: upstreams answer
    ``Access-Control-Allow-Origin: *``, so a query the proxy forwarded could
    be read by any page, and a simple POST needs no preflight."""

    def start_cors(self, **extra: str) -> tuple[ProxyFixture, Recorder]:
        proxy, up = self.start(**extra)
        up.headers.append((b"Access-Control-Allow-Origin", b"*"))
        return proxy, up

    async def test_foreign_origin_403_on_every_proxy_request(self) -> None:
        proxy, up = self.start_cors(ALLOWED_ORIGINS="https://grafana.example.com")
        for method, path, lines in (
            (b"GET", b"/prometheus/api/v1/query?query=up", ()),
            (b"POST", b"/loki/api/v1/push", (b"Content-Type: text/plain", b"Content-Length: 2")),
            (b"OPTIONS", b"/prometheus/api/v1/query", (b"Access-Control-Request-Method: GET",)),
        ):
            for origin in (b"https://attacker.example", b"null", b"https://grafana.example.com:8"):
                request = head(method, path, b"Origin: " + origin, *lines)
                raw = await self.raw(proxy, request + (b"{}" if method == b"POST" else b""))
                self.assertEqual(status_of(raw), 403, (method, origin))
                self.assertIn("ALLOWED_ORIGINS", json_body(raw)["error"])
                self.assertIsNone(header_of(raw, b"access-control-allow-origin"))
        self.assertEqual(up.seen, [])

    async def test_listed_origin_and_no_origin_pass(self) -> None:
        proxy, up = self.start_cors(ALLOWED_ORIGINS="https://grafana.example.com")
        path = b"/prometheus/api/v1/query?query=up"
        for lines in ((b"Origin: https://Grafana.example.com",), ()):
            raw = await self.raw(proxy, head(b"GET", path, *lines))
            self.assertEqual(status_of(raw), 200, lines)
            self.assertEqual(header_of(raw, b"access-control-allow-origin"), b"*")
        self.assertEqual(
            [s.header(b"origin") for s in up.seen], [[b"https://Grafana.example.com"], None]
        )

    async def test_ops_routes_answer_any_origin(self) -> None:
        proxy, _ = self.start_cors()
        for path in (b"/health", b"/ready", b"/metrics"):
            raw = await self.raw(proxy, head(b"GET", path, b"Origin: https://attacker.example"))
            self.assertEqual(status_of(raw), 200, path)

    async def test_second_origin_403(self) -> None:
        proxy, up = self.start_cors(ALLOWED_ORIGINS="https://grafana.example.com")
        listed, foreign = (
            b"Origin: https://grafana.example.com",
            b"Origin: https://attacker.example",
        )
        for lines in ((foreign, listed), (listed, foreign), (listed, listed)):
            raw = await self.raw(proxy, head(b"GET", b"/prometheus/api/v1/query", *lines))
            self.assertEqual(status_of(raw), 403, lines)
        self.assertEqual(up.seen, [])


class DuplicateHostTests(_Base):
    async def test_second_host_400_on_every_route(self) -> None:
        proxy, up = self.start(ALLOWED_HOSTS="localhost")
        port = proxy.port.getHost().port
        for path in (b"/loki/x", b"/health", b"/ready", b"/metrics", b"/nowhere"):
            for hosts in ((b"attacker.example", b"localhost"), (b"localhost", b"localhost")):
                lines = b"".join(b"Host: " + h + b"\r\n" for h in hosts)
                raw = await raw_request(
                    port, b"GET " + path + b" HTTP/1.1\r\n" + lines + b"Connection: close\r\n\r\n"
                )
                self.assertEqual(status_of(raw), 400, (path, hosts))
                self.assertIn("Host", json_body(raw)["error"])
        self.assertEqual(up.seen, [])
        raw = await raw_request(
            port, b"GET /loki/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status_of(raw), 200)

    async def test_second_host_400_without_allowed_hosts(self) -> None:
        proxy, up = self.start()
        raw = await self.raw(proxy, head(b"GET", b"/loki/x", b"Host: other"))
        self.assertEqual(status_of(raw), 400)
        self.assertEqual(up.seen, [])


class OriginTests(TestCase):
    timeout = 30

    def start(self, **extra: str) -> tuple[ProxyFixture, WebSocketServerFactory]:
        upstream = WebSocketServerFactory()
        upstream.protocol = EchoUpstream
        upstream.requests = []
        upstream.token = "glc_test-token-ABCDEF0123456789"
        port = listen(upstream)
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}", **extra))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        return proxy, upstream

    async def open(self, proxy: ProxyFixture, origin: str | None) -> Any:
        return await open_websocket(proxy, "/loki/api/v1/tail", origin=origin)

    async def test_cross_origin_upgrade_403_without_origin_101(self) -> None:
        proxy, upstream = self.start()
        refused = await self.open(proxy, "https://attacker.example")
        with self.assertRaises(NotOpened):
            await refused.opened
        self.assertEqual(upstream.requests, [])
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="loki", method="GET", status="403"), 1
        )
        plain = await self.open(proxy, None)
        client = await plain.opened
        self.assertEqual(len(upstream.requests), 1)
        client.sendClose()
        await plain.closed

    async def test_listed_origin_opens(self) -> None:
        proxy, upstream = self.start(ALLOWED_ORIGINS="https://grafana.example.com")
        allowed = await self.open(proxy, "https://GRAFANA.example.com")
        client = await allowed.opened
        client.sendClose()
        await allowed.closed
        other = await self.open(proxy, "https://grafana.example.com.attacker.example")
        with self.assertRaises(NotOpened):
            await other.opened
        self.assertEqual(len(upstream.requests), 1)


CONSUMERS = """
consumers:
  - name: scraper
    token: scraper-token-0123456789
    allow: [{methods: [GET], paths: ["/metrics"]}]
  - name: alloy
    token: alloy-token-0123456789ab
    allow: [{methods: "*", paths: ["/loki/*"]}]
"""


class MetricsTests(_Base):
    async def test_main_port_metrics_only_for_an_allowed_consumer(self) -> None:
        auth = parse_client_auth(CONSUMERS)
        proxy, _ = self.start(client_auth=lambda: auth)
        response, body = await call(
            proxy.url + "/metrics", headers=bearer("scraper-token-0123456789")
        )
        self.assertEqual(response.code, 200)
        self.assertIn(b"proxy_requests_total", body)
        response, body = await call(
            proxy.url + "/metrics", headers=bearer("alloy-token-0123456789ab")
        )
        self.assertEqual(response.code, 403)
        self.assertNotIn(b"scraper", body)
        response, body = await call(proxy.url + "/metrics")
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(body)["upstream"], "none")
        for path in ("/health", "/ready"):
            response, _ = await call(proxy.url + path)
            self.assertEqual(response.code, 200, path)
        # The admin listener serves it to anyone who reaches it.
        admin = listen(admin_site(Readiness(), proxy.registry, reactor))
        self.addCleanup(admin.stopListening)
        response, _ = await call(f"http://127.0.0.1:{admin.getHost().port}/metrics")
        self.assertEqual(response.code, 200)

    async def test_metrics_open_without_client_auth(self) -> None:
        proxy, _ = self.start()
        response, _ = await call(proxy.url + "/metrics")
        self.assertEqual(response.code, 200)


class NestedRoutesTests(TestCase):
    timeout = 30

    async def test_longest_prefix_at_every_depth(self) -> None:
        ups = {name: Recorder() for name in ("a", "c", "e")}
        urls = {}
        for name, up in ups.items():
            port = listen(upstream_site(up))
            self.addCleanup(port.stopListening)
            urls[name] = f"http://127.0.0.1:{port.getHost().port}"
        doc = {
            "routes": [
                {"name": "a", "prefix": "/a", "upstream": urls["a"]},
                {"name": "c", "prefix": "/a/b/c", "upstream": urls["c"], "rewrite": "/c"},
                {"name": "e", "prefix": "/a/b/c/d/e", "upstream": urls["e"], "rewrite": "/e"},
            ]
        }
        specs = parse_routes(doc, {}, allow_insecure=False)
        proxy = ProxyFixture({"ROUTES_FILE": "/unused"}, routes=[(s, None) for s in specs])
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        for path, name, uri in (
            ("/a/b", "a", b"/a/b"),
            ("/a/b/x", "a", b"/a/b/x"),
            ("/a/b/cc?q=1", "a", b"/a/b/cc?q=1"),
            ("/a/b/c/d", "c", b"/c/d"),
            ("/a/b/c/d/x", "c", b"/c/d/x"),
            ("/a/b/c/d/e/f", "e", b"/e/f"),
        ):
            response, _ = await call(proxy.url + path)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(ups[name].seen[-1].uri, uri, path)
        response, _ = await call(proxy.url + "/ab")
        self.assertEqual(response.code, 404)
        self.assertEqual([len(u.seen) for u in ups.values()], [3, 2, 1])


TENANT_CONSUMERS = """
consumers:
  - name: team-a
    token: team-a-token-0123456789
    allow: [{methods: "*", paths: ["/*"]}]
    tenant: a
  - name: team-b
    token: team-b-token-0123456789
    allow: [{methods: "*", paths: ["/*"]}]
    tenant: [b, b2]
  - name: nobody
    token: nobody-token-0123456789
    allow: [{methods: "*", paths: ["/*"]}]
"""


class TenantTests(TestCase):
    timeout = 30

    async def test_each_consumer_sends_its_own_tenant(self) -> None:
        mimir, fixed = Recorder(), Recorder()
        pm, pf = listen(upstream_site(mimir)), listen(upstream_site(fixed))
        self.addCleanup(pm.stopListening)
        self.addCleanup(pf.stopListening)
        doc = {
            "routes": [
                {
                    "name": "mimir",
                    "prefix": "/api/v1/push",
                    "upstream": f"http://127.0.0.1:{pm.getHost().port}",
                    "tenant": "from_consumer",
                },
                {
                    "name": "fixed",
                    "prefix": "/fixed",
                    "upstream": f"http://127.0.0.1:{pf.getHost().port}",
                    "tenant": "shared",
                },
            ]
        }
        specs = parse_routes(doc, {}, allow_insecure=False)
        auth = parse_client_auth(TENANT_CONSUMERS)
        proxy = ProxyFixture(
            {"ROUTES_FILE": "/unused"}, client_auth=lambda: auth, routes=[(s, None) for s in specs]
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        registry = CollectorRegistry()
        proxy.factory.recorder.metrics = ProxyMetrics(
            registry, process_collectors=False, consumer_label=True, tenant_label=True
        )
        events: list[dict[str, Any]] = []

        def observe(event: Any) -> None:
            if event.get("log_namespace") == ACCESS_NAMESPACE:
                events.append(event["access"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        async def push(token: str, tenant: bytes | None = None, path: str = "/api/v1/push") -> int:
            headers = bearer(token)
            if tenant is not None:
                headers[b"X-Scope-OrgID"] = [tenant]
            response, _ = await call(proxy.url + path, b"POST", headers, b"x")
            return int(response.code)

        self.assertEqual(await push("team-a-token-0123456789"), 200)
        self.assertEqual(mimir.seen[-1].header(b"x-scope-orgid"), [b"a"])
        self.assertEqual(await push("team-b-token-0123456789"), 200)
        self.assertEqual(mimir.seen[-1].header(b"x-scope-orgid"), [b"b"])
        self.assertEqual(await push("team-b-token-0123456789", b"b2"), 200)
        self.assertEqual(mimir.seen[-1].header(b"x-scope-orgid"), [b"b2"])
        self.assertEqual(await push("team-a-token-0123456789", b"a"), 200)
        self.assertEqual(mimir.seen[-1].header(b"x-scope-orgid"), [b"a"])
        # Outside its list, or no tenant at all: 403, nothing upstream.
        self.assertEqual(await push("team-b-token-0123456789", b"a"), 403)
        self.assertEqual(await push("team-a-token-0123456789", b"b"), 403)
        self.assertEqual(await push("nobody-token-0123456789"), 403)
        self.assertEqual(len(mimir.seen), 4)
        # A fixed-tenant route ignores the consumer's choice.
        self.assertEqual(await push("team-b-token-0123456789", b"b2", "/fixed/x"), 200)
        self.assertEqual(fixed.seen[-1].header(b"x-scope-orgid"), [b"shared"])

        tenants = [(e.get("consumer"), e.get("status"), e.get("tenant")) for e in events]
        self.assertIn(("team-b", 200, "b2"), tenants)
        self.assertIn(("team-a", 200, "a"), tenants)
        self.assertIn(("nobody", 403, None), tenants)
        sample = registry.get_sample_value(
            "proxy_requests_total",
            {
                "upstream": "mimir",
                "method": "POST",
                "status": "200",
                "consumer": "team-b",
                "tenant": "b2",
            },
        )
        self.assertEqual(sample, 1)

    def test_from_consumer_without_client_auth_is_a_config_error(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "routes.yaml")
        with open(path, "w") as f:
            f.write(
                "routes: [{name: m, prefix: /m, upstream: 'https://m.example', "
                "tenant: from_consumer}]\n"
            )
        with self.assertRaises(ConfigError) as caught:
            load({"ROUTES_FILE": path})
        self.assertEqual(
            caught.exception.problems,
            ["ROUTES_FILE: route m: tenant: from_consumer needs CLIENT_AUTH_FILE"],
        )

    def test_default_metric_labels_unchanged(self) -> None:
        metrics = ProxyMetrics(CollectorRegistry(), process_collectors=False)
        metrics.request("loki", "GET", "200", 0.1, 0, 0, None, tenant="a")
        self.assertEqual(
            metrics.registry.get_sample_value(
                "proxy_requests_total", {"upstream": "loki", "method": "GET", "status": "200"}
            ),
            1,
        )
