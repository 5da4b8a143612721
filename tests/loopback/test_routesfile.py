"""ROUTES_FILE end to end: a proxy on a loopback port serving a route table
from a file (the parsing rules are in tests/pure/test_routesfile.py).
"""

from __future__ import annotations

import base64
import io
import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import unknown_variables
from lgmt_proxy.config.tokens import token_source
from lgmt_proxy.service import ProxyService
from lgmt_proxy.tap import load
from tests.pure.test_routesfile import YAML
from tests.support.helpers import ProxyFixture, Recorder, call, listen, sleep, upstream_site


class ProxyTests(TestCase):
    timeout = 30

    async def test_routes_credentials_tenants(self) -> None:
        a, b = Recorder(), Recorder()
        pa, pb = listen(upstream_site(a)), listen(upstream_site(b))
        self.addCleanup(pa.stopListening)
        self.addCleanup(pb.stopListening)
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        token_file = os.path.join(d, "bearer")
        with open(token_file, "w") as f:
            f.write("bearer-token-1\n")
        routes_path = os.path.join(d, "routes.yaml")
        with open(routes_path, "w") as f:
            f.write(
                YAML.format(
                    a=f"http://127.0.0.1:{pa.getHost().port}",
                    b=f"http://127.0.0.1:{pb.getHost().port}",
                    token_file=token_file,
                )
            )
        env = {"ROUTES_FILE": routes_path, "MIMIR_TOKEN": "mimir-secret"}
        _config, token, _, specs = load(env)
        self.assertIsNone(token)
        assert specs is not None
        routes = [(s, token_source(s.token, s.token_file) if s.token else None) for s in specs]
        proxy = ProxyFixture(env, routes=routes)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))

        client_auth = {b"Authorization": [b"Bearer client-own"], b"X-Scope-OrgID": [b"evil"]}
        await call(proxy.url + "/api/v1/push", method=b"POST", body=b"x", headers=client_auth)
        seen = a.seen[-1]
        self.assertEqual(seen.uri, b"/api/v1/push")
        self.assertEqual(
            seen.header(b"authorization"), [b"Basic " + base64.b64encode(b"team-a:mimir-secret")]
        )
        self.assertEqual(seen.header(b"x-scope-orgid"), [b"team-a"])

        await call(proxy.url + "/prometheus/api/v1/query?query=up", headers=client_auth)
        seen = b.seen[-1]
        self.assertEqual(seen.uri, b"/prometheus/api/v1/query?query=up")
        self.assertEqual(seen.header(b"authorization"), [b"Bearer bearer-token-1"])
        self.assertEqual(seen.header(b"x-scope-orgid"), [b"team-b"])

        await call(proxy.url + "/api/v1/labels", headers=client_auth)
        seen = b.seen[-1]
        self.assertEqual(seen.uri, b"/open/labels")
        self.assertIsNone(seen.header(b"authorization"))
        self.assertIsNone(seen.header(b"x-scope-orgid"))

        for path in ("/loki/api/v1/push", "/api/prom/push"):  # the built-in table is gone
            response, _ = await call(proxy.url + path)
            self.assertEqual(response.code, 404)
        self.assertEqual(
            proxy.sample(
                "proxy_requests_total", upstream="mimir-push", method="POST", status="200"
            ),
            1,
        )


class StartupLineTests(TestCase):
    """What the start-up lines say about each route: never Python's None."""

    timeout = 30

    async def test_routes_and_unknown_variables(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        token_file = os.path.join(d, "bearer")
        with open(token_file, "w") as f:
            f.write("bearer-token-1\n")
        routes_path = os.path.join(d, "routes.yaml")
        with open(routes_path, "w") as f:
            f.write(
                YAML.format(a="https://a.example", b="https://b.example", token_file=token_file)
            )
        env = {
            "ROUTES_FILE": routes_path,
            "MIMIR_TOKEN": "mimir-secret",
            "SHUTDOWN_DELAY_SECONDS": "0",
        }
        config, _, _, specs = load(env)
        out = io.StringIO()
        svc = ProxyService(
            config,
            reactor,
            token=None,
            routes=specs,
            listen="tcp:0:interface=127.0.0.1",
            stdout=out,
            handle_sigterm=False,
            warnings=unknown_variables({"GRAFANA_CLOUD_PROMETEUS_URL": "https://p"}),
        )
        globalLogPublisher.addObserver(svc.log_observer)
        self.addCleanup(globalLogPublisher.removeObserver, svc.log_observer)
        svc.startService()
        self.addCleanup(svc.stopService)
        await sleep(0.05)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        said = [x["msg"] for x in lines if x.get("logger") == "lgmt_proxy"]
        self.assertIn(
            "GRAFANA_CLOUD_PROMETEUS_URL is not a known variable; "
            "did you mean GRAFANA_CLOUD_PROMETHEUS_URL?",
            said,
        )
        self.assertEqual(
            sorted(m for m in said if m.startswith("signal ")),
            [
                "signal mimir-push on: https://a.example via direct (auth basic, org id team-a, tenant team-a)",
                "signal mimir-query on: https://b.example via direct (auth bearer, org id -, tenant team-b)",
                "signal public on: https://b.example via direct (auth none, org id -, tenant -)",
            ],
        )
        self.assertNotIn("None", out.getvalue())
