"""A real Redis for the shared-budget tests: Debian's ``redis-server``
(installed by scripts/install-e2e-peers) on 127.0.0.1 and a free port, in a
temporary directory, persisting nothing; it can be stopped, frozen and
restarted on the same port during a test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest


def redis_missing() -> str | None:
    """Why a real Redis cannot run here, or None."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash scripts/install-e2e-peers)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; with ``password``, clients must AUTH.
    Under CI=true a missing redis-server is an error, else a skip."""

    def __init__(
        self,
        directory: str,
        password: str | None = None,
        tls: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        """``tls``: (key PEM, certificate PEM, CA PEM): TLS only, no plain port."""
        if (why := redis_missing()) is not None:
            if os.environ.get("CI"):
                raise RuntimeError(why)
            raise SkipTest(why)
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls is not None
        if tls is not None:
            for name, data in zip(("key.pem", "cert.pem", "ca.pem"), tls, strict=True):
                (self.dir / name).write_bytes(data)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        port = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        args = [
            "redis-server",
            *port,
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls:
            args += [
                "--tls-cert-file", str(self.dir / "cert.pem"),
                "--tls-key-file", str(self.dir / "key.pem"),
                "--tls-ca-cert-file", str(self.dir / "ca.pem"),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        with open(self.dir / "stderr.log", "ab") as err:  # the child keeps its own copy
            self.proc = subprocess.Popen(args, stdout=err, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = "".join(
                    (self.dir / name).read_text(errors="replace")
                    for name in ("stderr.log", "redis.log")
                    if (self.dir / name).exists()
                )
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {log[-500:]}")
            try:
                if self.cli("PING") == "PONG":
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 10 s")

    def cli(self, *args: str) -> str:
        """One command through redis-cli; its answer as text."""
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password
        tls = (
            ["--tls", "--cacert", str(self.dir / "ca.pem"), "--sni", "localhost"]
            if self.tls
            else []
        )
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *tls, *args],
            capture_output=True,
            check=True,
            timeout=10,
            env=env,
        )
        return out.stdout.decode().strip()

    def freeze(self) -> None:
        """Stop the process without closing its sockets: a Redis that hangs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
