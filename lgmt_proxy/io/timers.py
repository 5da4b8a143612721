"""An idle timer that costs one ``callLater`` however much traffic flows,
and, reused, however many requests a keep-alive connection carries.

Activity only stamps the time (`touch`); when the call fires early it re-arms
itself for what is left, so a busy stream never reschedules per chunk.
`stop` does not cancel the call either: the next `start` on the same timer
finds it still pending (it fires early and re-arms for the rest), so a
connection's requests after the first cost no timer calls at all (a call and
a cancel were a tenth of a small request's CPU). `cancel` when the owner
goes away, so a pending call does not keep it alive.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class IdleTimer:
    """Calls the ``on_idle`` of the current run once ``seconds`` pass
    without a `touch`; started with ``on_idle`` if given."""

    def __init__(
        self, clock: IReactorTime, seconds: float, on_idle: Callable[[], None] | None = None
    ) -> None:
        self._clock = clock
        self._seconds = seconds
        self._on_idle: Callable[[], None] | None = None
        self._call: IDelayedCall | None = None
        self.last = 0.0
        if on_idle is not None:
            self.start(on_idle)

    def start(self, on_idle: Callable[[], None]) -> None:
        """A new run: ``on_idle`` once ``seconds`` pass from now without a touch."""
        self._on_idle = on_idle
        self.last = self._clock.seconds()
        if self._call is None:
            self._call = self._clock.callLater(self._seconds, self._check)

    def touch(self) -> None:
        self.last = self._clock.seconds()

    def stop(self) -> None:
        """End the run; the pending call, if any, stays for the next."""
        self._on_idle = None

    def cancel(self) -> None:
        """End the run and drop the pending call (the owner is going away)."""
        self._on_idle = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        self._call = None
        on_idle = self._on_idle
        if on_idle is None:
            return
        idle = self._clock.seconds() - self.last
        if idle < self._seconds:
            self._call = self._clock.callLater(self._seconds - idle, self._check)
            return
        self._on_idle = None
        on_idle()
