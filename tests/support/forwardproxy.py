"""A real forward proxy for the egress tests: Debian's tinyproxy (installed by
scripts/install-e2e-peers), on a free loopback port, in a mount namespace
of its own whose /etc/hosts maps names that nothing else on this machine
resolves: a request reaching such a name proves the proxy resolved it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest

#: Names only the forward proxy resolves (to 127.0.0.1).
PROXY_ONLY_NAME = "grafana-cloud.lgmt-egress.test"


def tinyproxy_missing() -> str | None:
    """Why the real forward proxy cannot run here, or None."""
    if shutil.which("tinyproxy") is None:
        return "tinyproxy is not installed (bash scripts/install-e2e-peers)"
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "needs root and unshare(1) for the proxy's own /etc/hosts"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tinyproxy:
    """One tinyproxy process; ``credentials`` (user, password) makes it
    answer 407 to a CONNECT without them."""

    def __init__(self, directory: str, credentials: tuple[str, str] | None = None) -> None:
        if (why := tinyproxy_missing()) is not None:
            if os.environ.get("CI"):
                raise RuntimeError(why)
            raise SkipTest(why)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.log = self.dir / "tinyproxy.log"
        hosts = self.dir / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {PROXY_ONLY_NAME}\n::1 localhost\n")
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 50",
            "Allow 127.0.0.1",
            "LogLevel Connect",
            f'LogFile "{self.log}"',
            f'PidFile "{self.dir / "tinyproxy.pid"}"',
            "DisableViaHeader Yes",
        ]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        conf = self.dir / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        script = f'mount --bind "{hosts}" /etc/hosts && exec tinyproxy -d -c "{conf}"'
        with open(self.dir / "stdout.log", "wb") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._wait_listening()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = (self.dir / "stdout.log").read_text(errors="replace")
                raise RuntimeError(f"tinyproxy exited {self.proc.returncode}: {out[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("tinyproxy did not listen within 10 s")

    def requests(self) -> list[str]:
        """The CONNECT request lines it logged."""
        if not self.log.exists():
            return []
        text = self.log.read_text(errors="replace")
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file" in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
