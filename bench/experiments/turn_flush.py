"""Experiment: flush TCP writes once at the end of the reactor turn.

Twisted's ``FileDescriptor.write`` registers the socket for EPOLLOUT
(``startWriting``: an ``epoll_ctl``) on every write, the reactor calls
``doWrite`` on the next iteration, and ``stopWriting`` unregisters it again
(another ``epoll_ctl``): per proxied request that is four ``epoll_ctl`` calls
(client and upstream side) and extra reactor iterations. Here a write only
queues the connection; one ``callLater(0)`` per turn sends every queued
buffer (all writes of the turn still go out in one ``send``), and only a
send that does not complete falls back to EPOLLOUT.

A real change would live in a `tcp.Server`/`tcp.Client` subclass used by the
proxy's own listener and endpoint (not a global patch); TLS transports need
the same at their layer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.abstract import _dataMustBeBytes

_queue: list[Any] = []
_scheduled = [False]


def _flush() -> None:
    _scheduled[0] = False
    connections = list(_queue)
    del _queue[:]
    for c in connections:
        c._turn_queued = False
        if not c.connected or c.disconnecting or c._writeDisconnected:
            if c.connected and (c.dataBuffer or c._tempDataBuffer):
                c.startWriting()  # closing: the normal path
            continue
        why = c.doWrite()
        if why:
            reactor._disconnectSelectable(c, why, False)  # type: ignore[attr-defined]
        elif c.connected and (len(c.dataBuffer) - c.offset or c._tempDataLen):
            c.startWriting()  # the socket buffer is full: wait for EPOLLOUT


def _enqueue(c: Any) -> None:
    if getattr(c, "_turn_queued", False):
        return
    c._turn_queued = True
    _queue.append(c)
    if not _scheduled[0]:
        _scheduled[0] = True
        reactor.callLater(0, _flush)  # type: ignore[attr-defined]


def write(self: Any, data: bytes) -> None:
    _dataMustBeBytes(data)
    if not self.connected or self._writeDisconnected:
        return
    if data:
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        self._maybePauseProducer()
        _enqueue(self)


def writeSequence(self: Any, iovec: list[bytes]) -> None:
    for i in iovec:
        _dataMustBeBytes(i)
    if not self.connected or not iovec or self._writeDisconnected:
        return
    self._tempDataBuffer.extend(iovec)
    for i in iovec:
        self._tempDataLen += len(i)
    self._maybePauseProducer()
    _enqueue(self)


tcp.Connection.write = write  # type: ignore[method-assign]
tcp.Connection.writeSequence = writeSequence  # type: ignore[method-assign]

import sys as _sys  # noqa: E402

print(f"bench experiment {__name__} loaded", file=_sys.stderr)
