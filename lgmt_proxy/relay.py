"""Moving one request's bytes: client body to the upstream, upstream answer back.

Both directions stream with backpressure. The client's body goes through
`_BodyProducer`, whose pause/resume pause/resume the client's socket; the
upstream's body is relayed by `_ResponseBody`, whose transport is registered
as the producer of the client request so a slow reader pauses the upstream.

One `IdleTimer` per request (`Relay._idle`) covers waiting for the
upstream's headers and silence on either body: before headers it cancels the
upstream call (504), after them it aborts both connections, so a cut body
never looks complete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import PotentialDataLoss as HTTPPotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from . import errors
from .headers import copy_response_headers
from .routes import Route, upstream_target
from .timers import IdleTimer

if TYPE_CHECKING:
    from .server import ProxyRequest
    from .upstream import Upstream

_NO_BODY_STATUSES = frozenset({204, 304})


@implementer(IBodyProducer, IPushProducer)
class _BodyProducer:
    """The client's request body as the upstream request's `IBodyProducer`.

    Chunks that arrive before the upstream connection is ready are held (and
    the client paused); after that each chunk is written straight through.
    """

    def __init__(self, relay: Relay, length: int | None) -> None:
        self._relay = relay
        self.length = UNKNOWN_LENGTH if length is None else length
        self._consumer: Any = None
        self._pending: list[bytes] = []
        self._done = False
        self._finished: Deferred[None] | None = None

    # IBodyProducer, called by the Agent.
    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        if self._pending:
            pending, self._pending = self._pending, []
            for chunk in pending:
                consumer.write(chunk)
        self._relay.set_client_pause("wait", False)
        if self._done:
            return succeed(None)
        self._finished = Deferred()
        return self._finished

    def pauseProducing(self) -> None:
        self._relay.set_client_pause("upstream", True)

    def resumeProducing(self) -> None:
        self._relay.set_client_pause("upstream", False)

    def stopProducing(self) -> None:
        # The upstream no longer wants the body (it answered early or went away).
        self._consumer = None
        self._done = True
        self._relay.body_unwanted()

    # Fed by the relay.
    def write(self, data: bytes) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.write(data)
        elif not self._done:
            self._pending.append(data)
            self._relay.set_client_pause("wait", True)

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        d, self._finished = self._finished, None
        if d is not None:
            d.callback(None)


class _ResponseBody(Protocol):
    """Relays the upstream's body into the client request."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def connectionMade(self) -> None:
        self._relay.response_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._relay.response_data(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._relay.response_ended(reason)


class Relay:
    """One proxied request, from the first body byte to the last response byte."""

    def __init__(
        self, request: ProxyRequest, route: Route, upstream: Upstream, length: int | None
    ) -> None:
        self.request = request
        self.route = route
        self.upstream = upstream
        self._site = request.site
        self._clock = self._site.clock
        self._timeout = self._site.upstream_timeout
        self._length = length
        self._producer: _BodyProducer | None = None
        self._agent_d: Deferred[IResponse] | None = None
        self._response: IResponse | None = None
        self._body_transport: Any = None
        self._paused: set[str] = set()
        self._timer: IdleTimer | None = None
        self._timed_out = False
        self._done = False  # upstream side finished, one way or another
        self._response_complete = False
        self._client_gone = False

    # -- the client side, driven by ProxyRequest ------------------------------

    def body_chunk(self, data: bytes) -> None:
        if self._agent_d is None:
            self._start()
        self._touch()
        producer = self._producer
        if producer is not None:
            producer.write(data)

    def body_done(self) -> None:
        """The client's request is complete (``requestReceived``)."""
        if self._agent_d is None and not self._done:
            self._start()
        if self._producer is not None:
            self._producer.finish()
        self._touch()
        if self._response_complete:
            self._finish()

    def body_limit(self) -> None:
        """The client's body went past the limit: the upstream must not get it whole."""
        self._abandon_upstream()

    def client_lost(self) -> None:
        """The client went away: cancel or abort the upstream call."""
        self._client_gone = True
        if not self._done:
            self.request.note_error("client_abort")
            self._abandon_upstream()
        self._stop_timer()

    def release(self) -> None:
        """The request is over: drop the references that form cycles
        (Deferred callbacks, producer, body transport) so plain reference
        counting frees them."""
        self._agent_d = None
        self._producer = None
        self._response = None
        self._body_transport = None

    def set_client_pause(self, why: str, paused: bool) -> None:
        channel = getattr(self.request, "channel", None)
        if self._client_gone or channel is None:
            return
        transport = channel.transport
        was = bool(self._paused)
        if paused:
            self._paused.add(why)
        else:
            self._paused.discard(why)
        now = bool(self._paused)
        if now and not was:
            transport.pauseProducing()
        elif was and not now:
            transport.resumeProducing()

    def body_unwanted(self) -> None:
        """The upstream stopped reading the body: let the client finish sending
        (its bytes are discarded) so the answer can be delivered."""
        if self._paused:
            self._paused.clear()
            channel = getattr(self.request, "channel", None)
            if not self._client_gone and channel is not None:
                channel.transport.resumeProducing()

    # -- the upstream call --------------------------------------------------

    def _start(self) -> None:
        request = self.request
        upstream = self.upstream
        length = self._length
        if length is None or length > 0:
            self._producer = _BodyProducer(self, length)
        elif request.requestHeaders.hasHeader(b"content-length") and request.method not in (
            b"GET",
            b"HEAD",
        ):
            self._producer = _BodyProducer(self, 0)
            self._producer.finish()
        headers = upstream.forward_headers(request.requestHeaders, request.channel.client_host)
        target = upstream_target(self.route, upstream.base_path, request.path, request.query)
        self._timer = IdleTimer(self._clock, self._timeout, self._idle)
        d = upstream.request(request.method, target, headers, self._producer)
        self._agent_d = d
        d.addCallbacks(self._got_response, self._upstream_failed)

    def _abandon_upstream(self) -> None:
        if self._done:
            return
        if self._response is None and self._agent_d is not None:
            self._agent_d.cancel()
        elif self._body_transport is not None:
            self._body_transport.stopProducing()
        elif self._agent_d is None:
            self._done = True

    def _got_response(self, response: IResponse) -> None:
        self._response = response
        request = self.request
        self._touch()
        if self._client_gone:
            response.deliverBody(_ResponseBody(self))
            return
        request.setResponseCode(response.code, response.phrase)
        copy_response_headers(response.headers, request.responseHeaders)
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            if response.code not in _NO_BODY_STATUSES:
                request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        elif request.method == b"HEAD":
            cl = response.headers.getRawHeaders(b"content-length")
            if cl:
                request.responseHeaders.setRawHeaders(b"Content-Length", cl[:1])
        response.deliverBody(_ResponseBody(self))

    def _upstream_failed(self, failure: Failure) -> None:
        self._done = True
        self._stop_timer()
        if self._client_gone:
            return
        request = self.request
        name = self.upstream.signal.name
        if request.error_reason == "body_limit":
            return  # the request answers 413 once the client stops sending
        if self._timed_out and not request.received:
            request.respond_error(408, "client stopped sending the request body", name)
            return
        outcome = errors.TIMEOUT if self._timed_out else errors.classify(failure)
        request.note_error(outcome.reason)
        self._site.log_upstream_failure(name, outcome, failure)
        request.respond_error(outcome.status, outcome.message, name)

    # -- the response body --------------------------------------------------

    def response_started(self, transport: Any) -> None:
        self._body_transport = transport
        if self._client_gone:
            transport.stopProducing()
        else:
            self.request.registerProducer(transport, True)

    def response_data(self, data: bytes) -> None:
        self._touch()
        if not self._client_gone:
            self.request.write(data)

    def response_ended(self, reason: Failure) -> None:
        self._done = True
        self._stop_timer()
        self._body_transport = None
        request = self.request
        if self._client_gone:
            return
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss, HTTPPotentialDataLoss):
            self._response_complete = True
            if request.received:
                self._finish()
            return
        # Cut mid-body (or timed out): the client must not see a complete answer.
        if request.error_reason is None:
            request.note_error("timeout" if self._timed_out else "reset")
        request.abort_client()

    def _finish(self) -> None:
        if not self._client_gone and not self.request.finished:
            self.request.finish()

    # -- the idle timer -------------------------------------------------------

    def _touch(self) -> None:
        if self._timer is not None:
            self._timer.touch()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()

    def _idle(self) -> None:
        self._timer = None
        if self._done:
            return
        self._timed_out = True
        if self._response is None:
            assert self._agent_d is not None
            self._agent_d.cancel()
        else:
            self.request.note_error("timeout")
            if self._body_transport is not None:
                self._body_transport.stopProducing()
            self.request.abort_client()
