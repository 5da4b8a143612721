"""Egress through a real forward proxy (tinyproxy): HTTPS upstreams whose
name only the proxy can resolve, NO_PROXY, a proxy that refuses, a proxy
that is down, proxy credentials that never show."""

from __future__ import annotations

import json
import os

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane.upstream import trust_root
from lgmt_proxy.tap import load
from tests.loopback.test_tls import make_ca, make_leaf, pem
from tests.loopback.test_websocket import EchoUpstream, NotOpened, open_websocket
from tests.support.forwardproxy import PROXY_ONLY_NAME, Tinyproxy
from tests.support.helpers import (
    ORG,
    TOKEN,
    ProxyFixture,
    Recorder,
    basic,
    call,
    env_for,
    free_port,
    upstream_site,
)

PROXY_PASSWORD = "pr0xy-s3cret-value"


class EgressTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        ca_key, ca = make_ca("egress test CA")
        key_pem, cert_pem = make_leaf(ca_key, ca, PROXY_ONLY_NAME)
        server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        self.server_tls = server.options()
        self.recorder = Recorder()
        self.upstream_port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, upstream_site(self.recorder), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(self.upstream_port.stopListening)
        self.trust = trust_root(pem(ca))
        self.upstream_url = f"https://{PROXY_ONLY_NAME}:{self.upstream_port.getHost().port}"

    def tinyproxy(self, credentials: tuple[str, str] | None = None) -> Tinyproxy:
        proxy = Tinyproxy(self.mktemp(), credentials)
        self.addCleanup(proxy.stop)
        return proxy

    def proxy(self, **env: str) -> ProxyFixture:
        fixture = ProxyFixture(env_for(self.upstream_url, **env), trust=self.trust)
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        return fixture

    async def test_query_and_push_reach_a_name_only_the_proxy_resolves(self) -> None:
        tiny = self.tinyproxy()
        proxy = self.proxy(HTTPS_PROXY=tiny.url)
        response, body = await call(proxy.url + "/prometheus/api/v1/query?query=up")
        self.assertEqual(response.code, 200, body)
        response, body = await call(proxy.url + "/api/prom/push", b"POST", body=b"x" * 300_000)
        self.assertEqual(response.code, 200, body)
        first, push = self.recorder.seen
        self.assertEqual(first.uri, b"/api/prom/api/v1/query?query=up")
        self.assertEqual(first.header(b"authorization"), [basic(ORG["prometheus"])])
        self.assertEqual(push.body, b"x" * 300_000)
        # TLS was verified against the upstream's own name, inside the tunnel.
        self.assertEqual(first.header(b"host"), [self.upstream_url[8:].encode()])
        connects = [r for r in tiny.requests() if r.startswith("CONNECT")]
        target = f"CONNECT {PROXY_ONLY_NAME}:{self.upstream_port.getHost().port} HTTP/1.1"
        self.assertIn(target, connects)
        # Pooled and reused like a direct connection: one tunnel for both.
        self.assertEqual(len(connects), 1, connects)

    async def test_no_proxy_goes_direct(self) -> None:
        tiny = self.tinyproxy()
        proxy = self.proxy(HTTPS_PROXY=tiny.url, NO_PROXY="example.org,.lgmt-egress.test")
        response, body = await call(proxy.url + "/loki/api/v1/labels")
        # Direct, so we resolve the name ourselves, and cannot.
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "upstream host name did not resolve")
        self.assertEqual(tiny.requests(), [])
        self.assertEqual(self.recorder.seen, [])

    async def test_credentials_required_refused_then_accepted(self) -> None:
        tiny = self.tinyproxy(credentials=("team", PROXY_PASSWORD))
        refused = self.proxy(HTTPS_PROXY=tiny.url)
        response, body = await call(refused.url + "/tempo/api/echo")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "forward proxy refused the connection (407)")
        self.assertEqual(
            refused.sample("proxy_upstream_errors_total", upstream="tempo", reason="proxy"), 1
        )
        self.assertEqual(self.recorder.seen, [])

        accepted = self.proxy(HTTPS_PROXY=f"http://team:{PROXY_PASSWORD}@127.0.0.1:{tiny.port}")
        response, body = await call(accepted.url + "/tempo/api/echo")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(len(self.recorder.seen), 1)
        # The upstream never sees the proxy's credentials.
        self.assertIsNone(self.recorder.seen[0].header(b"proxy-authorization"))
        exposition = accepted.metrics_text()
        self.assertNotIn(PROXY_PASSWORD, exposition)
        self.assertNotIn(PROXY_PASSWORD, repr(accepted.config))

    async def test_proxy_down_is_a_connect_failure(self) -> None:
        proxy = self.proxy(HTTPS_PROXY=f"http://127.0.0.1:{free_port()}")
        response, body = await call(proxy.url + "/otlp/v1/traces", b"POST", body=b"{}")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "upstream refused the connection")
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="otlp", reason="connect"), 1
        )

    async def test_routes_choose_their_own_proxy_or_none(self) -> None:
        """A route's ``proxy`` wins over HTTPS_PROXY; ``none`` is direct; a
        route URL's own credentials win over UPSTREAM_PROXY_CREDENTIALS_FILE,
        which fills in for a route proxy without any."""
        tiny = self.tinyproxy(credentials=("team", PROXY_PASSWORD))
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        credentials_file = os.path.join(d, "proxy-credentials")
        with open(credentials_file, "w") as f:
            f.write(f"team:{PROXY_PASSWORD}\n")
        tiny_url = f"http://127.0.0.1:{tiny.port}"
        routes_file = os.path.join(d, "routes.yaml")
        with open(routes_file, "w") as f:
            f.write(
                "routes:\n"
                + "".join(
                    f"  - {{name: {name}, prefix: /{name}, upstream: {self.upstream_url}"
                    + (f", proxy: '{proxy}'" if proxy else "")
                    + "}\n"
                    for name, proxy in (
                        ("environment", None),
                        ("own", tiny_url),
                        ("url-credentials", f"http://team:wrong@127.0.0.1:{tiny.port}"),
                        ("direct", "none"),
                    )
                )
            )
        # HTTPS_PROXY names a dead port: only a route's own proxy works.
        env = {
            "ROUTES_FILE": routes_file,
            "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}",
            "UPSTREAM_PROXY_CREDENTIALS_FILE": credentials_file,
        }
        config, _, _, specs = load(env)
        assert specs is not None
        proxy = ProxyFixture(
            env, trust=self.trust, routes=[(s, None) for s in specs], config=config
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))

        response, body = await call(proxy.url + "/own/api/v1/query")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.recorder.seen[-1].uri, b"/own/api/v1/query")
        target = f"CONNECT {PROXY_ONLY_NAME}:{self.upstream_port.getHost().port} HTTP/1.1"
        self.assertEqual(tiny.requests(), [target])

        response, body = await call(proxy.url + "/environment/api/v1/query")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "upstream refused the connection")

        response, body = await call(proxy.url + "/url-credentials/api/v1/query")
        self.assertEqual(response.code, 502)
        # Wrong credentials: tinyproxy answers 401 (407 is for none), passed on as it said.
        self.assertEqual(json.loads(body)["error"], "forward proxy refused the connection (401)")

        response, body = await call(proxy.url + "/direct/api/v1/query")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "upstream host name did not resolve")

        self.assertEqual(len(self.recorder.seen), 1)
        self.assertEqual(
            [proxy.sample("proxy_upstream_errors_total", upstream=u, reason=r)
             for u, r in (("environment", "connect"), ("url-credentials", "proxy"),
                          ("direct", "connect"))],
            [1, 1, 1],
        )  # fmt: skip
        self.assertNotIn(PROXY_PASSWORD, repr(config) + repr(specs) + proxy.metrics_text())

    def websocket_upstream(self) -> tuple[WebSocketServerFactory, str]:
        """An echoing WebSocket upstream over TLS, at the name only the proxy resolves."""
        factory = WebSocketServerFactory()
        factory.protocol = EchoUpstream
        factory.requests = []
        factory.token = TOKEN
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, factory, self.server_tls, interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return factory, f"https://{PROXY_ONLY_NAME}:{port.getHost().port}"

    async def test_websocket_tail_through_the_proxy(self) -> None:
        tiny = self.tinyproxy(credentials=("team", PROXY_PASSWORD))
        upstream, url = self.websocket_upstream()
        proxy_url = f"http://team:{PROXY_PASSWORD}@127.0.0.1:{tiny.port}"
        proxy = ProxyFixture(env_for(url, HTTPS_PROXY=proxy_url), trust=self.trust)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        f = await open_websocket(proxy, "/loki/api/v1/tail?query=%7Bjob%3D%22x%22%7D")
        client = await f.opened
        got: Deferred[None] = Deferred()
        f.waiting.append((2, got))
        client.sendMessage(b"hello")
        client.sendMessage(b"y" * 100_000, isBinary=True)
        await got
        self.assertEqual(f.messages, [b"echo:hello", b"echo:" + b"y" * 100_000])
        (request,) = upstream.requests
        self.assertEqual(request.path, "/loki/api/v1/tail")
        self.assertEqual(request.headers.get("host"), url[8:])
        self.assertNotIn("proxy-authorization", request.headers)
        target = f"CONNECT {url[8:]} HTTP/1.1"
        self.assertEqual(tiny.requests(), [target])
        client.sendClose()
        self.assertEqual(await f.closed, 1000)

    async def test_websocket_refused_by_the_proxy(self) -> None:
        tiny = self.tinyproxy(credentials=("team", PROXY_PASSWORD))
        upstream, url = self.websocket_upstream()
        proxy = ProxyFixture(env_for(url, HTTPS_PROXY=tiny.url), trust=self.trust)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        f = await open_websocket(proxy, "/loki/api/v1/tail")
        with self.assertRaises(NotOpened):
            await f.opened
        self.assertEqual(upstream.requests, [])
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="proxy"), 1
        )
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="loki", method="GET", status="502"), 1
        )
