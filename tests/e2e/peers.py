"""Start and stop the real peers of the end-to-end tests.

Everything here runs as a child of the test process on 127.0.0.1, on a free
port, with its files in a temporary directory, and is stopped (SIGTERM, then
SIGKILL) in the test's cleanup. A peer that is not installed skips the test
with the command that installs it, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import attrs
from twisted.trial.unittest import FailTest, SkipTest, TestCase

from ..support.helpers import (
    ORG,
    TOKEN,
    ProxyProcess,
    call,
    free_port,
    listen,
    sleep,
    spawn_proxy,
    upstream_site,
)
from ..support.processes import ChildProcess
from .upstream import FakeCloud

INSTALL = "sudo bash scripts/install-e2e-peers .venv"
NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")

#: The token the proxy under test is given. Only for proving that the tests
#: notice missing credentials: ``LGMT_E2E_PROXY_TOKEN=wrong trial tests.e2e``
#: must fail every test (the upstreams keep expecting `TOKEN`).
PROXY_TOKEN = os.environ.get("LGMT_E2E_PROXY_TOKEN") or TOKEN

T = TypeVar("T")


# --- what is installed ------------------------------------------------------


def missing(what: str) -> NoReturn:
    """Skip loudly on a developer machine; fail in CI, where peers are installed."""
    message = f"end-to-end peer missing: {what}. Install the peers with: {INSTALL}"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        raise FailTest(message + " (CI=true: a missing peer fails instead of skipping)")
    raise SkipTest(message)


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the `{name}` program is not on PATH")
    return path


def need_modules(*names: str) -> None:
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            missing(f"the Python module `{name}` (requirements-e2e.lock)")


def need_node_packages(*names: str) -> str:
    node = need_binary("node")
    for name in names:
        if not os.path.isfile(os.path.join(NODE_DIR, "node_modules", name, "package.json")):
            missing(f"the npm package `{name}` in tests/e2e/node/node_modules")
    return node


def temp_dir(case: TestCase, name: str) -> str:
    path = tempfile.mkdtemp(prefix=f"lgmt-e2e-{name}-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


# --- child processes --------------------------------------------------------


class Child(ChildProcess):
    """A peer process, named in failure messages."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def child_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    env.update(extra)
    return env


