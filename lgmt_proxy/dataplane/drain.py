"""Graceful shutdown: stop taking work without dropping any that was taken.

Waiting for requests to finish is not enough (the last response may still sit
in the write buffer when the reactor stops); this waits for the connections
themselves to close.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

_TICK = 0.05
#: An idle connection is closed once it has been quiet this long: a client
#: that connected or finished a request a moment ago may have its next
#: request on the wire, and closing under it would cut it.
QUIET = 0.5


class Draining(Protocol):
    """A connection as the drain sees it (HTTP/1.1 or gRPC)."""

    def close_when_idle(self, quiet: float) -> None: ...

    def close_now(self) -> None: ...


class Listening(Protocol):
    """A listener's factory: its open connections."""

    @property
    def connections(self) -> Collection[Draining]: ...


async def drain_connections(factory: Listening, clock: IReactorTime, grace: float) -> int:
    """Close idle keep-alive connections, let busy ones finish their response
    and close, and abort what is left after ``grace`` seconds. Returns how many
    connections had to be aborted."""
    deadline = clock.seconds() + grace
    while factory.connections:
        for connection in list(factory.connections):
            # Quiet idle ones close now; busy ones after their response is
            # flushed (every response says Connection: close by now).
            connection.close_when_idle(QUIET)
        if clock.seconds() >= deadline:
            break
        await deferLater(clock, _TICK, lambda: None)
    left = list(factory.connections)
    for connection in left:
        connection.close_now()
    return len(left)
