"""Configuration parsing: every rule of the contract's table, without os.environ."""

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import (
    KNOWN_VARIABLES,
    ConfigError,
    Secret,
    parse_config,
    unknown_variables,
)

TOKEN = "glc_secret-token-value"
BASE = {
    "GRAFANA_CLOUD_ACCESS_TOKEN": TOKEN,
    "GRAFANA_CLOUD_PROMETHEUS_URL": "https://prometheus-prod-56.grafana.net",
    "GRAFANA_CLOUD_PROMETHEUS_ORG_ID": "2668285",
}


def problems(env: dict[str, str]) -> list[str]:
    try:
        parse_config(env)
    except ConfigError as e:
        return e.problems
    raise AssertionError("expected a ConfigError")


class DefaultsTests(TestCase):
    def test_defaults(self) -> None:
        c = parse_config(BASE)
        self.assertEqual(c.port, 8085)
        self.assertEqual(c.upstream_connect_timeout, 5.0)
        self.assertEqual(c.upstream_timeout, 300.0)
        self.assertEqual(c.max_request_body_bytes, 52428800)
        self.assertEqual(c.shutdown_delay, 5.0)
        self.assertEqual(c.shutdown_grace, 25.0)
        self.assertEqual(c.client_header_timeout, 15.0)
        self.assertEqual(c.client_idle_timeout, 75.0)
        self.assertEqual(c.max_connections, 10000)
        self.assertEqual((c.log_level, c.log_format), ("info", "json"))
        self.assertFalse(c.allow_insecure_upstream)
        self.assertEqual(list(c.signals), ["prometheus"])

    def test_tenant_defaults_to_org_id(self) -> None:
        s = parse_config(BASE).signals["prometheus"]
        self.assertEqual((s.user, s.tenant), ("2668285", "2668285"))
        s = parse_config({**BASE, "GRAFANA_CLOUD_PROMETHEUS_TENANT_ID": "t1"}).signals["prometheus"]
        self.assertEqual(s.tenant, "t1")

    def test_url_parts(self) -> None:
        s = parse_config(
            {**BASE, "GRAFANA_CLOUD_PROMETHEUS_URL": "https://h.example:8443/base/"}
        ).signals["prometheus"]
        self.assertEqual(
            (s.scheme, s.host, s.port, s.base_path), ("https", "h.example", 8443, "/base")
        )

    def test_all_signals(self) -> None:
        env = {"GRAFANA_CLOUD_ACCESS_TOKEN": TOKEN}
        for sig in ("PROMETHEUS", "LOKI", "TEMPO", "OTLP"):
            env[f"GRAFANA_CLOUD_{sig}_URL"] = f"https://{sig.lower()}.grafana.net"
            env[f"GRAFANA_CLOUD_{sig}_ORG_ID"] = "1"
        self.assertEqual(sorted(parse_config(env).signals), ["loki", "otlp", "prometheus", "tempo"])

    def test_token_is_hidden(self) -> None:
        c = parse_config(BASE)
        self.assertIsInstance(c.token, Secret)
        self.assertNotIn(TOKEN, repr(c))
        self.assertNotIn(TOKEN, str(c.token))
        assert c.token is not None
        self.assertEqual(c.token.reveal(), TOKEN)

    def test_token_file_named(self) -> None:
        env = {k: v for k, v in BASE.items() if k != "GRAFANA_CLOUD_ACCESS_TOKEN"}
        c = parse_config({**env, "GRAFANA_CLOUD_ACCESS_TOKEN_FILE": "/run/secrets/token"})
        self.assertEqual(c.token_file, "/run/secrets/token")
        self.assertIsNone(c.token)

    def test_loopback_http_allowed(self) -> None:
        for host in ("127.0.0.1", "localhost", "[::1]", "127.9.9.9"):
            parse_config({**BASE, "GRAFANA_CLOUD_PROMETHEUS_URL": f"http://{host}:9090"})

    def test_insecure_allowed_when_asked(self) -> None:
        c = parse_config(
            {
                **BASE,
                "GRAFANA_CLOUD_PROMETHEUS_URL": "http://prom.internal",
                "ALLOW_INSECURE_UPSTREAM": "true",
            }
        )
        self.assertEqual(c.signals["prometheus"].port, 80)


