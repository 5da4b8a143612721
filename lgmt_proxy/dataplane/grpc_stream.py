"""One OTLP/gRPC call (an HTTP/2 stream) bridged to OTLP/HTTP: its method
mapped to the otlp route's path (`rules.grpc.METHODS`), the same decision as
an HTTP request (`rules.dispatch.decide`: policy, client auth, tenant, rate
limit), then an `Exchange` posting the message as an
``application/x-protobuf`` body, whose answer becomes the gRPC response.

The message streams: its bytes go to the exchange as they arrive, and the
stream's HTTP/2 window is opened again only for bytes the upstream side took
(`GrpcStream.pause_body` while it waits for a connection or its sender is
backed up). The upstream's answer is small (an ``Export*ServiceResponse``)
and is kept whole, up to `MAX_ANSWER`, because a gRPC message needs its
length first.

An uncompressed message is gzip'd on its way up under ``UPSTREAM_COMPRESSION``
exactly as the same POST over HTTP would be (`Upstream.forward`); a message
the client compressed goes up as it came, ``Content-Encoding: gzip``.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from zope.interface import classImplements

from lgmt_proxy.dataplane.dispatcher import Shared
from lgmt_proxy.dataplane.exchange import Exchange
from lgmt_proxy.dataplane.grpc_call import CallRefusal, admit_call, call_refusal, read_headers
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.io.timers import IdleTimer
from lgmt_proxy.limits.budget import Limits, Verdict, budget_refusal
from lgmt_proxy.rules import errors, grpc
from lgmt_proxy.rules.headers import RawHeaders
from lgmt_proxy.rules.routes import Proxied, upstream_target

#: The largest upstream answer turned into a response message.
MAX_ANSWER: Final = 64 * 1024


class StreamOwner(Protocol):
    """What a call asks of its HTTP/2 connection."""

    def answer(self, stream_id: int, message: bytes | None, trailers: RawHeaders) -> None:
        """The response: ``message`` (None: trailers only) then ``trailers``."""

    def reply_status(self, stream_id: int, status: int) -> None:
        """An HTTP status without gRPC (the request was not gRPC)."""

    def open_window(self, stream_id: int, size: int) -> None:
        """The upstream side took ``size`` bytes of this stream."""

    def call_over(self, call: GrpcStream) -> None:
        """The call is answered or gone: forget it."""


def new_exchange(
    side: GrpcStream,
    shared: Shared,
    match: Proxied[Any],
    timer: IdleTimer,
    *,
    length: int,
    gzip: bool,
    client: bytes,
) -> Exchange:
    """The exchange posting the message of ``side``'s call to its OTLP path
    (``gzip``: the message is compressed, and goes as it is)."""
    upstream = match.upstream
    req = side.req
    headers = [*req.headers, (b"content-encoding", b"gzip")] if gzip else req.headers
    target = upstream_target(match.route, upstream.base_path, grpc.METHODS[req.path], None)
    # An uncompressed message is gzip'd on the way up as an OTLP/HTTP body would be.
    headers, req.gzip = upstream.forward(b"POST", target, headers, client, req.tenant, length > 0)
    return Exchange(
        side,
        upstream,
        timer,
        method=b"POST",
        target=target,
        headers=headers,
        length=length,
        chunked=False,
        retry_safe=False,
        log_failure=shared.log_upstream_failure,
        gzip=req.gzip,
    )


class GrpcStream:
    """One unary call: the exchange's `ClientSide` and its body producer."""

    def __init__(
        self, owner: StreamOwner, stream_id: int, shared: Shared, client: str, started: float
    ) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self._shared = shared
        self._client = client
        self.req = req = Incoming(started)
        req.method = b"POST"
        self._reader = grpc.MessageReader()
        self._exchange: Exchange | None = None
        self._timer: IdleTimer | None = None
        self._deadline: IDelayedCall | None = None
        self._proxied: Proxied[Any] | None = None
        self._answer: list[bytes] | None = None
        self._answer_size = 0
        self._retry: int | None = None
        self._gzip = False
        self._paused = False
        self._owed = 0
        #: DATA waiting for the consumer's budgets (None: not waiting).
        self._held: list[tuple[bytes, int]] | None = None
        #: The consumer and byte budget its message's bytes are charged to.
        self._charge: tuple[str, Limits] | None = None
        #: The client sent END_STREAM.
        self.client_done = False
        #: Answered (or gone): nothing more is done for it.
        self.over = False

    # -- the request ----------------------------------------------------------------------

    def begin(self, headers: RawHeaders) -> None:
        """The request's headers: check them, decide, wait for the message."""
        req = self.req
        path, content_type, encoding, timeout, forwarded = read_headers(req, headers)
        if not content_type.startswith(b"application/grpc"):
            self.over = True
            req.status = 415
            self._owner.reply_status(self.stream_id, 415)
            self._finish()
            return
        shared = self._shared
        admitted = admit_call(shared, req, path, encoding, timeout)
        if isinstance(admitted, CallRefusal):
            self._refuse(*admitted)
            return
        match, decision, seconds = admitted
        self._gzip = encoding == b"gzip"
        if seconds is not None:
            # The whole call (UPSTREAM_TIMEOUT_SECONDS still bounds each silence).
            self._deadline = shared.clock.callLater(seconds, self._deadline_passed)
        req.headers = [(b"content-type", b"application/x-protobuf"), *forwarded]
        limits = decision.limits
        if not limits.limited:
            self._admitted(match)
            return
        # Budgets last, as for HTTP: DATA waits for Redis (its window shut).
        name = decision.consumer or ""
        if limits.bytes is not None:
            self._charge = (name, limits)
        verdict = shared.budgets.check(name, limits, None)
        if not isinstance(verdict, Deferred):
            self._budgeted(verdict, match, name, limits)
            return
        self._held = []
        verdict.addCallback(self._budgeted, match, name, limits)  # no closure (mypyc)

    def _budgeted(self, verdict: Verdict, match: Proxied[Any], name: str, limits: Limits) -> None:
        held, self._held = self._held, None
        if not self.over and verdict.allowed:
            self._admitted(match)
        elif not self.over:
            self._charge = None
            self._refuse(*call_refusal(budget_refusal(name, verdict, limits, None)))
        for data, flow_length in held or ():
            self.data(data, flow_length)  # taken, or (refused) only acknowledged
        if held is not None and self.client_done:
            self.client_ended()

    def _admitted(self, match: Proxied[Any]) -> None:
        req = self.req
        req.in_flight = True
        self._shared.recorder.started(req)
        self._proxied = match

    def data(self, data: bytes, flow_length: int) -> None:
        """DATA on this stream; ``flow_length`` counts against the windows,
        acknowledged once the exchange took the bytes (or the call is over:
        every byte is acknowledged once, or the connection's window leaks)."""
        if self._held is not None:  # the budgets are being asked (its window stays shut)
            self._held.append((data, flow_length))
            return
        if not self.over and self._proxied is not None:
            self._take(data)
        if self._paused and not self.over:
            self._owed += flow_length
        elif flow_length:
            self._owner.open_window(self.stream_id, flow_length)

    def _take(self, data: bytes) -> None:
        reader = self._reader
        try:
            piece = reader.feed(data)
        except grpc.FramingError as e:
            self._fail_request(400, grpc.INTERNAL, str(e))
            return
        exchange = self._exchange
        if exchange is None and reader.length is not None:
            exchange = self._start(reader.length, reader.compressed)
            if exchange is None:
                return
        if piece and exchange is not None:
            self.req.body_in += len(piece)
            if self._charge is not None:
                self._shared.budgets.charge(*self._charge, len(piece))
            exchange.body(piece)
        if exchange is not None and reader.done and not self.req.complete:
            self.req.complete = True
            exchange.body_end()

    def client_ended(self) -> None:
        """END_STREAM: the message must be whole by now."""
        self.client_done = True
        if self._held is not None or self.over or self._proxied is None:
            return
        if not self._reader.done:
            self._fail_request(400, grpc.INTERNAL, "the request message is incomplete")

    def reset(self) -> None:
        """The client reset the stream or the connection is gone."""
        if self.over:
            return
        self.over = True
        self.req.note_error("client_abort")
        self._stop()
        self._finish()

    def _start(self, length: int, compressed: bool) -> Exchange | None:
        shared = self._shared
        limit = shared.max_body
        if limit and length > limit:
            self.req.note_error("body_limit")
            self._refuse(413, grpc.RESOURCE_EXHAUSTED, "message larger than the proxy accepts")
            return None
        if compressed and not self._gzip:
            # gRPC: a compressed message needs its grpc-encoding.
            self._fail_request(400, grpc.INTERNAL, "compressed message without grpc-encoding")
            return None
        match = self._proxied
        assert match is not None
        timer = self._timer = IdleTimer(shared.clock, shared.upstream_timeout)
        exchange = self._exchange = new_exchange(
            self, shared, match, timer, length=length, gzip=compressed, client=self._client.encode()
        )
        exchange.start()
        if not length:
            self.req.complete = True
            exchange.body_end()
        return exchange

    # -- ClientSide: the upstream's answer ----------------------------------------------

    def response_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, chunked: bool
    ) -> None:
        req = self.req
        req.status = status
        req.from_upstream = True
        if 200 <= status < 300:
            self._answer = []
        elif status == 429:
            self._retry = grpc.retry_after(headers)

    def response_body(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or self.over:
            return
        self._answer_size += len(data)
        if self._answer_size > MAX_ANSWER:
            self.req.note_error("reset")
            self._stop()
            self._end(grpc.INTERNAL, "upstream answer too large for a response message")
            return
        answer.append(data)

    def response_end(self) -> None:
        if self.over:
            return
        self._exchange = None
        self._stop()
        status = self.req.status
        answer = self._answer
        if answer is not None:
            message = grpc.frame_message(b"".join(answer))
            self.req.body_out = len(message)
            self._end(grpc.OK, "", message=message)
            return
        code = grpc.grpc_status(status)
        retry = self._retry if status == 429 else None
        self._end(code, f"upstream answered {status}", retry=retry)

    def response_failed(self, outcome: errors.Outcome, *, timed_out_body: bool = False) -> None:
        if self.over:
            return
        self._exchange = None
        self._stop()
        req = self.req
        req.from_upstream = False
        req.note_error(outcome.reason)
        if timed_out_body:
            req.status = 408
            self._end(grpc.DEADLINE_EXCEEDED, "client stopped sending the request message")
            return
        req.status = outcome.status
        self._end(grpc.grpc_status(outcome.status), outcome.message)

    def stream_from(self, producer: Any) -> None:
        """The answer is kept (at most `MAX_ANSWER`), so no backpressure on it."""

    def stop_streaming(self) -> None:
        pass

    @property
    def body_producer(self) -> GrpcStream:
        return self

    def pause_body(self) -> None:
        self._paused = True

    def resume_body(self) -> None:
        self._paused = False
        owed, self._owed = self._owed, 0
        if owed:  # over too: the connection's window gets them back
            self._owner.open_window(self.stream_id, owed)

    # -- IPushProducer: the upstream's sender pauses the window --------------------------

    def pauseProducing(self) -> None:
        self.pause_body()

    def resumeProducing(self) -> None:
        self.resume_body()

    def stopProducing(self) -> None:
        self.reset()

    # -- endings ------------------------------------------------------------------------

    def _deadline_passed(self) -> None:
        """The client's deadline: DEADLINE_EXCEEDED, the exchange (if any)
        abandoned, its connection never reused. Logged as 504 (reason
        timeout) once the upstream had the call, else 408."""
        self._deadline = None
        if self.over:
            return
        if self._exchange is not None:
            self.req.note_error("timeout")
        self.req.status = 408 if self._exchange is None else 504
        self._stop()
        self._end(grpc.DEADLINE_EXCEEDED, "deadline exceeded")

    def _refuse(self, status: int, code: int, message: str, retry: int | None = None) -> None:
        """Answered by the proxy itself, nothing forwarded."""
        self.req.status = status
        self._end(code, message, retry=retry)

    def _fail_request(self, status: int, code: int, message: str) -> None:
        self.req.note_error("malformed")
        self._stop()
        self._refuse(status, code, message)

    def _stop(self) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.cancel()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _end(
        self, code: int, text: str, *, message: bytes | None = None, retry: int | None = None
    ) -> None:
        if self.over:
            return
        self.over = True
        self._owner.answer(self.stream_id, message, grpc.trailers(code, text, retry))
        self._finish()

    def _finish(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        held, self._held = self._held, None  # the budgets' answer finds none
        self._owed += sum(length for _, length in held or ())
        self.resume_body()  # what was owed or held is acknowledged, now
        self._shared.recorder.finished(self.req, self._client)
        self._owner.call_over(self)


# Not ``@implementer``: a class decorator keeps mypyc from compiling a native class.
classImplements(GrpcStream, IPushProducer)
