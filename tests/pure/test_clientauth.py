"""CLIENT_AUTH_FILE: who may use the proxy, for what, and how fast."""

from __future__ import annotations

import base64
import hashlib
import json
import os

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import load_client_auth, parse_client_auth
from lgmt_proxy.config.settings import ConfigError
from lgmt_proxy.config.watch import WatchedFile

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


class SyntaxErrorTests(TestCase):
    def test_path_line_column_and_the_parsers_reason(self) -> None:
        text = "consumers:\n  - name: a\n    allow: [{paths: /x}\n    token: t\n"
        with self.assertRaises(ConfigError) as caught:
            parse_client_auth(text, path="/etc/lgmt/clients.yaml")
        self.assertEqual(
            caught.exception.problems,
            [
                "CLIENT_AUTH_FILE: /etc/lgmt/clients.yaml: line 4, column 5: not valid YAML or "
                "JSON: expected ',' or ']', but got '<scalar>' (while parsing a flow sequence)"
            ],
        )


class ReloadTests(TestCase):
    """A watched file's problems on reload are the start-up lines, and a file
    fixed after an error says it is in force again and counts a success."""

    def setUp(self) -> None:
        from prometheus_client import CollectorRegistry
        from twisted.logger import formatEvent, globalLogPublisher

        from lgmt_proxy.obs.metrics import ProxyMetrics

        d = self.mktemp()
        os.makedirs(d)
        self.path = os.path.join(d, "clients.yaml")
        self.write(DOC)
        self.registry = CollectorRegistry()
        metrics = ProxyMetrics(self.registry, process_collectors=False)
        auth, problems = load_client_auth(self.path)
        assert auth is not None, problems
        self.source = WatchedFile(
            auth,
            self.path,
            kind="client_auth",
            load=load_client_auth,
            reloads=metrics.config_reloads,
        )
        self.logged: list[tuple[str, str]] = []

        def observe(event: dict[str, object]) -> None:
            if event.get("log_namespace") == "lgmt_proxy.watch":
                self.logged.append((str(event["log_level"].name), formatEvent(event)))  # type: ignore[attr-defined]

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def write(self, text: str) -> None:
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)

    def count(self, result: str) -> float | None:
        return self.registry.get_sample_value(
            "proxy_config_reloads_total", {"file": "client_auth", "result": result}
        )

    def test_problems_as_at_startup_then_back_in_force(self) -> None:
        from lgmt_proxy.tap import load
        from tests.support.helpers import env_for

        broken = DOC.replace("name: kubecost", "name: kube cost").replace("[POST]", "[FETCH]")
        self.write(broken)
        with self.assertRaises(ConfigError) as caught:
            load(env_for("https://x.grafana.net", CLIENT_AUTH_FILE=self.path))
        at_start = caught.exception.problems
        self.assertEqual(len(at_start), 2, at_start)
        self.source.poll()
        self.assertEqual(
            self.logged,
            [
                (
                    "error",
                    f"client_auth file {self.path} changed but cannot be used, the previous "
                    "one stays in force: 2 problem(s) follow",
                ),
                *[("error", line) for line in at_start],
            ],
        )
        self.assertEqual((self.count("error"), self.count("success")), (1, None))
        self.assertEqual(self.source().consumers[0].name, "kubecost")
        # Fixed back to exactly what stayed in force: said and counted all the same.
        del self.logged[:]
        self.write(DOC + "\n")
        self.source.poll()
        self.assertEqual(
            self.logged, [("info", f"client_auth file {self.path} is valid again and in force")]
        )
        self.assertEqual((self.count("error"), self.count("success")), (1, 1))