class ErrorTests(TestCase):
    def test_every_problem_listed_once_and_no_token(self) -> None:
        env = {
            **BASE,
            "PORT": "0",
            "GRAFANA_CLOUD_LOKI_URL": "https://logs.grafana.net",
            "GRAFANA_CLOUD_TEMPO_ORG_ID": "5",
            "UPSTREAM_TIMEOUT_SECONDS": "soon",
            "LOG_FORMAT": "xml",
        }
        lines = problems(env)
        self.assertEqual(len(lines), 5, lines)
        for name in (
            "PORT",
            "GRAFANA_CLOUD_LOKI_ORG_ID",
            "GRAFANA_CLOUD_TEMPO_URL",
            "UPSTREAM_TIMEOUT_SECONDS",
            "LOG_FORMAT",
        ):
            self.assertTrue(any(line.startswith(name + ":") for line in lines), (name, lines))
        self.assertFalse(any(TOKEN in line for line in lines))

    def test_no_signal(self) -> None:
        (line,) = problems({"GRAFANA_CLOUD_ACCESS_TOKEN": TOKEN})
        self.assertIn("at least one signal", line)

    def test_token_required(self) -> None:
        env = {k: v for k, v in BASE.items() if k != "GRAFANA_CLOUD_ACCESS_TOKEN"}
        (line,) = problems(env)
        self.assertTrue(line.startswith("GRAFANA_CLOUD_ACCESS_TOKEN:"))

    def test_token_and_file(self) -> None:
        (line,) = problems({**BASE, "GRAFANA_CLOUD_ACCESS_TOKEN_FILE": "/x"})
        self.assertTrue(line.startswith("GRAFANA_CLOUD_ACCESS_TOKEN_FILE:"))

    def test_token_with_whitespace(self) -> None:
        (line,) = problems({**BASE, "GRAFANA_CLOUD_ACCESS_TOKEN": "abc def"})
        self.assertNotIn("abc def", line)

    def test_plain_http_refused(self) -> None:
        (line,) = problems(
            {**BASE, "GRAFANA_CLOUD_PROMETHEUS_URL": "http://prometheus.grafana.net"}
        )
        self.assertTrue(line.startswith("GRAFANA_CLOUD_PROMETHEUS_URL:"))
        self.assertIn("https", line)

    def test_bad_urls(self) -> None:
        for url in (
            "ftp://x",
            "https://",
            "https://u:p@host",
            "https://host/?q=1",
            "https://host:99999",
            "prometheus.grafana.net",
        ):
            (line,) = problems({**BASE, "GRAFANA_CLOUD_PROMETHEUS_URL": url})
            self.assertTrue(line.startswith("GRAFANA_CLOUD_PROMETHEUS_URL:"), (url, line))
            self.assertNotIn(":p@", line)

    def test_https_host_tls_cannot_verify(self) -> None:
        # An underscore is fine in DNS but not in a name a certificate is
        # checked against: said at start, naming the variable, not as a
        # failure of every request (nor blamed on --listen).
        (line,) = problems({**BASE, "GRAFANA_CLOUD_PROMETHEUS_URL": "https://my_host.internal"})
        self.assertTrue(line.startswith("GRAFANA_CLOUD_PROMETHEUS_URL: host 'my_host.internal'"))
        for fine in ("https://10.0.0.1:8443", "https://[::1]", "https://bücher.example"):
            parse_config({**BASE, "GRAFANA_CLOUD_PROMETHEUS_URL": fine})
        # An http:// upstream is not checked by TLS.
        parse_config(
            {
                **BASE,
                "GRAFANA_CLOUD_PROMETHEUS_URL": "http://my_host:9090",
                "ALLOW_INSECURE_UPSTREAM": "true",
            }
        )

    def test_org_id_without_colon(self) -> None:
        (line,) = problems({**BASE, "GRAFANA_CLOUD_PROMETHEUS_ORG_ID": "a:b"})
        self.assertTrue(line.startswith("GRAFANA_CLOUD_PROMETHEUS_ORG_ID:"))

    def test_ports(self) -> None:
        for bad in ("0", "65536", "-1", "80a", "1.5", "\u00b2", "\u0663"):
            (line,) = problems({**BASE, "PORT": bad})
            self.assertTrue(line.startswith("PORT:"), line)
        self.assertEqual(parse_config({**BASE, "PORT": "65535"}).port, 65535)
        self.assertEqual(parse_config({**BASE, "PORT": "1"}).port, 1)

    def test_numbers(self) -> None:
        for name in (
            "UPSTREAM_CONNECT_TIMEOUT_SECONDS",
            "UPSTREAM_TIMEOUT_SECONDS",
            "CLIENT_HEADER_TIMEOUT_SECONDS",
            "CLIENT_IDLE_TIMEOUT_SECONDS",
        ):
            for bad in ("0", "-1", "nan", "inf", "x"):
                (line,) = problems({**BASE, name: bad})
                self.assertTrue(line.startswith(name + ":"), line)
        c = parse_config({**BASE, "SHUTDOWN_DELAY_SECONDS": "0", "MAX_REQUEST_BODY_BYTES": "0"})
        self.assertEqual((c.shutdown_delay, c.max_request_body_bytes), (0.0, 0))

    def test_booleans(self) -> None:
        (line,) = problems({**BASE, "ALLOW_INSECURE_UPSTREAM": "maybe"})
        self.assertTrue(line.startswith("ALLOW_INSECURE_UPSTREAM:"))

    def test_client_auth_file_named(self) -> None:
        self.assertEqual(
            parse_config({**BASE, "CLIENT_AUTH_FILE": "/etc/c.yaml"}).client_auth_file,
            "/etc/c.yaml",
        )


