"""The response side of one client connection: one `ResponseWriter` per
connection, begun again for each request. It implements `ClientSide` (what an
`Exchange` calls: head, body, end, failure, streaming), renders local answers
and JSON refusals, frames the body (Content-Length, chunked, or the close on
HTTP/1.0) and decides the ``Connection`` line; every head goes through
`errors.format_head`.

It reaches its connection only through `Inbound`, and writes only through
the connection's `Sender`.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.io.reading import Hold
from lgmt_proxy.io.sending import Sender
from lgmt_proxy.rules import errors
from lgmt_proxy.rules.headers import RawHeaders, response_lines

_log = Logger(namespace="lgmt_proxy.server")


class Ending(enum.Enum):
    """What follows the response being written."""

    #: The connection carries the next request.
    KEEP_ALIVE = "keep-alive"
    #: The connection closes once the response is sent.
    CLOSE = "close"
    #: The answer went out before the request's body ended: the rest is read
    #: and dropped, then the connection closes (closing with unread input
    #: would reset it under the answer).
    DRAIN = "drain"
    #: The answer refused a body it will not read (a declared length over
    #: the limit): what still comes is dropped for a short while only, then
    #: the connection closes (nginx's lingering close), so the client reads
    #: the answer instead of a reset and is not read for long.
    LINGER = "linger"


class Inbound(Protocol):
    """What the writer asks of the client connection it writes for."""

    handler: Any

    @property
    def draining(self) -> bool:
        """From SIGTERM on: every response says ``Connection: close``."""

    @property
    def body_producer(self) -> Any: ...

    def request_done(self, req: Incoming) -> None: ...

    def close_now(self) -> None: ...

    def hold_reading(self) -> None: ...

    def resume_reading(self, reason: int = Hold.REQUEST) -> None: ...


class LocalRequest:
    """The part of twisted.web's request a local resource (/health, /ready,
    /metrics, a JSON 404) uses to render itself."""

    def __init__(self, incoming: Incoming) -> None:
        self.method = incoming.method
        self.uri = incoming.target
        self.path = incoming.path
        self.prepath: list[bytes] = []
        self.postpath: list[bytes] = []
        self.requestHeaders = Headers()
        for name, value in incoming.headers:
            self.requestHeaders.addRawHeader(name, value)
        self.responseHeaders = Headers()
        self.code = 200
        self.code_message: bytes | None = None

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])


class ResponseWriter:
    """The response to the connection's active request (``req``); see the
    module docstring."""

    __slots__ = ("_conn", "_streaming", "chunked", "ending", "out", "req", "started")

    def __init__(self, conn: Inbound, out: Sender) -> None:
        self._conn = conn
        self.out = out
        #: The request being answered; None between requests.
        self.req: Incoming | None = None
        #: The head went out: a failure now cuts the connection.
        self.started = False
        #: The body is chunked by us (the upstream's had no length, HTTP/1.1).
        self.chunked = False
        self.ending = Ending.KEEP_ALIVE
        self._streaming: Any = None

    def begin(self, req: Incoming, close: bool) -> None:
        """Answer ``req`` next; ``close``: it is the connection's last."""
        self.req = req
        self.started = False
        self.chunked = False
        self.ending = Ending.CLOSE if close else Ending.KEEP_ALIVE

    def close_after(self) -> None:
        """This response is the connection's last."""
        if self.ending is Ending.KEEP_ALIVE:
            self.ending = Ending.CLOSE

    def linger_after(self) -> None:
        """This response is the connection's last, and the request's body
        will not be read: the connection lingers briefly, then closes."""
        self.ending = Ending.LINGER

    def finish(self) -> Incoming | None:
        """The request is over (answered, or the connection lost): stop
        streaming and forget it; returns it."""
        self.stop_streaming()
        req, self.req = self.req, None
        return req

    def _connection_line(self, req: Incoming) -> bytes:
        """The ``Connection`` line of a response head, decided as the head
        goes out: from SIGTERM on every response says close, whenever its
        request came in, so clients move to other pods during the delay."""
        if self._conn.draining:
            self.close_after()
        if self.ending is not Ending.KEEP_ALIVE:
            return b"Connection: close\r\n"
        if req.version == "1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    # -- ClientSide: the response of a proxied request (called by Exchange) ---------

    def response_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, chunked: bool
    ) -> None:
        req = self.req
        if req is None:
            return
        req.status = status
        req.from_upstream = True
        framing = b""
        self.chunked = False
        if req.method == b"HEAD" or status in (204, 304):
            if req.method == b"HEAD" and status not in (204, 304) and length is not None:
                framing = b"Content-Length: %d\r\n" % length
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif req.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            self.chunked = True
        else:
            self.close_after()  # HTTP/1.0: the close ends the body
        if not req.complete:
            # The upstream answered before the client finished sending.
            self.ending = Ending.DRAIN
        framing += self._connection_line(req)
        self.started = True
        self.out.write(errors.format_head(status, reason, response_lines(headers), framing))

    def response_body(self, data: bytes) -> None:
        req = self.req
        if req is None:
            return
        req.body_out += len(data)
        out = self.out
        if self.chunked:
            out.write(b"%x\r\n" % len(data))
            out.write(data)
            out.write(b"\r\n")
        else:
            out.write(data)

    def response_end(self) -> None:
        req = self.req
        if req is None:
            return
        self._conn.handler = None
        if self.chunked:
            self.out.write(b"0\r\n\r\n")
        self._conn.request_done(req)

    def response_failed(self, outcome: errors.Outcome, *, timed_out_body: bool = False) -> None:
        """The upstream side failed: a JSON error before the head, else the
        connection is cut so the body never looks complete."""
        req = self.req
        if req is None:
            return
        self._conn.handler = None
        req.note_error(outcome.reason)
        if self.started:
            self._conn.close_now()
            return
        if timed_out_body:
            self.refuse_now(408, "client stopped sending the request body")
            return
        self.refuse_now(outcome.status, outcome.message)

    def stream_from(self, producer: Any) -> None:
        """The upstream's `ReadGate` produces the response: a slow client pauses it."""
        self._streaming = producer
        self.out.register_producer(producer)

    def stop_streaming(self) -> None:
        if self._streaming is not None:
            self._streaming = None
            self.out.unregister_producer()

    @property
    def body_producer(self) -> Any:
        """The client's `ReadGate`, to register on the upstream's sender (upload backpressure)."""
        return self._conn.body_producer

    def pause_body(self) -> None:
        self._conn.hold_reading()

    def resume_body(self) -> None:
        """The body the exchange held is on its way: read on (a pipelined
        request still waiting keeps reading paused)."""
        self._conn.resume_reading(Hold.WAITING)

    # -- answers of our own -------------------------------------------------------------

    def refuse_now(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Refuse the active request with a JSON error now (the connection
        closes after unless the body is in); after the response head, cut
        the connection instead."""
        req = self.req
        if req is None:
            return
        if self.started:
            self._conn.close_now()
            return
        if not req.complete or self._conn.draining:
            self.close_after()
        req.status = status
        body = errors.error_response(
            status,
            message,
            req.upstream_name,
            close=self.ending is not Ending.KEEP_ALIVE,
            headers=headers or [],
            head_only=req.method == b"HEAD",
        )
        self.started = True
        head_only = req.method == b"HEAD"
        req.body_out = 0 if head_only else len(errors.json_error(message, req.upstream_name))
        self.out.write(body)
        self._conn.request_done(req)

    def render_local(self, req: Incoming, resource: IResource) -> None:
        """Answer ``req`` from a local resource (its body is in)."""
        if self.req is not req:
            return
        local = LocalRequest(req)
        try:
            body = resource.render(local)  # type: ignore[arg-type]
            if not isinstance(body, bytes):
                raise TypeError("a local resource must render bytes")
        except Exception:
            _log.failure("error rendering {path}", Failure(), path=req.path.decode("latin-1"))
            self.refuse_now(500, "internal error")
            return
        req.status = local.code
        lines = b"".join(
            n + b": " + v + b"\r\n"
            for n, vs in local.responseHeaders.getAllRawHeaders()
            for v in vs
        )
        head = errors.format_head(
            local.code, local.code_message or b"", lines, self._connection_line(req)
        )
        self.started = True
        if req.method == b"HEAD":
            self.out.write(head)
        else:
            req.body_out = len(body)
            self.out.write(head + body)
        self._conn.request_done(req)
