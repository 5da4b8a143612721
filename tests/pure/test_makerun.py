"""`make run`'s choice between .env, the environment and the sandbox, and the
sandbox's environment (lgmt_proxy/sandbox.py `plan_run`, `sandbox_env`)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from lgmt_proxy.sandbox import SANDBOX_TOKEN, plan_run, run_listen, sandbox_env


class PlanRunTests(TestCase):
    def test_nothing_configured_starts_the_sandbox_and_says_why(self) -> None:
        plan = plan_run({"PATH": "/bin", "LOG_FORMAT": "text"}, dotenv=False, args=[])
        self.assertTrue(plan.sandbox)
        self.assertEqual(
            plan.says,
            (
                "make run: no .env, no GRAFANA_CLOUD_* or ROUTES_FILE set: starting the "
                "sandbox (a built-in echo upstream; nothing leaves this machine)",
            ),
        )

    def test_dotenv_wins(self) -> None:
        plan = plan_run({}, dotenv=True, args=[])
        self.assertFalse(plan.sandbox)
        self.assertEqual(
            plan.says, ("make run: configuration from .env (ARGS=--sandbox for the sandbox)",)
        )

    def test_token_in_the_environment(self) -> None:
        plan = plan_run(
            {"GRAFANA_CLOUD_ACCESS_TOKEN": "glc_secret-value"}, dotenv=False, args=["--x"]
        )
        self.assertFalse(plan.sandbox)
        self.assertEqual(
            plan.says,
            ("make run: configuration from the environment: GRAFANA_CLOUD_ACCESS_TOKEN is set",),
        )

    def test_routes_file_without_a_token_runs_with_the_environment(self) -> None:
        """A route table brings its own credentials: no Grafana token needed,
        and the routes must not be silently replaced by the sandbox's."""
        plan = plan_run(
            {"ROUTES_FILE": "routes.yaml", "MIMIR_TOKEN": "secret"}, dotenv=False, args=[]
        )
        self.assertFalse(plan.sandbox)
        self.assertEqual(
            plan.says, ("make run: configuration from the environment: ROUTES_FILE is set",)
        )

    def test_a_signal_without_a_token_gets_the_proxys_own_errors(self) -> None:
        """A half-done configuration runs with the environment, so the proxy
        names what is missing rather than a sandbox ignoring it."""
        plan = plan_run({"GRAFANA_CLOUD_LOKI_URL": "https://logs"}, dotenv=False, args=[])
        self.assertFalse(plan.sandbox)
        self.assertIn("GRAFANA_CLOUD_LOKI_URL is set", plan.says[0])

    def test_empty_values_count_as_unset(self) -> None:
        plan = plan_run({"GRAFANA_CLOUD_ACCESS_TOKEN": ""}, dotenv=False, args=[])
        self.assertTrue(plan.sandbox)

    def test_sandbox_asked_names_what_it_ignores_never_values(self) -> None:
        env = {
            "GRAFANA_CLOUD_LOKI_URL": "https://logs",
            "GRAFANA_CLOUD_ACCESS_TOKEN": "glc_secret-value",
            "ROUTES_FILE": "routes.yaml",
            "GRAFANA_CLOUD_LOKI_ORG_ID": "12",
            "GRAFANA_CLOUD_TEMPO_URL": "https://traces",
            "PORT": "9000",
        }
        plan = plan_run(env, dotenv=True, args=["--sandbox"])
        self.assertTrue(plan.sandbox)
        self.assertEqual(
            plan.says,
            (
                "make run: starting the sandbox (--sandbox in ARGS)",
                "make run: the sandbox ignores GRAFANA_CLOUD_ACCESS_TOKEN, ROUTES_FILE, "
                "GRAFANA_CLOUD_LOKI_ORG_ID, GRAFANA_CLOUD_LOKI_URL and 1 more",
            ),
        )
        self.assertNotIn("secret", " ".join(plan.says))

    def test_sandbox_keeps_client_auth_and_says_so(self) -> None:
        plan = plan_run({"CLIENT_AUTH_FILE": "auth.yaml"}, dotenv=False, args=[])
        self.assertTrue(plan.sandbox)
        self.assertEqual(
            plan.says[-1],
            "make run: the sandbox keeps CLIENT_AUTH_FILE: clients must authenticate",
        )


class RunListenTests(TestCase):
    def test_loopback_only_on_port(self) -> None:
        self.assertEqual(run_listen({}), "tcp:port=8085:interface=127.0.0.1:backlog=1024")
        self.assertEqual(
            run_listen({"PORT": "9000"}), "tcp:port=9000:interface=127.0.0.1:backlog=1024"
        )


class SandboxEnvTests(TestCase):
    def test_replaces_upstreams_keeps_the_rest_short_drain(self) -> None:
        env = sandbox_env(
            {
                "GRAFANA_CLOUD_ACCESS_TOKEN": "glc_real",
                "GRAFANA_CLOUD_LOKI_URL": "https://logs",
                "ROUTES_FILE": "routes.yaml",
                "CLIENT_AUTH_FILE": "auth.yaml",
            },
            4321,
        )
        self.assertEqual(env["GRAFANA_CLOUD_ACCESS_TOKEN"], SANDBOX_TOKEN)
        self.assertEqual(env["GRAFANA_CLOUD_LOKI_URL"], "http://127.0.0.1:4321")
        self.assertEqual(env["GRAFANA_CLOUD_LOKI_ORG_ID"], "sandbox-loki")
        self.assertNotIn("ROUTES_FILE", env)
        self.assertEqual(env["CLIENT_AUTH_FILE"], "auth.yaml")
        self.assertEqual((env["SHUTDOWN_DELAY_SECONDS"], env["SHUTDOWN_GRACE_SECONDS"]), ("0", "3"))

    def test_the_users_drain_wins(self) -> None:
        env = sandbox_env({"SHUTDOWN_DELAY_SECONDS": "2", "SHUTDOWN_GRACE_SECONDS": "60"}, 1)
        self.assertEqual(
            (env["SHUTDOWN_DELAY_SECONDS"], env["SHUTDOWN_GRACE_SECONDS"]), ("2", "60")
        )
