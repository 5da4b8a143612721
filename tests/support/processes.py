"""Child processes of the tests: the proxy under test (`tests.support.helpers.ProxyProcess`)
and the end-to-end peers (`tests.e2e.peers.Child`) share this one process protocol."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater


class ChildProcess(protocol.ProcessProtocol):
    """A child process: its output (stdout and stderr together, kept for
    failure messages), its pid, and ``ended``, fired with its exit code (minus
    the signal number when a signal ended it), which ``code`` also holds."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.code: int | None = None
        self.pid = 0

    def start(
        self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None
    ) -> ChildProcess:
        transport = reactor.spawnProcess(self, argv[0], list(argv), env=env, path=cwd)  # type: ignore[attr-defined]
        self.pid = transport.pid
        return self

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.code = code if code is not None else -(signal or 1)
        self.ended.callback(self.code)

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:].decode(errors="replace")

    def signal(self, name: str) -> None:
        """Send a signal (``"TERM"``, ``"KILL"``); an error if the process is gone."""
        self.transport.signalProcess(name)  # type: ignore[union-attr]

    async def wait(self, timeout: float) -> bool:
        """Whether the process has ended, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.code is None and time.monotonic() < deadline:
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
        return self.code is not None

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if still running ``timeout`` seconds on (for
        cleanups: a process already gone is fine)."""
        for name, wait in (("TERM", timeout), ("KILL", 5.0)):
            if self.code is not None:
                return
            try:
                self.signal(name)
            except Exception:  # ended in the meantime
                pass
            if await self.wait(wait):
                return
