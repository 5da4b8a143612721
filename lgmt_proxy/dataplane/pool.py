"""Upstream connections: one HTTP/1.1 client protocol parsed by llhttp
(httptools), and a pool of them per upstream.

A connection carries one exchange at a time. It is handed to the next request
only when the previous response ended cleanly, the request was sent whole and
nothing arrived since; the most recently used idle connection goes first, and
connections idle longer than the pool's idle timeout are closed. A connection
that receives bytes while idle is closed: those bytes answer nothing.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from lgmt_proxy.io.reading import Hold, ReadGate
from lgmt_proxy.io.sending import Sender, SendQueue
from lgmt_proxy.rules.errors import InvalidResponse
from lgmt_proxy.rules.headers import RawHeaders

_log = Logger(namespace="lgmt_proxy.pool")

#: Idle upstream connections kept per upstream; more are closed on release.
MAX_IDLE = 256


class ResponseSink(TypingProtocol):
    """What a connection reports to the exchange it carries."""

    def response_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, chunked: bool
    ) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def upstream_lost(self, reason: Failure, answered: bool) -> None: ...


class UpstreamConnection(Protocol):
    """One connection to an upstream, TLS or not, speaking HTTP/1.1."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.sink: ResponseSink | None = None
        #: Fires with this connection once it can carry a request (after the
        #: TLS handshake for https), or fails.
        self.ready: Deferred[UpstreamConnection] | None = None
        self.connected_at_tcp = False
        self.reused = False
        self.idle_since = 0.0
        self.head_only = False
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._headers: RawHeaders = []
        self._in_head = True
        self._answered = False
        self._complete = False
        self._dirty = False
        self._close_delimited = False
        self.closed = False
        self.got_bytes = False
        self.sender: Sender | None = None

    # -- connecting -------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_at_tcp = True
        self.sender = self.pool.sends.install(self)
        if not self.pool.tls:
            self._became_ready()

    def handshakeCompleted(self) -> None:
        self._became_ready()

    def _became_ready(self) -> None:
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.callback(self)

    # -- one exchange -------------------------------------------------------------

    def attach(self, sink: ResponseSink, head_only: bool) -> None:
        """Carry one exchange: the response goes to ``sink``."""
        self.sink = sink
        self.head_only = head_only
        self._answered = False
        self._complete = False
        self._in_head = True
        self._headers = []
        self._reason = b""
        self.got_bytes = False

    def detach(self) -> None:
        """The exchange let go before its response ended: never reuse this."""
        self.sink = None
        self.abort()

    def write(self, data: bytes) -> None:
        assert self.sender is not None
        self.sender.write(data)

    @property
    def reading(self) -> ReadGate:
        """The one owner of pausing this connection's reading (the producer
        of a response the client side streams)."""
        assert self.sender is not None
        return self.sender.reading

    def abort(self) -> None:
        if not self.closed and self.sender is not None:
            self.closed = True
            self.sender.abort()

    def close(self) -> None:
        """Close once what was written is sent."""
        self.closed = True
        if self.sender is not None:
            self.sender.close()

    def reusable(self) -> bool:
        return self._complete and not self._dirty and not self.closed

    def body_unsent(self) -> None:
        """The request body was not sent whole: the connection cannot be reused."""
        self._dirty = True

    # -- bytes from the upstream ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.sink is None:
            # Nothing was asked: a stray answer or a half-closed peer.
            self.pool.forget(self)
            self.abort()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__
            if cause is not None and not isinstance(cause, InvalidResponse):
                _log.failure("error relaying a response", Failure(cause))
            self._failed_parse()
        except httptools.HttpParserUpgrade:
            self._failed_parse()

    def _failed_parse(self) -> None:
        self._dirty = True
        sink = self.sink
        self.sink = None
        self.abort()
        if sink is not None:
            sink.upstream_lost(Failure(InvalidResponse()), self._answered)

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # Interim (1xx) answers are not relayed; 101 is only for tunnels.
            if status == 101 or status < 100:
                raise InvalidResponse()
            self._headers = []
            self._reason = b""
            return
        if status > 599:
            raise InvalidResponse()
        self._in_head = False
        self._answered = True
        length: int | None = None
        chunked = False
        for name, value in self._headers:
            low = name.lower()
            if low == b"content-length":
                length = int(value)
            elif low == b"transfer-encoding":
                # Chunked only when it is the last coding (llhttp frames it so).
                chunked = value.rstrip().lower().endswith(b"chunked")
        if self.head_only or status in (204, 304):
            self._close_delimited = False
        else:
            self._close_delimited = length is None and not chunked
        if not self._parser.should_keep_alive() or self._close_delimited:
            self._dirty = True
        sink = self.sink
        if sink is None:
            raise InvalidResponse()  # a response nobody asked for
        sink.response_head(status, self._reason, self._headers, length, chunked)
        if self.head_only:
            # llhttp cannot be told the request was HEAD: the response ends
            # here, and a fresh parser reads the next one.
            self._parser = httptools.HttpResponseParser(self)
            self._complete_response()

    def on_body(self, data: bytes) -> None:
        sink = self.sink
        if self.head_only or sink is None:
            # Bytes after a HEAD answer: out of step, never reused.
            self._dirty = True
            self.pool.forget(self)
            self.abort()
            return
        sink.response_body(data)

    def on_message_complete(self) -> None:
        if self._in_head:
            return  # an interim 1xx answer ended
        if not self.head_only:
            self._complete_response()

    def _complete_response(self) -> None:
        sink = self.sink
        if sink is None or self._complete:
            return
        self._complete = True
        self.sink = None
        sink.response_end()
        self.pool.release(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.sender is not None:
            self.sender.connection_lost()
        self.pool.forget(self)
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.errback(reason)
            return
        sink = self.sink
        if sink is None:
            return
        if self._close_delimited and reason.check(ConnectionDone):
            # A body delimited by the close ended cleanly.
            self._complete = True
            self.sink = None
            sink.response_end()
            return
        self.sink = None
        sink.upstream_lost(reason, self._answered)


# Not ``@implementer``: a class decorator keeps mypyc from compiling the class
# as a native class (attributes in a dict, methods called as Python objects).
classImplements(UpstreamConnection, IHandshakeListener)


class _OneConnection(Factory):
    """Builds the one protocol instance a connect attempt was made for."""

    noisy = False

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return self._connection


class UpstreamPool:
    """Persistent connections to one upstream, most recently used first."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        tls: bool,
        connect_timeout: float,
        idle_timeout: float,
        max_idle: int = MAX_IDLE,
        sends: SendQueue | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.sends = sends if sends is not None else SendQueue(clock)
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.idle: list[UpstreamConnection] = []
        self._sweep: IDelayedCall | None = None

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still fresh, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if self.clock.seconds() - conn.idle_since >= self.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    def connect(self) -> Deferred[UpstreamConnection]:
        """A new connection, ready to carry a request within the connect timeout
        (TCP and TLS handshake both); cancelling it aborts the attempt."""
        return _Attempt(self).ready

    def release(self, conn: UpstreamConnection) -> None:
        """An exchange ended on ``conn``: keep it for the next, or close it."""
        if not conn.reusable() or len(self.idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = self.clock.seconds()
        if conn.sender is not None:
            # Read while idle (stray bytes, the close), even if a slow client
            # paused it at the end of the last response.
            conn.sender.reading.release(Hold.BACKLOG)
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle_timeout, self._sweep_idle)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.clock.seconds()
        keep = []
        for conn in self.idle:
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            self._sweep = self.clock.callLater(
                max(0.01, oldest + self.idle_timeout - now), self._sweep_idle
            )

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        sweep, self._sweep = self._sweep, None
        if sweep is not None and sweep.active():
            sweep.cancel()
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.abort()


class _Attempt:
    """One connect attempt: TCP, then TLS when the upstream is https, all
    within the pool's connect timeout. ``ready`` fires with the connection;
    cancelling it (the client left) aborts whatever stage it is in."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.conn = conn = UpstreamConnection(pool)
        self.timed_out = False
        self.ready: Deferred[UpstreamConnection] = Deferred(self._cancel)
        conn.ready = self.ready
        self.timer: IDelayedCall | None = None
        self.connecting = pool.endpoint.connect(_OneConnection(conn))
        self.connecting.addErrback(self._connect_failed)
        if not self.ready.called:
            self.timer = pool.clock.callLater(pool.connect_timeout, self._expire)
        self.ready.addBoth(self._settled)

    def _settled(self, result: Any) -> Any:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return result

    def _connect_failed(self, failure: Failure) -> None:
        if self.conn.ready is not None:
            self.conn.ready = None
            if self.timed_out:
                failure = Failure(TimeoutError())
            self.ready.errback(failure)

    def _expire(self) -> None:
        self.timer = None
        self.timed_out = True
        self.ready.cancel()

    def _cancel(self, ready: Deferred[UpstreamConnection]) -> None:
        conn = self.conn
        if conn.connected_at_tcp:
            # Mid-handshake: abort; connectionLost no longer reaches ``ready``.
            conn.ready = None
            conn.abort()
            ready.errback(Failure(TimeoutError() if self.timed_out else CancelledError()))
        else:
            self.connecting.cancel()
