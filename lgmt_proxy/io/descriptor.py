"""A duplicate of a connection's descriptor, watched by the reactor for us.

The connection's own transport is registered with the reactor (for reading,
or paused), and a second registration of the same descriptor would replace
its own: a `Duplicate` (``os.dup``) is a registration of its own, through the
reactor's public ``addReader``/``addWriter``. The sender watches one for room
in the kernel (`sending.Sender`); TLS on the socket reads and writes through
one (`tlswire.WireTLS`, whose OpenSSL connection uses it as its BIO).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import classImplements


def _nothing() -> None:
    """What a duplicate never watched for reading does when readable."""


class Duplicate:
    """One duplicate descriptor and what to call when the reactor finds it
    readable, writable or gone; ``reading`` and ``watching`` (for writing)
    say where it is registered."""

    __slots__ = ("fd", "lost", "name", "read", "reading", "watching", "write")

    def __init__(
        self,
        fd: int,
        *,
        write: Callable[[], None],
        lost: Callable[[], None],
        read: Callable[[], None] = _nothing,
        name: str = "lgmt-proxy sender",
    ) -> None:
        self.fd = fd
        self.read = read
        self.write = write
        self.lost = lost
        self.name = name
        self.reading = False
        self.watching = False

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.read()

    def doWrite(self) -> None:
        self.write()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped the descriptor: an error or hang-up on the
        # socket (a reset from the peer). The transport may not be reading
        # (paused, or closing with a backlog), so it would never see it: the
        # owner cuts the connection.
        self.reading = self.watching = False
        self.lost()

    def logPrefix(self) -> str:
        return self.name

    def close(self) -> None:
        """Close the duplicate (unregistered first by its owner); its
        callbacks are dropped, so nothing refers back to the owner."""
        self.read = self.write = self.lost = _nothing
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


# Not ``@implementer``: a class decorator keeps mypyc from compiling the class
# as a native class (attributes in a dict, methods called as Python objects).
classImplements(Duplicate, IReadWriteDescriptor)


def duplicate(
    sock: socket.socket | None,
    *,
    write: Callable[[], None],
    lost: Callable[[], None],
    read: Callable[[], None] = _nothing,
    name: str = "lgmt-proxy sender",
) -> Duplicate | None:
    """A `Duplicate` of ``sock``'s descriptor, or None if none is left (EMFILE)."""
    if sock is None:
        return None
    try:
        fd = os.dup(sock.fileno())
    except OSError:
        return None
    return Duplicate(fd, write=write, lost=lost, read=read, name=name)


__all__ = ["Duplicate", "duplicate"]
