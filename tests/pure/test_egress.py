"""HTTPS_PROXY, HTTP_PROXY and NO_PROXY read as curl documents them."""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from lgmt_proxy.config.egress import (
    DIRECT,
    Egress,
    ForwardProxy,
    parse_egress,
    parse_no_proxy,
    parse_proxy_url,
)


class ProxyURLTests(SynchronousTestCase):
    def test_scheme_host_port(self) -> None:
        proxy = parse_proxy_url("http://squid.internal:3128")
        assert isinstance(proxy, ForwardProxy)
        self.assertEqual((proxy.scheme, proxy.host, proxy.port), ("http", "squid.internal", 3128))
        self.assertIsNone(proxy.authorization)

    def test_bare_host_port_is_http_and_default_ports(self) -> None:
        bare = parse_proxy_url("squid:3128")
        assert isinstance(bare, ForwardProxy)
        self.assertEqual((bare.scheme, bare.port), ("http", 3128))
        self.assertEqual(parse_proxy_url("http://squid").port, 80)  # type: ignore[union-attr]
        self.assertEqual(parse_proxy_url("https://squid").port, 443)  # type: ignore[union-attr]

    def test_userinfo_becomes_a_hidden_proxy_authorization(self) -> None:
        proxy = parse_proxy_url("http://team%40corp:p%3Ass@squid:3128")
        assert isinstance(proxy, ForwardProxy)
        assert proxy.authorization is not None
        expected = "Basic " + base64.b64encode(b"team@corp:p:ss").decode()
        self.assertEqual(proxy.authorization.reveal(), expected)
        self.assertEqual(proxy.display, "http://squid:3128")
        for text in (repr(proxy), str(proxy), proxy.display):
            self.assertNotIn("p:ss", text)
            self.assertNotIn(expected, text)

    def test_credentials_from_a_file_win(self) -> None:
        proxy = parse_proxy_url("http://a:b@squid:3128", credentials="c:d")
        assert isinstance(proxy, ForwardProxy) and proxy.authorization is not None
        self.assertEqual(proxy.authorization.reveal(), "Basic " + base64.b64encode(b"c:d").decode())

    def test_problems_are_short_and_never_quote_credentials(self) -> None:
        self.assertEqual(parse_proxy_url("socks5://h:1080"), "must start with http:// or https://")
        self.assertEqual(parse_proxy_url("http://:3128"), "has no host")
        self.assertEqual(
            parse_proxy_url("http://h:99999"), "not a URL like http://proxy.example:3128"
        )
        self.assertEqual(
            parse_proxy_url("http://h:3128/path"), "must be only a scheme, host and port"
        )
        problem = parse_proxy_url("http://h:1", credentials="no-colon-secret")
        self.assertEqual(problem, "credentials must be user:password")

    def test_ipv6_proxy(self) -> None:
        proxy = parse_proxy_url("http://[fd00::1]:3128")
        assert isinstance(proxy, ForwardProxy)
        self.assertEqual(proxy.host, "fd00::1")
        self.assertEqual(proxy.display, "http://[fd00::1]:3128")


class NoProxyTests(SynchronousTestCase):
    def test_domain_matches_itself_and_subdomains_only(self) -> None:
        rules = parse_no_proxy("example.com")
        self.assertTrue(rules.bypasses("example.com", 443))
        self.assertTrue(rules.bypasses("www.example.com", 443))
        self.assertTrue(rules.bypasses("WWW.Example.COM.", 443))
        self.assertFalse(rules.bypasses("notexample.com", 443))
        self.assertFalse(rules.bypasses("example.com.other", 443))

    def test_leading_dot_or_star_dot_is_the_same_domain(self) -> None:
        for entry in (".example.com", "*.example.com"):
            rules = parse_no_proxy(entry)
            self.assertTrue(rules.bypasses("example.com", 443), entry)
            self.assertTrue(rules.bypasses("a.example.com", 443), entry)

    def test_star_alone_bypasses_everything(self) -> None:
        self.assertTrue(parse_no_proxy("foo, *").bypasses("anything.example", 1))
        self.assertFalse(parse_no_proxy("*.x").bypasses("y", 1))

    def test_addresses_and_cidr_ranges(self) -> None:
        rules = parse_no_proxy("10.0.0.0/8, 192.168.1.5, ::1, fd00::/8")
        self.assertTrue(rules.bypasses("10.1.2.3", 443))
        self.assertTrue(rules.bypasses("192.168.1.5", 443))
        self.assertFalse(rules.bypasses("192.168.1.6", 443))
        self.assertTrue(rules.bypasses("[fd00::5]", 443))
        self.assertFalse(rules.bypasses("11.0.0.1", 443))
        # A name is not resolved to be matched against a range.
        self.assertFalse(rules.bypasses("ten.example", 443))

    def test_ports(self) -> None:
        rules = parse_no_proxy("internal.example:8443, [fd00::1]:9000, 10.1.1.1:80")
        self.assertTrue(rules.bypasses("internal.example", 8443))
        self.assertFalse(rules.bypasses("internal.example", 443))
        self.assertTrue(rules.bypasses("fd00::1", 9000))
        self.assertFalse(rules.bypasses("fd00::1", 9001))
        self.assertTrue(rules.bypasses("10.1.1.1", 80))
        self.assertFalse(rules.bypasses("10.1.1.1", 81))

    def test_loopback_is_always_direct(self) -> None:
        rules = parse_no_proxy("")
        for host in ("localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]"):
            self.assertTrue(rules.bypasses(host, 8080), host)
        self.assertFalse(rules.bypasses("localhost.example", 8080))

    def test_empty_and_junk_entries_are_ignored(self) -> None:
        rules = parse_no_proxy(" , ,host:notaport, a/b")
        self.assertEqual(rules.rules, ())
        self.assertFalse(rules.bypasses("host", 1))