class _Recording(dict[str, str]):
    """An environment that notes every name asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)


class UnknownVariableTests(TestCase):
    def test_known_are_those_parse_config_reads(self) -> None:
        env = _Recording()
        self.assertRaises(ConfigError, parse_config, env)
        self.assertEqual(env.asked, set(KNOWN_VARIABLES))

    def test_typos_get_the_closest_name(self) -> None:
        env = {
            **BASE,
            "GRAFANA_CLOUD_PROMETEUS_URL": "https://p",
            "UPSTREAM_TIMEOUT": "30",
            "CLIENT_AUTH": "/x",
            "LOG_LEVLE": "debug",
            "GRAFANA_CLOUD_SOMETHING_ELSE_ENTIRELY_X": "1",
            # Not ours: other programs' variables, Kubernetes' service links.
            "PATH": "/bin",
            "HOME": "/root",
            "UPSTREAM_SERVICE_HOST": "10.0.0.1",
            "UPSTREAM_PORT_8080_TCP_ADDR": "10.0.0.1",
            "CLIENT_PORT": "tcp://10.0.0.2:80",
        }
        self.assertEqual(
            unknown_variables(env),
            [
                "CLIENT_AUTH is not a known variable; did you mean CLIENT_AUTH_FILE?",
                "GRAFANA_CLOUD_PROMETEUS_URL is not a known variable; "
                "did you mean GRAFANA_CLOUD_PROMETHEUS_URL?",
                "GRAFANA_CLOUD_SOMETHING_ELSE_ENTIRELY_X is not a known variable "
                "(docs/configuration.md lists them)",
                "LOG_LEVLE is not a known variable; did you mean LOG_LEVEL?",
                "UPSTREAM_TIMEOUT is not a known variable; did you mean UPSTREAM_TIMEOUT_SECONDS?",
            ],
        )
        self.assertEqual(unknown_variables(BASE), [])
        parse_config(env)  # a warning, never an error


class StartupFieldsTests(TestCase):
    """The start-up line of an upstream: `-` where nothing is sent, never None."""

    def test_fields(self) -> None:
        from lgmt_proxy.announce import upstream_fields
        from lgmt_proxy.config.settings import upstream_from_url

        signal = parse_config(BASE).signals["prometheus"]
        self.assertEqual(
            upstream_fields(signal, has_token=True, from_consumer=False),
            {
                "url": "https://prometheus-prod-56.grafana.net",
                "via": "direct",
                "auth": "basic",
                "org_id": "2668285",
                "tenant_id": "2668285",
            },
        )
        bearer = upstream_from_url("q", "https://q", user="", tenant=None, auth="bearer")
        fields = upstream_fields(bearer, has_token=True, from_consumer=True)
        self.assertEqual(
            (fields["auth"], fields["org_id"], fields["tenant_id"]),
            ("bearer", "-", "from_consumer"),
        )
        none = upstream_from_url("o", "https://o", user="", tenant=None, auth="none")
        fields = upstream_fields(none, has_token=False, from_consumer=False)
        self.assertEqual(
            (fields["auth"], fields["org_id"], fields["tenant_id"]), ("none", "-", "-")
        )
