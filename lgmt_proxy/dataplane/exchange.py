"""One proxied request on the upstream side: a pooled connection, the request
head written once, the body streamed with backpressure, the response handed
back to the client side as it arrives.

The client side is reached only through `ClientSide` (what a response needs),
and reaches the exchange only through its public methods; neither reads the
other's attributes.

One `IdleTimer` covers waiting for a connection, for the response head and
silence on either body: before the head it answers 504 (408 when the client
stopped sending its body), after it both connections are cut.

A body goes up as it came (the client's ``Content-Length``), re-chunked, or
gzip'd chunk by chunk (`Gzip`, ``UPSTREAM_COMPRESSION``: chunked, since its
length is known only at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from lgmt_proxy.dataplane.pool import UpstreamConnection
from lgmt_proxy.dataplane.upstream import Upstream
from lgmt_proxy.io.compress import LAST_CHUNK, Gzip
from lgmt_proxy.io.timers import IdleTimer
from lgmt_proxy.rules import errors
from lgmt_proxy.rules.headers import RawHeaders, head_lines


class ClientSide(Protocol):
    """What the exchange asks of the client connection it answers."""

    def response_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, chunked: bool
    ) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def response_failed(self, outcome: errors.Outcome, *, timed_out_body: bool = False) -> None: ...

    def stream_from(self, producer: Any) -> None: ...

    def stop_streaming(self) -> None: ...

    @property
    def body_producer(self) -> Any: ...

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...


class Exchange:
    """One request through one upstream connection (or two: a reused
    connection that drops before answering a request safe to repeat is
    replaced once by a fresh one)."""

    def __init__(
        self,
        client: ClientSide,
        upstream: Upstream,
        timer: IdleTimer,
        *,
        method: bytes,
        target: bytes,
        headers: RawHeaders,
        length: int | None,
        chunked: bool,
        retry_safe: bool,
        log_failure: Callable[[str, errors.Outcome, Failure], None],
        gzip: Gzip | None = None,
    ) -> None:
        """``gzip``: the body's compressor (its headers say so already)."""
        self._client = client
        self._upstream = upstream
        #: The client connection's, reused request after request.
        self._idle_timer = timer
        self._method = method
        self._retry_safe = retry_safe
        self._log_failure = log_failure
        # Body framing towards the upstream: the client's length, else chunked.
        self._gzip = gzip
        self._chunked = chunked = chunked or gzip is not None
        if chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif length is not None and (length or method not in (b"GET", b"HEAD")):
            framing = b"Content-Length: %d\r\n" % length
        else:
            framing = b""
        self._head = b"%s %s HTTP/1.1\r\n%s%s\r\n" % (method, target, head_lines(headers), framing)
        self._conn: UpstreamConnection | None = None
        self._connecting: Deferred[UpstreamConnection] | None = None
        self._pending: list[bytes] | None = []
        self._body_done = False
        self._body_sent = False
        self._producing = False
        self._answered = False
        self._over = False
        self._retried = False
        self._timed_out = False
        self._timer: IdleTimer | None = None

    # -- driven by the client side ------------------------------------------------------

    def start(self) -> None:
        self._timer = timer = self._idle_timer
        timer.start(self._idle)
        conn = self._upstream.pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self._connect()

    def body(self, data: bytes) -> None:
        """A chunk of the client's body (already de-chunked)."""
        timer = self._timer
        if timer is not None:
            timer.touch()
        conn = self._conn
        if conn is None:
            pending = self._pending
            if pending is not None:
                pending.append(data)
                self._client.pause_body()
            return
        data = self._frame(data)
        if data:
            conn.write(data)

    def _frame(self, data: bytes) -> bytes:
        """A chunk of the client's body as the upstream gets it."""
        gzip = self._gzip
        if gzip is not None:
            return gzip.chunk(data)
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def body_end(self) -> None:
        """The client's request is complete."""
        self._body_done = True
        conn = self._conn
        if conn is not None and not self._body_sent:
            self._finish_body(conn)

    def cancel(self) -> None:
        """The client went away, or the request must not reach the upstream
        whole (body over the limit): release or abort at whatever stage."""
        if self._over:
            return
        self._end()
        self._let_go()

    def _let_go(self) -> None:
        """Stop connecting, or abort the connection mid-exchange."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.detach()

    # -- the connection -------------------------------------------------------------------

    def _connect(self) -> None:
        d = self._upstream.pool.connect()
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._connecting = None
        if self._over:
            self._upstream.pool.release(conn)
            return
        self._attach(conn)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._over:
            return
        if self._timed_out:
            outcome = errors.TIMEOUT
        else:
            outcome = errors.classify(failure)
        self._fail(outcome, failure)

    def _attach(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        conn.attach(self, head_only=self._method == b"HEAD")
        pending, self._pending = self._pending, None
        body = b"".join([self._frame(p) for p in pending]) if pending else b""
        conn.write(self._head + body if body else self._head)
        if self._body_done:
            self._finish_body(conn)
        else:
            # Upload backpressure: a slow upstream pauses the client's socket.
            assert conn.sender is not None
            conn.sender.register_producer(self._client.body_producer)
            self._producing = True
            if pending:
                self._client.resume_body()

    def _finish_body(self, conn: UpstreamConnection) -> None:
        self._body_sent = True
        if self._gzip is not None:
            conn.write(self._gzip.end())
        elif self._chunked:
            conn.write(LAST_CHUNK)
        self._stop_producing(conn)

    def _stop_producing(self, conn: UpstreamConnection) -> None:
        if self._producing:
            self._producing = False
            if conn.sender is not None:
                conn.sender.unregister_producer()

    # -- the response (ResponseSink, called by the connection) --------------------------

    def response_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, chunked: bool
    ) -> None:
        self._answered = True
        timer = self._timer
        if timer is not None:
            timer.touch()
        self._client.response_head(status, reason, headers, length, chunked)
        conn = self._conn
        if conn is not None and conn.sender is not None and not conn.head_only:
            self._client.stream_from(conn.reading)

    def response_body(self, data: bytes) -> None:
        timer = self._timer
        if timer is not None:
            timer.touch()
        self._client.response_body(data)

    def response_end(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._stop_producing(conn)
            if not self._body_sent:
                conn.body_unsent()
        self._end()
        self._client.stop_streaming()
        self._client.response_end()

    def upstream_lost(self, reason: Failure, answered: bool) -> None:
        conn, self._conn = self._conn, None
        if self._over:
            return
        if conn is not None:
            self._stop_producing(conn)
        if (
            not answered
            and conn is not None
            and conn.reused
            and not conn.got_bytes
            and self._retry_safe
            and not self._retried
        ):
            # A kept-alive connection the upstream had closed: once more, fresh.
            self._retried = True
            self._pending = []
            self._body_sent = False
            self._connect()
            return
        if answered:
            self._end()
            self._client.stop_streaming()
            self._client.response_failed(errors.Outcome(502, "reset", "upstream body cut"))
            return
        outcome = errors.TIMEOUT if self._timed_out else errors.classify(reason)
        self._fail(outcome, reason)

    # -- endings ----------------------------------------------------------------------------

    def _fail(self, outcome: errors.Outcome, failure: Failure) -> None:
        self._end()
        if not failure.check(CancelledError) or self._timed_out:
            self._log_failure(self._upstream.config.name, outcome, failure)
        self._client.response_failed(outcome)

    def _end(self) -> None:
        self._over = True
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()

    def _idle(self) -> None:
        self._timer = None
        if self._over:
            return
        self._timed_out = True
        # 408 when the client stopped sending; 504 when the upstream side
        # held it up: still connecting (the body waits, the client paused) or
        # not reading what was sent (known for plain sockets).
        conn = self._conn
        upstream_stalled = conn is None or (conn.sender is not None and conn.sender.backed_up)
        body_stalled = not self._body_done and not upstream_stalled
        answered = self._answered
        self._end()
        self._let_go()
        self._client.stop_streaming()
        if answered:
            self._client.response_failed(errors.TIMEOUT)
        else:
            self._client.response_failed(errors.TIMEOUT, timed_out_body=body_stalled)
