"""An idle timer that costs one ``callLater`` however much traffic flows.

Activity only stamps the time (`touch`); when the call fires early it re-arms
itself for what is left, so a busy stream never reschedules per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class IdleTimer:
    """Calls ``on_idle`` once ``seconds`` pass without a `touch`."""

    def __init__(self, clock: IReactorTime, seconds: float, on_idle: Callable[[], None]) -> None:
        self._clock = clock
        self._seconds = seconds
        self._on_idle = on_idle
        self.last = clock.seconds()
        self._call: IDelayedCall | None = clock.callLater(seconds, self._check)

    def touch(self) -> None:
        self.last = self._clock.seconds()

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        idle = self._clock.seconds() - self.last
        if idle < self._seconds:
            self._call = self._clock.callLater(self._seconds - idle, self._check)
            return
        self._call = None
        self._on_idle()