class EnvironmentTests(SynchronousTestCase):
    def test_each_scheme_its_variable_upper_case_first(self) -> None:
        egress, problems = parse_egress(
            {
                "HTTPS_PROXY": "http://secure:3128",
                "https_proxy": "http://ignored:1",
                "http_proxy": "http://plain:3128",
                "no_proxy": "svc.cluster.local",
            }
        )
        self.assertEqual(problems, [])
        self.assertEqual(egress.proxies["https"].host, "secure")
        self.assertEqual(egress.proxies["http"].host, "plain")
        self.assertIsNone(egress.proxy_for("https", "mimir.svc.cluster.local", 443))
        chosen = egress.proxy_for("https", "prometheus.grafana.net", 443)
        self.assertEqual(chosen, egress.proxies["https"])
        self.assertEqual(egress.proxy_for("http", "x.example", 80), egress.proxies["http"])

    def test_unset_means_direct(self) -> None:
        egress, problems = parse_egress({})
        self.assertEqual((dict(egress.proxies), problems), ({}, []))
        self.assertIsNone(egress.proxy_for("https", "x.grafana.net", 443))

    def test_credentials_file_applies_to_every_proxy(self) -> None:
        egress, _ = parse_egress({"HTTPS_PROXY": "http://u:old@s:1", "HTTP_PROXY": "http://s:2"})
        updated = egress.with_credentials("team:n3w\n")
        assert not isinstance(updated, str)
        want = "Basic " + base64.b64encode(b"team:n3w").decode()
        for proxy in updated.proxies.values():
            assert proxy.authorization is not None
            self.assertEqual(proxy.authorization.reveal(), want)
        self.assertEqual(egress.with_credentials("nocolon"), "credentials must be user:password")

    def test_a_bad_value_is_a_problem_naming_the_variable(self) -> None:
        _, problems = parse_egress({"HTTPS_PROXY": "socks5://u:secret@h:1"})
        self.assertEqual(problems, ["HTTPS_PROXY: must start with http:// or https://"])
        self.assertNotIn("secret", problems[0])


class RouteProxyTests(SynchronousTestCase):
    """A ROUTES_FILE route's own choice wins over the environment."""

    def egress(self, credentials: str | None = None) -> Egress:
        egress, _ = parse_egress({"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "mimir.internal"})
        if credentials is not None:
            updated = egress.with_credentials(credentials)
            assert not isinstance(updated, str)
            egress = updated
        return egress

    def test_none_is_direct_whatever_the_environment(self) -> None:
        self.assertIsNone(self.egress().proxy_for("https", "x.grafana.net", 443, DIRECT))

    def test_own_proxy_wins_over_the_environment_and_no_proxy(self) -> None:
        own = parse_proxy_url("http://squid:3128")
        assert isinstance(own, ForwardProxy)
        egress = self.egress()
        self.assertEqual(egress.proxy_for("https", "x.grafana.net", 443, own), own)
        self.assertEqual(egress.proxy_for("https", "mimir.internal", 443, own), own)
        self.assertEqual(egress.proxy_for("http", "localhost", 80, own), own)
        # Absent: the environment's rule.
        env = egress.proxy_for("https", "x.grafana.net", 443, None)
        self.assertEqual(env, egress.proxies["https"])
        self.assertIsNone(egress.proxy_for("https", "mimir.internal", 443, None))

    def test_credentials_file_fills_in_only_where_the_url_has_none(self) -> None:
        egress = self.egress("file:fromfile")
        from_file = "Basic " + base64.b64encode(b"file:fromfile").decode()
        bare = parse_proxy_url("http://squid:3128")
        own = parse_proxy_url("http://route:fromurl@squid:3128")
        assert isinstance(bare, ForwardProxy) and isinstance(own, ForwardProxy)
        chosen = egress.proxy_for("https", "x.grafana.net", 443, bare)
        assert chosen is not None and chosen.authorization is not None
        self.assertEqual(chosen.authorization.reveal(), from_file)
        chosen = egress.proxy_for("https", "x.grafana.net", 443, own)
        assert chosen is not None and chosen.authorization is not None
        self.assertEqual(
            chosen.authorization.reveal(), "Basic " + base64.b64encode(b"route:fromurl").decode()
        )
        # Without a credentials file, a bare route proxy gets none.
        chosen = self.egress().proxy_for("https", "x.grafana.net", 443, bare)
        assert chosen is not None
        self.assertIsNone(chosen.authorization)
        self.assertNotIn("fromfile", repr(egress))
