"""CLIENT_AUTH_FILE: who may use the proxy, for what, and how fast."""

from __future__ import annotations

import base64
import hashlib
import json
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lgmt_proxy.clientauth import RateLimiter, load_client_auth, parse_client_auth
from lgmt_proxy.config import ConfigError
from lgmt_proxy.watch import WatchedFile

from .helpers import ORG, ProxyFixture, Recorder, basic, call, env_for, listen, upstream_site

KUBECOST = "kubecost-token-0123456789"
ALLOY = "alloy-token-abcdefghijklmn"

DOC = f"""
consumers:
  - name: kubecost
    token_sha256: {hashlib.sha256(KUBECOST.encode()).hexdigest()}
    allow:
      - methods: [GET, POST]
        paths: ["/prometheus/api/v1/query*", "/prometheus/api/v1/series"]
  - name: alloy
    token: {ALLOY}
    allow:
      - methods: [POST]
        paths: ["/api/prom/push", "/otlp/v1/*"]
    rate_limit: {{requests_per_second: 1, burst: 2}}
"""


def bearer(token: str) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [b"Bearer " + token.encode()]}


class ParseTests(TestCase):
    def test_parse_and_authenticate(self) -> None:
        auth = parse_client_auth(DOC)
        self.assertEqual([c.name for c in auth.consumers], ["kubecost", "alloy"])
        self.assertEqual(auth.authenticate([b"Bearer " + KUBECOST.encode()]).name, "kubecost")  # type: ignore[union-attr]
        basic_alloy = b"Basic " + base64.b64encode(b"alloy:" + ALLOY.encode())
        self.assertEqual(auth.authenticate([basic_alloy]).name, "alloy")  # type: ignore[union-attr]
        wrong_user = b"Basic " + base64.b64encode(b"kubecost:" + ALLOY.encode())
        for values in (
            None,
            [],
            [b"Bearer nope"],
            [b"Bearer"],
            [wrong_user],
            [b"Basic !!!"],
            [b"Digest x"],
            [b"Bearer " + KUBECOST.encode(), b"Bearer " + KUBECOST.encode()],
        ):
            self.assertIsNone(auth.authenticate(values), values)

    def test_rules(self) -> None:
        auth = parse_client_auth(DOC)
        kubecost, alloy = auth.consumers
        self.assertTrue(kubecost.allows(b"GET", b"/prometheus/api/v1/query"))
        self.assertTrue(kubecost.allows(b"POST", b"/prometheus/api/v1/query_range"))
        self.assertTrue(kubecost.allows(b"GET", b"/prometheus/api/v1/series"))
        self.assertFalse(kubecost.allows(b"GET", b"/prometheus/api/v1/series/x"))
        self.assertFalse(kubecost.allows(b"DELETE", b"/prometheus/api/v1/query"))
        self.assertFalse(kubecost.allows(b"POST", b"/api/prom/push"))
        self.assertTrue(alloy.allows(b"POST", b"/otlp/v1/traces"))
        self.assertFalse(alloy.allows(b"GET", b"/otlp/v1/traces"))
        self.assertFalse(alloy.allows(b"POST", b"/loki/api/v1/push"))

    def test_json_accepted(self) -> None:
        doc = json.dumps(
            {
                "consumers": [
                    {
                        "name": "a",
                        "token": "x" * 16,
                        "allow": [{"methods": "*", "paths": ["/loki/*"]}],
                    }
                ]
            }
        )
        (consumer,) = parse_client_auth(doc).consumers
        self.assertTrue(consumer.allows(b"PATCH", b"/loki/a/b"))

    def test_problems_listed_without_tokens(self) -> None:
        doc = """
consumers:
  - name: a
    token: short-secret
    allow: [{methods: [GET], paths: ["/loki/*"]}]
  - name: b
    token_sha256: nothex
    allow: []
  - name: a
    token: another-long-secret-value
    token_sha256: 0000000000000000000000000000000000000000000000000000000000000000
    allow: [{methods: [FETCH], paths: ["loki"]}]
"""
        with self.assertRaises(ConfigError) as ctx:
            parse_client_auth(doc)
        text = "\n".join(ctx.exception.problems)
        self.assertGreaterEqual(len(ctx.exception.problems), 4, text)
        self.assertNotIn("short-secret", text)
        self.assertNotIn("another-long-secret-value", text)
        for bad in ("", "consumers: []", "[1, 2", "consumers: [1]"):
            self.assertRaises(ConfigError, parse_client_auth, bad)

    def test_rate_limiter(self) -> None:
        clock = Clock()
        limiter = RateLimiter(clock)
        _, alloy = parse_client_auth(DOC).consumers
        self.assertEqual([limiter.wait(alloy) for _ in range(2)], [0.0, 0.0])
        self.assertAlmostEqual(limiter.wait(alloy), 1.0)
        clock.advance(0.5)
        self.assertAlmostEqual(limiter.wait(alloy), 0.5)
        clock.advance(0.5)
        self.assertEqual(limiter.wait(alloy), 0.0)
        kubecost, _ = parse_client_auth(DOC).consumers
        self.assertEqual([limiter.wait(kubecost) for _ in range(100)], [0.0] * 100)


class ProxyAuthTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.up = Recorder()
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "clients.yaml")
        with open(self.path, "w") as f:
            f.write(DOC)
        auth, problem = load_client_auth(self.path)
        assert auth is not None, problem
        self.source = WatchedFile(auth, self.path, kind="client_auth", load=load_client_auth)
        self.proxy = ProxyFixture(
            env_for(f"http://127.0.0.1:{port.getHost().port}"), client_auth=self.source
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.proxy.close()))

    async def test_missing_or_wrong_401(self) -> None:
        for headers in (
            {},
            bearer("wrong-token-wrong-token"),
            {b"Authorization": [basic(ORG["loki"])]},
        ):
            response, body = await call(
                self.proxy.url + "/prometheus/api/v1/query?query=up", headers=headers
            )
            self.assertEqual(response.code, 401)
            self.assertIn(b"Bearer", response.headers.getRawHeaders(b"www-authenticate")[0])
            self.assertEqual(json.loads(body)["upstream"], "prometheus")
        self.assertEqual(self.up.seen, [])

    async def test_forbidden_403(self) -> None:
        response, _ = await call(self.proxy.url + "/loki/api/v1/query", headers=bearer(KUBECOST))
        self.assertEqual(response.code, 403)
        response, _ = await call(
            self.proxy.url + "/api/prom/push", method=b"GET", headers=bearer(ALLOY)
        )
        self.assertEqual(response.code, 403)
        self.assertEqual(self.up.seen, [])

    async def test_allowed_and_own_credential_replaced(self) -> None:
        response, _ = await call(
            self.proxy.url + "/prometheus/api/v1/query?query=up", headers=bearer(KUBECOST)
        )
        self.assertEqual(response.code, 200)
        seen = self.up.seen[-1]
        self.assertEqual(seen.header(b"authorization"), [basic(ORG["prometheus"])])
        self.assertEqual(
            self.proxy.sample(
                "proxy_requests_total",
                upstream="prometheus",
                method="GET",
                status="200",
                consumer="kubecost",
            ),
            1,
        )

    async def test_rate_limit_429(self) -> None:
        codes = []
        for _ in range(3):
            response, _ = await call(
                self.proxy.url + "/otlp/v1/traces",
                method=b"POST",
                body=b"{}",
                headers=bearer(ALLOY),
            )
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(response.phrase, b"Too Many Requests")
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(len(self.up.seen), 2)

    async def test_ops_stay_open(self) -> None:
        for path in ("/health", "/ready"):
            response, _ = await call(self.proxy.url + path)
            self.assertEqual(response.code, 200, path)
        # /metrics lists consumers: only for a consumer allowed it (issue 13).
        response, _ = await call(self.proxy.url + "/metrics")
        self.assertEqual(response.code, 401)

    async def test_reload_and_bad_file_keeps_old(self) -> None:
        new = DOC.replace("kubecost", "opencost")
        with open(self.path + ".new", "w") as f:
            f.write(new)
        os.replace(self.path + ".new", self.path)
        self.source.poll()
        response, _ = await call(
            self.proxy.url + "/prometheus/api/v1/query", headers=bearer(KUBECOST)
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(
            self.proxy.sample(
                "proxy_requests_total",
                upstream="prometheus",
                method="GET",
                status="200",
                consumer="opencost",
            ),
            1,
        )
        with open(self.path + ".new", "w") as f:
            f.write("consumers: {broken")
        os.replace(self.path + ".new", self.path)
        self.source.poll()
        response, _ = await call(
            self.proxy.url + "/prometheus/api/v1/query", headers=bearer(KUBECOST)
        )
        self.assertEqual(response.code, 200)

    def test_startup_refuses_a_bad_file(self) -> None:
        from lgmt_proxy.tap import load

        with open(self.path, "w") as f:
            f.write("consumers: [{name: x}]")
        env = env_for("https://x.grafana.net", CLIENT_AUTH_FILE=self.path)
        with self.assertRaises(ConfigError) as ctx:
            load(env)
        self.assertTrue(all(p.startswith("CLIENT_AUTH_FILE:") for p in ctx.exception.problems))
        env["CLIENT_AUTH_FILE"] = os.path.join(self.dir, "missing.yaml")
        self.assertRaises(ConfigError, load, env)