def spawn(
    case: TestCase | None,
    name: str,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> Child:
    child = Child(name)
    child.start(argv, env if env is not None else child_env(), cwd)
    if case is not None:
        case.addCleanup(child.stop)
    return child


async def run(
    name: str,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 60.0,
) -> tuple[int, str]:
    """Run a program to completion: (exit code, output); killed past ``timeout``."""
    child = spawn(None, name, argv, env, cwd)
    if not await child.wait(timeout):
        await child.stop(1.0)
        raise FailTest(f"{name} still running after {timeout}s:\n{child.tail()}")
    assert child.code is not None
    return child.code, child.output.decode(errors="replace")


async def poll(
    what: str,
    attempt: Callable[[], Awaitable[T | None]],
    timeout: float,
    interval: float = 0.25,
) -> T:
    """Call ``attempt`` until it returns something other than None, or fail."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = await attempt()
            if result is not None:
                return result
        except AssertionError:
            raise
        except Exception as e:  # connection refused while starting, and the like
            last = e
        if time.monotonic() >= deadline:
            raise FailTest(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")
        await sleep(interval)


# --- the proxy under test ---------------------------------------------------


async def start_proxy(
    case: TestCase, urls: dict[str, str], extra: dict[str, str] | None = None
) -> ProxyProcess:
    """``twistd -n lgmt-proxy`` with each signal of ``urls`` pointed at its
    URL (and ``extra`` variables)."""
    env = {
        "GRAFANA_CLOUD_ACCESS_TOKEN": PROXY_TOKEN,
        "SHUTDOWN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "LOG_LEVEL": "warn",
    }
    for signal, url in urls.items():
        env[f"GRAFANA_CLOUD_{signal.upper()}_URL"] = url
        env[f"GRAFANA_CLOUD_{signal.upper()}_ORG_ID"] = ORG[signal]
    env.update(extra or {})
    proxy = await spawn_proxy(env)
    case.addCleanup(proxy.stop)
    if proxy.ended.called:
        raise FailTest(f"lgmt-proxy did not start:\n{proxy.output.decode()}")
    return proxy


async def fake_cloud_behind_proxy(case: TestCase, *signals: str) -> tuple[FakeCloud, str, str]:
    """A `FakeCloud` on loopback and the proxy with ``signals`` pointed at it:
    (the cloud, its direct URL, the proxy's URL)."""
    cloud = FakeCloud()
    port = listen(upstream_site(cloud))
    case.addCleanup(port.stopListening)
    direct = f"http://127.0.0.1:{port.getHost().port}"
    proxy = await start_proxy(case, dict.fromkeys(signals, direct))
    return cloud, direct, proxy.url


# --- Prometheus -------------------------------------------------------------


@attrs.define
class Prometheus:
    child: Child
    port: int
    prefix: str
    directory: str
    headers: dict[bytes, list[bytes]]

    @property
    def url(self) -> str:
        """Base URL including the route prefix (what promtool and clients take)."""
        return f"http://127.0.0.1:{self.port}{self.prefix}"


#: remote_write queue settings that deliver within about a second.
FAST_QUEUE = {"batch_send_deadline": "1s", "min_backoff": "100ms", "max_backoff": "1s"}


def agent_config(run_id: str, scrape_target: str, remote_write: list[Any]) -> dict[str, Any]:
    """A Prometheus agent that scrapes ``scrape_target`` (job lgmt-proxy) every
    second, labels its series with ``e2e_run``, and remote-writes them."""
    return {
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
            "external_labels": {"e2e_run": run_id},
        },
        "scrape_configs": [
            {"job_name": "lgmt-proxy", "static_configs": [{"targets": [scrape_target]}]}
        ],
        "remote_write": remote_write,
    }


async def start_prometheus(
    case: TestCase,
    name: str,
    config: dict[str, Any],
    *,
    route_prefix: str = "",
    basic_auth_users: dict[str, str] | None = None,
    auth_header: bytes | None = None,
    remote_write_receiver: bool = False,
) -> Prometheus:
    """A real Prometheus (Debian's 2.42) on a free loopback port.

    ``basic_auth_users`` (user -> bcrypt hash) goes into ``--web.config.file``;
    ``auth_header`` is what readiness polling then needs to send.
    """
    binary = need_binary("prometheus")
    directory = temp_dir(case, name)
    config_file = os.path.join(directory, "prometheus.yml")
    with open(config_file, "w") as f:
        json.dump(config, f)  # JSON is YAML
    argv = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={os.path.join(directory, 'data')}",
        "--storage.remote.flush-deadline=1s",
        "--log.level=warn",
    ]
    if route_prefix:
        argv.append(f"--web.route-prefix={route_prefix}")
    if remote_write_receiver:
        argv.append("--web.enable-remote-write-receiver")
    if basic_auth_users is not None:
        web_file = os.path.join(directory, "web.yml")
        with open(web_file, "w") as f:
            json.dump({"basic_auth_users": basic_auth_users}, f)
        argv.append(f"--web.config.file={web_file}")
    headers = {b"Authorization": [auth_header]} if auth_header else {}

    for _ in range(3):  # free_port() can race with another process: retry on a new port
        port = free_port()
        child = spawn(case, f"prometheus-{name}", [*argv, f"--web.listen-address=127.0.0.1:{port}"])
        prom = Prometheus(child, port, route_prefix, directory, headers)

        async def ready(prom: Prometheus = prom) -> bool | None:
            if prom.child.code is not None:
                return False
            response, _ = await call(prom.url + "/-/ready", headers=prom.headers)
            return True if response.code == 200 else None

        if await poll(f"prometheus {name} to be ready", ready, timeout=30):
            return prom
        if b"address already in use" not in child.output:
            break
    raise FailTest(f"prometheus {name} exited with {child.code}:\n{child.tail()}")
