"""Client authentication (CLIENT_AUTH_FILE) end to end: a proxy on a loopback
port in front of a loopback upstream (the parsing rules are in
tests/pure/test_clientauth.py).
"""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import load_client_auth
from lgmt_proxy.config.settings import ConfigError
from lgmt_proxy.config.watch import WatchedFile
from tests.pure.test_clientauth import ALLOY, DOC, KUBECOST, bearer
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    call,
    env_for,
    listen,
    upstream_site,
)


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

    async def test_body_bytes_by_consumer(self) -> None:
        """Which team pushes the most (issue 21): body bytes carry the consumer."""
        await call(
            self.proxy.url + "/otlp/v1/traces",
            method=b"POST",
            body=b"x" * 700,
            headers=bearer(ALLOY),
        )
        await call(
            self.proxy.url + "/prometheus/api/v1/query",
            method=b"POST",
            body=b"query=up",
            headers=bearer(KUBECOST),
        )
        sample = self.proxy.sample
        self.assertEqual(
            sample("proxy_request_body_bytes_total", upstream="otlp", consumer="alloy"), 700
        )
        self.assertEqual(
            sample("proxy_request_body_bytes_total", upstream="prometheus", consumer="kubecost"), 8
        )
        self.assertGreater(
            sample("proxy_response_body_bytes_total", upstream="otlp", consumer="alloy"), 0
        )
        self.assertEqual(sample("proxy_request_body_bytes_total", upstream="otlp"), 0)

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
