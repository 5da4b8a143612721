"""ROUTES_FILE: a route table for self-hosted stacks, replacing the built-in one."""

from __future__ import annotations

import os
from base64 import b64encode

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.egress import DIRECT, ForwardProxy
from lgmt_proxy.config.routesfile import load_routes_file, parse_routes
from lgmt_proxy.config.settings import ConfigError, parse_config
from lgmt_proxy.rules.routes import upstream_target

YAML = """
routes:
  - name: mimir-push
    prefix: /api/v1/push
    upstream: {a}
    credentials: {{type: basic, user: team-a, token_env: MIMIR_TOKEN}}
    tenant: team-a
  - name: mimir-query
    prefix: /prometheus
    upstream: {b}
    credentials: {{type: bearer, token_file: {token_file}}}
    tenant: team-b
  - name: public
    prefix: /api/v1
    upstream: {b}
    rewrite: /open
"""

TOML = """
[[routes]]
name = "tempo"
prefix = "/tempo"
upstream = "https://tempo.example"
rewrite = ""
tenant = "t"
credentials = { type = "bearer", token_env = "TEMPO_TOKEN" }
"""


class ParseTests(TestCase):
    def test_yaml_and_toml(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "routes.toml")
        with open(path, "w") as f:
            f.write(TOML)
        (spec,) = load_routes_file(path, {"TEMPO_TOKEN": "tempo-secret"}, allow_insecure=False)
        self.assertEqual((spec.route.prefix, spec.route.upstream_prefix), (b"/tempo", b""))
        self.assertEqual(
            (spec.upstream.auth, spec.upstream.tenant, spec.upstream.host),
            ("bearer", "t", "tempo.example"),
        )
        assert spec.token is not None
        self.assertEqual(spec.token.reveal(), "tempo-secret")

    def test_problems_listed(self) -> None:
        doc = {
            "routes": [
                {"name": "Bad Name", "prefix": "/x", "upstream": "https://a"},
                {"name": "a", "prefix": "x/", "upstream": "https://a"},
                {"name": "b", "prefix": "/b", "upstream": "http://remote.example"},
                {
                    "name": "c",
                    "prefix": "/c",
                    "upstream": "https://a",
                    "credentials": {"type": "basic", "token_env": "NOPE"},
                },
                {"name": "d", "prefix": "/metrics", "upstream": "https://a"},
                {"name": "e", "prefix": "/e/../f", "upstream": "https://a"},
                {"name": "f", "prefix": "/f", "upstream": "https://a", "extra": 1},
            ]
        }
        with self.assertRaises(ConfigError) as ctx:
            parse_routes(doc, {}, allow_insecure=False)
        problems = ctx.exception.problems
        self.assertEqual(len(problems), 8, problems)  # route 3 has two
        # A route is called by its name once that is good, else by its place.
        self.assertEqual(
            [p.split(": ")[1] for p in problems],
            ["routes[0].name", "route a", "route b", "route c", "route c", "route d",
             "route e", "routes[6]"],
        )  # fmt: skip
        self.assertRaises(ConfigError, parse_routes, {"routes": []}, {}, allow_insecure=False)

    def write(self, name: str, text: str | bytes) -> str:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.abspath(os.path.join(d, name))
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        return path

    def test_unreadable_token_file_named_by_its_key_with_the_rest(self) -> None:
        # Not the GRAFANA_CLOUD_ACCESS_TOKEN_FILE variable the user never set,
        # and not only once every other problem is fixed.
        missing = os.path.abspath(os.path.join(self.mktemp(), "absent"))
        empty = self.write("empty", "\n")
        path = self.write(
            "routes.yaml",
            f"""
routes:
  - name: q
    prefix: /q
    upstream: http://remote.example
    credentials: {{type: bearer, token_file: {missing}}}
  - name: r
    prefix: /r
    upstream: https://r.example
    credentials: {{type: bearer, token_file: {empty}}}
""",
        )
        with self.assertRaises(ConfigError) as caught:
            load_routes_file(path, {}, allow_insecure=False)
        self.assertEqual(
            caught.exception.problems,
            [
                "ROUTES_FILE: route q: upstream: must be https:// unless the host is loopback "
                "or ALLOW_INSECURE_UPSTREAM=true (the token would travel in clear)",
                f"ROUTES_FILE: route q: credentials.token_file: cannot read {missing}: "
                "No such file or directory",
                "ROUTES_FILE: route r: credentials.token_file: is empty",
            ],
        )

    def test_syntax_errors_name_path_line_column_and_reason(self) -> None:
        path = self.write("routes.yaml", "routes:\n  - name: a\n    prefix: [/a\n")
        with self.assertRaises(ConfigError) as caught:
            load_routes_file(path, {}, allow_insecure=False)
        (line,) = caught.exception.problems
        self.assertRegex(
            line, rf"^ROUTES_FILE: {path}: line 4, column 1: not valid YAML or JSON: .*expected"
        )
        path = self.write("routes.toml", '[[routes]]\nname = "a"\nprefix = /a\n')
        with self.assertRaises(ConfigError) as caught:
            load_routes_file(path, {}, allow_insecure=False)
        self.assertEqual(
            caught.exception.problems,
            [f"ROUTES_FILE: {path}: line 3, column 10: not valid TOML: Invalid value"],
        )
        path = self.write("bad.toml", b"name = '\xff'\n")
        with self.assertRaises(ConfigError) as caught:
            load_routes_file(path, {}, allow_insecure=False)
        self.assertEqual(
            caught.exception.problems, [f"ROUTES_FILE: {path}: not UTF-8 text (byte 9)"]
        )

    def test_longest_prefix_first(self) -> None:
        doc = {
            "routes": [
                {"name": "short", "prefix": "/api", "upstream": "https://a"},
                {"name": "long", "prefix": "/api/v1/push", "upstream": "https://a"},
            ]
        }
        self.assertEqual(
            [s.upstream.name for s in parse_routes(doc, {}, allow_insecure=False)],
            ["long", "short"],
        )

    def test_url_path(self) -> None:
        # The same rule as the GRAFANA_CLOUD_* URLs: the path of `upstream` is
        # where the service is mounted, not added again when the upstream path
        # (rewrite + rest) already starts with it on whole segments.
        doc = {
            "routes": [
                {"name": "mimir", "prefix": "/prometheus", "upstream": "https://m/mimir/"},
                {"name": "otlp", "prefix": "/otlp", "upstream": "https://gw/otlp"},
                {"name": "push", "prefix": "/push", "upstream": "https://m/api", "rewrite": ""},
                {"name": "twice", "prefix": "/loki", "upstream": "https://l", "rewrite": "/l/loki"},
                {"name": "tempo", "prefix": "/tempo", "upstream": "https://t/tempo", "rewrite": ""},
            ]
        }
        specs = {s.upstream.name: s for s in parse_routes(doc, {}, allow_insecure=False)}

        def sent(name: str, path: bytes) -> bytes:
            spec = specs[name]
            base = spec.upstream.base_path.encode()
            return upstream_target(spec.route, base, path, b"a=1")

        self.assertEqual(
            sent("mimir", b"/prometheus/api/v1/query"), b"/mimir/prometheus/api/v1/query?a=1"
        )
        self.assertEqual(sent("otlp", b"/otlp/v1/traces"), b"/otlp/v1/traces?a=1")
        self.assertEqual(sent("push", b"/push/api/v1/push"), b"/api/v1/push?a=1")
        self.assertEqual(sent("push", b"/push/v1/push"), b"/api/v1/push?a=1")
        self.assertEqual(sent("twice", b"/loki/api/v1/push"), b"/l/loki/api/v1/push?a=1")
        self.assertEqual(sent("tempo", b"/tempo/api/search"), b"/tempo/api/search?a=1")

    def test_environment_rules(self) -> None:
        # With ROUTES_FILE, no GRAFANA_CLOUD token or signal is needed; both at once is an error.
        config = parse_config({"ROUTES_FILE": "/x.yaml"})
        self.assertEqual(config.routes_file, "/x.yaml")
        with self.assertRaises(ConfigError):
            parse_config(
                {
                    "ROUTES_FILE": "/x.yaml",
                    "GRAFANA_CLOUD_LOKI_URL": "https://l",
                    "GRAFANA_CLOUD_LOKI_ORG_ID": "1",
                    "GRAFANA_CLOUD_ACCESS_TOKEN": "t",
                }
            )


