"""The one owner of pausing a connection's reading.

Reading stops for several reasons at once: a pipelined request waits its
turn, a request body waits for its upstream connection or a WebSocket
switch, the peer the bytes are relayed to is not taking them (its sender's
backlog, or a TLS transport's buffer), the connection is closing. A
`ReadGate` pauses the transport when the first reason arrives and resumes it
only when none is left, so one party letting go can never resume reading
another still needs paused.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.interfaces import IPushProducer
from zope.interface import classImplements


class Hold:
    """Why reading is paused (bits; several may hold at once)."""

    #: A request waits its turn behind the one being answered (pipelining).
    QUEUED: Final = 1
    #: Body bytes wait for an upstream connection or the WebSocket switch.
    WAITING: Final = 2
    #: The peer these bytes go to is not taking them (`IPushProducer` pause).
    BACKLOG: Final = 4
    #: The connection is closing: nothing more is read.
    CLOSING: Final = 8
    #: Held for one request: let go once it is answered.
    REQUEST: Final = QUEUED | WAITING


class ReadGate:
    """Pauses one transport's reading for named reasons (see `Hold`). As an
    `IPushProducer` it is what a peer's sender (or a TLS transport) pauses
    when this connection's bytes back up there: reason `Hold.BACKLOG`."""

    __slots__ = ("_transport", "held")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        #: The reasons holding reading paused (0: reading).
        self.held = 0

    def hold(self, reason: int) -> None:
        held = self.held
        self.held = held | reason
        if not held:
            self._transport.pauseProducing()

    def release(self, reason: int) -> None:
        held = self.held
        if held & reason:
            held = self.held = held & ~reason
            if not held:
                self._transport.resumeProducing()

    # -- IPushProducer, for the peer this connection's bytes go to ----------------------

    def pauseProducing(self) -> None:
        self.hold(Hold.BACKLOG)

    def resumeProducing(self) -> None:
        self.release(Hold.BACKLOG)

    def stopProducing(self) -> None:
        """The consumer is gone (Twisted tells a registered producer so)."""
        self._transport.stopProducing()


# Not ``@implementer``: a class decorator keeps mypyc from compiling the class
# as a native class (attributes in a dict, methods called as Python objects).
classImplements(ReadGate, IPushProducer)
