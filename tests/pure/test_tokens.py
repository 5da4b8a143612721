"""GRAFANA_CLOUD_ACCESS_TOKEN_FILE: read at start, re-read when it changes."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import ConfigError
from lgmt_proxy.config.tokens import read_token_file, token_source
from lgmt_proxy.obs.metrics import ProxyMetrics
from lgmt_proxy.tap import load
from tests.support.helpers import (
    env_for,
)


class TokenFileTests(TestCase):
    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_read_strips_newline(self) -> None:
        token, problem = read_token_file(self.write("t", "abc123\n"))
        assert token is not None
        self.assertEqual((token.reveal(), problem), ("abc123", []))

    def test_problems_never_show_content(self) -> None:
        token, problems = read_token_file(self.write("t", "two words-secret\n"))
        self.assertIsNone(token)
        self.assertEqual(
            problems, ["GRAFANA_CLOUD_ACCESS_TOKEN_FILE: contains whitespace or control characters"]
        )
        missing = os.path.join(self.dir, "missing")
        _, problems = read_token_file(missing)
        self.assertEqual(
            problems,
            [f"GRAFANA_CLOUD_ACCESS_TOKEN_FILE: cannot read {missing}: No such file or directory"],
        )

    def test_load_reads_the_file(self) -> None:
        env = env_for("https://x.grafana.net")
        del env["GRAFANA_CLOUD_ACCESS_TOKEN"]
        env["GRAFANA_CLOUD_ACCESS_TOKEN_FILE"] = self.write("t", "file-token\n")
        _config, token, _, _ = load(env)
        self.assertEqual(token.reveal(), "file-token")
        env["GRAFANA_CLOUD_ACCESS_TOKEN_FILE"] = self.write("e", "\n")
        self.assertRaises(ConfigError, load, env)

    def test_kubernetes_symlink_swap(self) -> None:
        # Kubernetes: token -> ..data/token, ..data -> ..2024_x; an update
        # writes a new dir and swaps the ..data link atomically.
        v1 = os.path.join(self.dir, "v1")
        v2 = os.path.join(self.dir, "v2")
        os.makedirs(v1)
        os.makedirs(v2)
        self.write("v1/token", "old-token")
        self.write("v2/token", "new-token")
        os.symlink("v1", os.path.join(self.dir, "..data"))
        os.symlink("..data/token", os.path.join(self.dir, "token"))
        path = os.path.join(self.dir, "token")
        registry = CollectorRegistry()
        token, _ = read_token_file(path)
        assert token is not None
        metrics = ProxyMetrics(registry, process_collectors=False)
        source = token_source(token, path, metrics.config_reloads)
        source.poll()
        self.assertEqual(source().reveal(), "old-token")
        tmp = os.path.join(self.dir, "..data_tmp")
        os.symlink("v2", tmp)
        os.replace(tmp, os.path.join(self.dir, "..data"))
        source.poll()
        self.assertEqual(source().reveal(), "new-token")
        self.assertEqual(
            registry.get_sample_value(
                "proxy_config_reloads_total", {"file": "token", "result": "success"}
            ),
            1,
        )
        # a bad new file keeps the old token
        self.write("v2/token", "")
        os.utime(os.path.join(self.dir, "v2/token"), ns=(1, 1))
        source.poll()
        self.assertEqual(source().reveal(), "new-token")
        self.assertEqual(
            registry.get_sample_value(
                "proxy_config_reloads_total", {"file": "token", "result": "error"}
            ),
            1,
        )

    def test_route_token_file_reload_named_by_its_key(self) -> None:
        # A route's token file is not GRAFANA_CLOUD_ACCESS_TOKEN_FILE, on reload either.
        from twisted.logger import formatEvent, globalLogPublisher

        logged: list[str] = []

        def observe(event: dict[str, object]) -> None:
            if event.get("log_namespace") == "lgmt_proxy.watch":
                logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        path = self.write("q", "first-token\n")
        token, _ = read_token_file(path)
        assert token is not None
        key = "ROUTES_FILE: route q: credentials.token_file"
        source = token_source(token, path, name=key)
        os.unlink(path)
        source.poll()
        self.assertEqual(
            logged[1:], [f"{key}: cannot read {path}: No such file or directory"], logged
        )
        self.write("q", "first-token\n")
        source.poll()
        self.assertEqual(logged[2:], [f"token file {path} is valid again and in force"])
        self.assertEqual(source().reveal(), "first-token")