class RouteProxyTests(TestCase):
    """A route's ``proxy``: its own forward proxy, ``none``, or the environment's rule."""

    def parse(self, **routes: object) -> dict[str, object]:
        doc = {
            "routes": [
                {"name": name, "prefix": f"/{name}", "upstream": "https://mimir.example"}
                | ({} if proxy is None else {"proxy": proxy})
                for name, proxy in routes.items()
            ]
        }
        return {
            s.upstream.name: s.upstream.proxy for s in parse_routes(doc, {}, allow_insecure=False)
        }

    def test_own_proxy_none_or_absent(self) -> None:
        found = self.parse(
            own="http://team:pa%3Ass@squid.corp:3128", direct="none", tls="https://p", env=None
        )
        own = found["own"]
        assert isinstance(own, ForwardProxy) and own.authorization is not None
        self.assertEqual(own.display, "http://squid.corp:3128")
        self.assertEqual(own.authorization.reveal(), "Basic " + b64encode(b"team:pa:ss").decode())
        self.assertEqual(found["direct"], DIRECT)
        self.assertEqual(found["tls"], ForwardProxy("https", "p", 443))
        self.assertIsNone(found["env"])

    def test_problems_name_the_route_and_never_quote_the_url(self) -> None:
        doc = {
            "routes": [
                {"name": n, "prefix": f"/{n}", "upstream": "https://m", "proxy": p}
                for n, p in (
                    ("socks", "socks5://u:s3cret@h:1080"),
                    ("typo", "direct"),
                    ("path", "http://u:s3cret@squid:3128/x"),
                    ("port", "http://u:s3cret@squid:99999"),
                    ("nohost", "http://u:s3cret@:3128"),
                    ("number", 3128),
                )
            ]
        }
        with self.assertRaises(ConfigError) as caught:
            parse_routes(doc, {}, allow_insecure=False)
        self.assertEqual(
            caught.exception.problems,
            [
                "ROUTES_FILE: route socks: proxy: a proxy URL starting with http:// or https://, "
                "or none for direct",
                "ROUTES_FILE: route typo: proxy: a proxy URL starting with http:// or https://, "
                "or none for direct",
                "ROUTES_FILE: route path: proxy: must be only a scheme, host and port",
                "ROUTES_FILE: route port: proxy: not a URL like http://proxy.example:3128",
                "ROUTES_FILE: route nohost: proxy: has no host",
                "ROUTES_FILE: route number: proxy: a proxy URL starting with http:// or "
                "https://, or none for direct",
            ],
        )
        self.assertNotIn("s3cret", "\n".join(caught.exception.problems))

    def test_toml(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "routes.toml")
        with open(path, "w") as f:
            f.write(TOML + 'proxy = "none"\n')
        (spec,) = load_routes_file(path, {"TEMPO_TOKEN": "tempo-secret"}, allow_insecure=False)
        self.assertEqual(spec.upstream.proxy, DIRECT)
