"""The inbound side of one client connection: its bytes handed to its
`RequestParser` (llhttp, the head limits, each request's facts), the head
deadline and the idle timer (`Timers`), pipelining (one request answered at a
time), the WebSocket hand-over and the ways the connection ends (`close`,
`close_now`, `close_when_idle`, `close_refusing`). What to do with each
request is the `Dispatcher`'s; its response is the `ResponseWriter`'s; every
write goes through the connection's `Sender` and every pause of its reading
through its `ReadGate`.

twisted.web's `HTTPChannel`/`Request` read whole bodies before ``render``,
and together with the Agent cost four fifths of the CPU of a proxied request;
this is a `Protocol` on public Twisted APIs only.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from lgmt_proxy.dataplane.dispatcher import DISCARD_LIMIT, Dispatcher, Shared
from lgmt_proxy.dataplane.exchange import Exchange
from lgmt_proxy.dataplane.parsing import RequestParser
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.dataplane.response import Ending, ResponseWriter
from lgmt_proxy.dataplane.tunnel import Tunnel
from lgmt_proxy.io.reading import Hold, ReadGate
from lgmt_proxy.io.sending import Sender
from lgmt_proxy.rules import errors

_log = Logger(namespace="lgmt_proxy.server")

#: How long a connection lingers after refusing a body it will not read
#: (a declared Content-Length over MAX_REQUEST_BODY_BYTES) before it closes.
LINGER_SECONDS = 2.0
#: Endings whose answer went out before the request's body was in.
_DROP_REST = (Ending.DRAIN, Ending.LINGER)


class Phase(enum.Enum):
    """Where a client connection is in its life."""

    #: Requests parsed and answered in turn.
    OPEN = "open"
    #: A WebSocket handshake is under way upstream: the client's bytes wait
    #: for the tunnel.
    UPGRADING = "upgrading"
    #: Spliced: every byte is the tunnel's.
    TUNNEL = "tunnel"
    #: Nothing more is parsed or answered; the connection is closing.
    CLOSING = "closing"


_OPEN, _UPGRADING, _TUNNEL, _CLOSING = Phase.OPEN, Phase.UPGRADING, Phase.TUNNEL, Phase.CLOSING


class Front(Shared, TypingProtocol):
    """What a client connection reads of its listener (the `ProxyFactory`)."""

    connections: set[Any]
    draining: bool

    @property
    def client_header_timeout(self) -> float: ...

    @property
    def client_idle_timeout(self) -> float: ...


class ClientConnection(Protocol):
    """One client connection: requests in order, one answered at a time."""

    def __init__(self, shared: Front) -> None:
        self.shared = shared
        self.clock = shared.clock
        self.phase = _OPEN
        self._reader = RequestParser(self.clock, self._head_read)
        self._pipelined: deque[Incoming] = deque()
        #: What answers the active request: an exchange or a tunnel.
        self.handler: Exchange | Tunnel | None = None
        #: When the last request ended, and the client last sent a byte.
        self.idle_since = 0.0
        self.last_read = 0.0
        self.timers = Timers(self, shared)
        self.client_text = "unknown"
        self.client_host = b"unknown"
        # Set up once connected:
        self.out: Sender
        self.reading: ReadGate
        self.writer: ResponseWriter
        self.dispatcher: Dispatcher

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        host = getattr(self.transport.getPeer(), "host", None)
        if host and host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack socket
        if host:
            self.client_text = host
            self.client_host = host.encode()
        shared = self.shared
        self.out = shared.sends.install(self)
        self.reading = self.out.reading
        self.writer = ResponseWriter(self, self.out)
        self.dispatcher = Dispatcher(self, shared, self.writer)
        shared.connections.add(self)
        self.idle_since = self.last_read = self.clock.seconds()
        self.timers.start_idle()

    @property
    def idle(self) -> bool:
        """Between requests: nothing being parsed, answered or queued."""
        return self.writer.req is None and self._reader.parsing is None and not self._pipelined

    @property
    def draining(self) -> bool:
        return self.shared.draining

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase is not _OPEN:
            self._not_parsed(phase, data)
            return
        self.last_read = self.clock.seconds()
        reader = self._reader
        try:
            reader.feed(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :] if upgrade.args else b"")
            return
        except httptools.HttpParserError as e:
            self.close_refusing(*reader.refusal_for(e))
            return
        parsing = reader.parsing
        if parsing is not None and parsing.in_head:
            self.timers.head_pending()

    def _not_parsed(self, phase: Phase, data: bytes) -> None:
        """Bytes for the tunnel (before or after the switch), or ignored."""
        tunnel = self.handler
        if phase is _TUNNEL:
            if isinstance(tunnel, Tunnel):
                tunnel.from_client(data)
            return
        self.last_read = self.clock.seconds()
        if phase is _UPGRADING and isinstance(tunnel, Tunnel):
            tunnel.client_bytes(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        phase, self.phase = self.phase, _CLOSING
        self.timers.stop()
        self.out.connection_lost()
        self.dispatcher.close()
        self.shared.connections.discard(self)
        handler, self.handler = self.handler, None
        if isinstance(handler, Tunnel) and phase is _TUNNEL:
            handler.client_lost()
        elif handler is not None:
            handler.cancel()
        writer = self.writer
        active, writer.req = writer.req, None
        if active is not None:
            if not writer.started:
                active.note_error("client_abort")
                active.status = 499
            self._record(active)
        self._pipelined.clear()
        self._reader.parsing = None

    # -- one request after another -------------------------------------------------------

    def _head_read(self, req: Incoming) -> None:
        self.timers.head_done()
        if self.writer.req is None:
            self._answer(req)
        else:
            # Pipelined behind the request being answered: hold it (and stop
            # reading) until that one is done.
            req.buffered = []
            self._pipelined.append(req)
            self.reading.hold(Hold.QUEUED)

    def _answer(self, req: Incoming) -> None:
        # After CONNECT or an upgrade the parser reads no further request.
        last = not req.keep_alive or self.shared.draining or req.upgrade or req.method == b"CONNECT"
        self.writer.begin(req, last)
        self.dispatcher.start(req)

    def request_done(self, req: Incoming) -> None:
        """The response to ``req`` is written: the next request, or the end."""
        writer = self.writer
        ending = writer.ending
        writer.finish()
        self.handler = None
        self._record(req)
        if self.transport is None:
            return
        if not req.complete and ending in _DROP_REST and req.body_in <= DISCARD_LIMIT:
            if ending is Ending.LINGER:
                # A body nobody will read: dropped for a short while only.
                self.timers.linger(LINGER_SECONDS)
            self._drop_rest(req)
            return
        if ending is not Ending.KEEP_ALIVE or not req.complete:
            self.close()
            return
        if self._pipelined:
            self.resume_reading()
            self._answer(self._pipelined.popleft())
            return
        self.idle_since = self.clock.seconds()
        self.resume_reading()

    def _drop_rest(self, req: Incoming) -> None:
        """Answered before the body ended: read the rest and drop it (at
        most `DISCARD_LIMIT`), then close. Closing with unread input would
        reset the connection under the answer."""

        def drop(data: bytes) -> None:
            if req.body_in > DISCARD_LIMIT:
                req.on_body = req.on_complete = None
                self.close()

        req.on_body = drop
        req.on_complete = self.close
        self.resume_reading()

    def _record(self, req: Incoming) -> None:
        self.shared.recorder.finished(req, self.client_text)

    # -- reading -------------------------------------------------------------------------

    def hold_reading(self) -> None:
        """Body bytes wait (for an upstream connection, the WebSocket switch)."""
        self.reading.hold(Hold.WAITING)

    def resume_reading(self, reason: int = Hold.REQUEST) -> None:
        """What held reading for the request (or only ``reason``) is over."""
        if self.phase is not _CLOSING:
            self.reading.release(reason)

    @property
    def body_producer(self) -> ReadGate:
        """The client's gate, to register on the upstream's sender (upload backpressure)."""
        return self.reading

    def pause_body(self) -> None:  # TunnelClient's name (an alias would not compile)
        self.hold_reading()

    # -- WebSocket (TunnelClient, called by Tunnel) -------------------------------------

    def _upgraded(self, rest: bytes) -> None:
        """The parser stopped after a head asking to upgrade (or CONNECT)."""
        if self.phase is not _OPEN:
            return
        if self.writer.req is None:
            # Pipelined behind another request: not served.
            self.close_refusing(400, "upgrade requested while another request is pending")
            return
        tunnel = self.handler
        if isinstance(tunnel, Tunnel):
            self.phase = _UPGRADING
            tunnel.client_bytes(rest)
            return
        # Not a tunnel (refused, or an upgrade we do not offer): no more
        # requests on this connection.
        self.writer.close_after()
        self.phase = _CLOSING

    def tunnel_open(self, tunnel: Tunnel) -> Sender:
        """The upstream switched protocols: every further byte is the
        tunnel's; it writes through this connection's sender."""
        self.phase = _TUNNEL
        self.writer.started = True
        self.timers.stop_idle()
        req = self.writer.req
        if req is not None:
            req.status = 101
        return self.out

    def tunnel_failed(self, status: int, message: str, reason: str | None) -> None:
        req = self.writer.req
        if req is None:
            return
        if reason is not None:
            req.note_error(reason)
        self.handler = None
        self.writer.close_after()
        self.writer.refuse_now(status, message)

    def tunnel_closed(self) -> None:
        """After the switch: the session ended, log it."""
        req, self.writer.req = self.writer.req, None
        if req is not None:
            self._record(req)

    # -- the end: close, close_now, close_when_idle, close_refusing ----------------------

    def _last_phase(self) -> None:
        if self.phase is not _TUNNEL:  # a tunnel's bytes still flow until the close
            self.phase = _CLOSING

    def close(self) -> None:
        """No more requests: close once everything written is sent."""
        self._last_phase()
        self.out.close()

    def close_now(self) -> None:
        """Cut the connection: what was sent must not look complete."""
        self._last_phase()
        self.out.abort()

    def close_when_idle(self, quiet_for: float = 0.0) -> None:
        """Drain: close now if idle for ``quiet_for`` seconds, else after the
        current response. A connection accepted a moment ago, or between two
        requests of a busy client, is likely to carry a request already on
        its way: closing it then would cut that request."""
        if self.idle:
            quiet = self.clock.seconds() - max(self.idle_since, self.last_read)
            if quiet >= quiet_for:
                self.close()
        else:
            self.writer.close_after()

    def close_refusing(self, status: int, message: str) -> None:
        """Refuse input that cannot be framed: answer (if nothing was yet) and
        close. Unlike `ResponseWriter.refuse_now` it needs no parsed request
        (a head that broke a limit has none) and never waits for a body it
        cannot delimit."""
        self.timers.head_done()
        if self.phase is _CLOSING or self.transport is None:
            return
        self.phase = _CLOSING
        writer = self.writer
        active = writer.req
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.cancel()
        if active is not None and writer.started:
            self.close_now()
            return
        answer = errors.error_response(status, message)
        sent = len(errors.json_error(message, "none"))
        if active is None:
            method, path = self._reader.head_so_far()
            self.shared.recorder.refused(
                status, self.client_text, message, method=method, path=path, bytes_out=sent
            )
        else:
            active.status = status
            active.body_out = sent
            active.note_error("malformed")
            writer.req = None
            self._record(active)
        self.out.write(answer)
        self.out.close()


class Timers:
    """A client connection's two timers: the head deadline
    (CLIENT_HEADER_TIMEOUT_SECONDS, armed only for a head that does not
    arrive whole) and the idle timer (CLIENT_IDLE_TIMEOUT_SECONDS: one call
    per connection, re-armed for what is left)."""

    __slots__ = ("_clock", "_conn", "_head", "_head_timeout", "_idle", "_idle_timeout", "_linger")

    def __init__(self, conn: ClientConnection, shared: Front) -> None:
        self._conn = conn
        self._clock = shared.clock
        self._head_timeout = shared.client_header_timeout
        self._idle_timeout = shared.client_idle_timeout
        self._head: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None

    def head_pending(self) -> None:
        """A head is still arriving (most arrive whole: no timer for them)."""
        if self._head is None:
            self._head = self._clock.callLater(self._head_timeout, self._head_timed_out)

    def head_done(self) -> None:
        timer, self._head = self._head, None
        if timer is not None and timer.active():
            timer.cancel()

    def start_idle(self) -> None:
        self._arm_idle(self._idle_timeout)

    def stop_idle(self) -> None:
        timer, self._idle = self._idle, None
        if timer is not None and timer.active():
            timer.cancel()

    def stop(self) -> None:
        self.head_done()
        self.stop_idle()
        timer, self._linger = self._linger, None
        if timer is not None and timer.active():
            timer.cancel()

    def linger(self, seconds: float) -> None:
        """Close the connection in ``seconds`` whatever it is doing then."""
        if self._linger is None:
            self._linger = self._clock.callLater(seconds, self._conn.close)

    def _head_timed_out(self) -> None:
        self._head = None
        self._conn.close_refusing(408, "request head not received in time")

    def _arm_idle(self, seconds: float) -> None:
        self._idle = self._clock.callLater(seconds, self._check_idle)

    def _check_idle(self) -> None:
        """Idle keep-alive connections close after CLIENT_IDLE_TIMEOUT_SECONDS."""
        self._idle = None
        conn = self._conn
        timeout = self._idle_timeout
        writer = conn.writer
        if not conn.idle:
            if conn.handler is None and (writer.req is None or not writer.started):
                # Reading a body only to drop it (a local answer or a refusal
                # waits for it): a client gone silent is not waited for.
                left = conn.last_read + timeout - self._clock.seconds()
                if left <= 0:
                    if writer.req is None:
                        conn.close()  # answered; the rest of the body never came
                    else:
                        conn.close_refusing(408, "request body not received in time")
                    return
                self._arm_idle(left)
                return
            self._arm_idle(timeout)
            return
        now = self._clock.seconds()
        left = max(conn.idle_since, conn.last_read) + timeout - now
        if left > 0:
            self._arm_idle(left)
            return
        out = conn.out
        if out.backed_up:
            # The answer's tail is still unsent: the client gets an idle
            # timeout from the last time it took any bytes, then is cut (a
            # close would wait for it for ever).
            left = out.last_sent + timeout - now
            if left <= 0:
                conn.close_now()
                return
            self._arm_idle(left)
        conn.close()
