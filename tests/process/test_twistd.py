"""The installed entry point: twistd lgmt-proxy is next to this interpreter,
and a bad environment makes it exit non-zero with one line per problem, no
traceback and never the token (moved from tests/pure/test_docs.py: it spawns
twistd).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).parent / "twistd"


class _Collect(ProcessProtocol):
    """Collects a child's output; kills it if it outlives ``timeout``."""

    def __init__(self, timeout: float) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.timed_out = False
        self.ended: Deferred[int | None] = Deferred()
        self._timeout = timeout
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]
        self._timer = reactor.callLater(self._timeout, self._kill)  # type: ignore[attr-defined]

    def _kill(self) -> None:
        self._timer = None
        self.timed_out = True
        self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.ended.callback(getattr(reason.value, "exitCode", None))


class TwistdTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not TWISTD.exists():
            self.fail(f"{TWISTD} is missing: install the project (make venv)")

    def _twistd(self, args: list[str], env: dict[str, str], limit: float) -> Deferred[Any]:
        return Deferred.fromCoroutine(run_twistd(args, env, limit))

    async def test_help(self) -> None:
        output, code, timed_out = await self._twistd(["lgmt-proxy", "--help"], {}, 20)
        self.assertFalse(timed_out)
        self.assertEqual(code, 0, output)
        self.assertIn("--sandbox", output)
        self.assertIn("--listen", output)
        self.assertIn("--admin-listen", output)

    async def test_bad_environment(self) -> None:
        env = {
            "PORT": "0",
            "GRAFANA_CLOUD_LOKI_URL": "http://example.com",
            "GRAFANA_CLOUD_ACCESS_TOKEN": "supersecret-value",
        }
        output, code, timed_out = await self._twistd(["-n", "--pidfile=", "lgmt-proxy"], env, 20)
        self.assertFalse(timed_out, f"twistd still running after 20 s:\n{output}")
        self.assertNotIn(code, (0, None), output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("supersecret-value", output)
        lines = output.splitlines()
        about: dict[str, list[str]] = {}
        for name in ("PORT", "GRAFANA_CLOUD_LOKI_URL", "GRAFANA_CLOUD_LOKI_ORG_ID"):
            pattern = re.compile(rf"(?<![A-Za-z0-9_]){name}: \S")
            about[name] = [line for line in lines if pattern.search(line)]
            self.assertEqual(len(about[name]), 1, f"one line about {name}:\n{output}")
        # A separate line per problem, not one line naming them all.
        self.assertEqual(len({found[0] for found in about.values()}), len(about), output)


async def run_twistd(
    args: list[str], env: dict[str, str], timeout: float
) -> tuple[str, int | None, bool]:
    """Run the installed twistd; return (stdout + stderr, exit code, timed out).

    Not `getProcessOutputAndValue`: its Deferred cannot be cancelled, so a
    child that hangs would outlive the test. This kills it at ``timeout``.
    """
    protocol = _Collect(timeout)
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    reactor.spawnProcess(  # type: ignore[attr-defined]
        protocol, str(TWISTD), [str(TWISTD), *args], env=child_env, path=str(ROOT)
    )
    code = await protocol.ended
    output = (protocol.out + protocol.err).decode("utf-8", "replace")
    return output, code, protocol.timed_out


class TypoTests(TestCase):
    """A mistyped variable of ours is named, with the closest known one, also
    when the configuration error it causes stops the start."""

    timeout = 30

    def setUp(self) -> None:
        if not TWISTD.exists():
            self.fail(f"{TWISTD} is missing: install the project (make venv)")

    async def test_typo_named_before_the_error(self) -> None:
        env = {
            "GRAFANA_CLOUD_PROMETEUS_URL": "https://prometheus.example",
            "GRAFANA_CLOUD_PROMETHEUS_ORG_ID": "1",
            "GRAFANA_CLOUD_ACCESS_TOKEN": "supersecret-value",
        }
        output, code, timed_out = await run_twistd(["-n", "--pidfile=", "lgmt-proxy"], env, 20)
        self.assertFalse(timed_out, output)
        self.assertEqual(code, 2, output)
        lines = output.splitlines()
        self.assertEqual(
            lines[0],
            "lgmt-proxy: warning: GRAFANA_CLOUD_PROMETEUS_URL is not a known variable; "
            "did you mean GRAFANA_CLOUD_PROMETHEUS_URL?",
            output,
        )
        self.assertIn(
            "lgmt-proxy: configuration error: GRAFANA_CLOUD_PROMETHEUS_URL: required because "
            "GRAFANA_CLOUD_PROMETHEUS_ORG_ID is set",
            lines,
        )


class BadEndpointTests(TestCase):
    """A bad endpoint description is named by where it came from, in one
    line, with no traceback, and the start stops (exit 2)."""

    timeout = 30

    async def test_each_names_its_option(self) -> None:
        env = {
            "GRAFANA_CLOUD_OTLP_URL": "https://otlp.example",
            "GRAFANA_CLOUD_OTLP_ORG_ID": "1",
            "GRAFANA_CLOUD_ACCESS_TOKEN": "supersecret-value",
        }
        cases = [
            (["--listen=bogus:1"], {}, "--listen"),
            (["--listen=tcp:0:interface=127.0.0.1", "--admin-listen=bogus:1"], {}, "--admin-listen"),
            (["--listen=tcp:0:interface=127.0.0.1"], {"OTLP_GRPC_LISTEN": "bogus:1"}, "OTLP_GRPC_LISTEN"),
        ]  # fmt: skip
        for options, extra, option in cases:
            args = ["-n", "--pidfile=", "lgmt-proxy", *options]
            output, code, timed_out = await run_twistd(args, {**env, **extra}, 20)
            self.assertFalse(timed_out, output)
            self.assertEqual(code, 2, output)
            self.assertIn(
                f"lgmt-proxy: configuration error: {option}: Unknown endpoint type: 'bogus'",
                output.splitlines(),
            )
            self.assertNotIn("Traceback", output)
            self.assertNotIn("supersecret-value", output)
