"""Graceful shutdown: stop taking work without dropping any that was taken.

Waiting for requests to finish is not enough (the last response may still sit
in the write buffer when the reactor stops); this waits for the connections
themselves to close.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from .server import ProxySite

_TICK = 0.05


async def drain_connections(site: ProxySite, clock: IReactorTime, grace: float) -> int:
    """Close idle keep-alive connections, let busy ones finish their response
    and close, and abort what is left after ``grace`` seconds. Returns how many
    connections had to be aborted."""
    deadline = clock.seconds() + grace
    while site.connections:
        for channel in list(site.connections):
            if channel.idle:
                channel.loseConnection()
            else:
                # Closes after this response is flushed, instead of waiting
                # for another request.
                channel.persistent = False
        if clock.seconds() >= deadline:
            break
        await deferLater(clock, _TICK, lambda: None)
    left = list(site.connections)
    for channel in left:
        transport: Any = channel.transport
        transport.abortConnection()
    return len(left)
