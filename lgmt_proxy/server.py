"""The HTTP server side: a `Site` whose channel refuses hostile input and whose
request starts the upstream call as soon as the head is in.

`twisted.web.server.Request` reads the whole body before ``render`` runs; the
`ProxyRequest` here instead routes in ``gotLength`` (headers parsed) and feeds
each body chunk to its `Relay` as it is decoded. Requests for the operations
resources take the ordinary ``process``/``render`` path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource, getChildForRequest

from . import errors
from .relay import Relay
from .routes import MAX_TARGET, Refusal, split_target
from .tunnel import Tunnel, wants_websocket

if TYPE_CHECKING:
    from .clientauth import ClientAuth
    from .observe import Observer

_CHALLENGE = [(b"WWW-Authenticate", b'Bearer realm="lgmt-proxy", Basic realm="lgmt-proxy"')]

#: Bytes of an unwanted request body (refused, or sent to /health) read and
#: thrown away before the connection is closed instead.
DISCARD_LIMIT = 64 * 1024 * 1024

_log = Logger(namespace="lgmt_proxy.server")

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def _raw_response(status: int, message: str, upstream: str = "none") -> bytes:
    body = errors.json_error(message, upstream)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, _REASONS.get(status, b"Error"), len(body), body)
    )


def _ignore(*args: object) -> None:
    """Input after a refusal is dropped unread."""


class _DiscardContent:
    """``Request.content`` for requests whose body nobody reads."""

    def write(self, data: bytes) -> None:
        pass

    def read(self, n: int = -1) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class ProxyRequest(server.Request):
    """A request that routes itself once its head is parsed."""

    defaultContentType = None
    channel: ProxyChannel
    site: ProxySite

    def __init__(self, channel: ProxyChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.site = channel.site
        self.channel_client = channel.client_text
        self.in_flight = False
        self.started = channel.site.clock.seconds()
        self.upstream_name = "none"
        self.error_reason: str | None = None
        self.received = False
        self.query: bytes | None = None
        self.body_in = 0
        self._relay: Relay | None = None
        self._tunnel: Tunnel | None = None
        self._resource: IResource | None = None
        self._early: tuple[int, str, list[tuple[bytes, bytes]]] | None = None
        self.consumer: str | None = None
        self._answered = False
        self._observed = False
        self.content = None

    # -- called by the channel ------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        self.method = method = channel._command
        self.uri = target = channel._path
        self.clientproto = channel._version
        self.path = target
        try:
            if method == b"CONNECT":
                raise Refusal(400, "CONNECT is not supported: this is not a forward proxy")
            path, self.query = split_target(target)
        except Refusal as refusal:
            self.reject(refusal.status, refusal.message)
            return
        self.path = path
        self.prepath = []
        self.postpath = path[1:].split(b"/")
        resource = getChildForRequest(self.site.resource, self)
        route = getattr(resource, "route", None)
        if route is None:
            self.content = _DiscardContent()
            self._resource = resource
            self.upstream_name = getattr(resource, "upstream_name", "none")
            return
        self.upstream_name = route.signal
        if self.site.client_auth is not None and not self._check_client(method, path):
            return
        self.site.observer.started(self)
        limit = self.site.max_body
        if limit and length is not None and length > limit:
            self.error_reason = "body_limit"
            self.reject(413, "request body too large")
            return
        if wants_websocket(self):
            self._tunnel = Tunnel(self, route, resource.upstream)
            return
        self._relay = Relay(self, route, resource.upstream, length)

    def _check_client(self, method: bytes, path: bytes) -> bool:
        """Client auth (only with CLIENT_AUTH_FILE): 401, 403 or 429, else True."""
        site = self.site
        assert site.client_auth is not None
        consumer = site.client_auth().authenticate(
            self.requestHeaders.getRawHeaders(b"authorization")
        )
        if consumer is None:
            self.reject(401, "missing or invalid client credentials", _CHALLENGE)
            return False
        self.consumer = consumer.name
        if not consumer.allows(method, path):
            self.reject(
                403, f"consumer {consumer.name} may not {method.decode('latin-1')} this path"
            )
            return False
        wait = site.limiter.wait(consumer)
        if wait:
            retry = b"%d" % max(1, math.ceil(wait))
            self.reject(
                429, f"rate limit of consumer {consumer.name} exceeded", [(b"Retry-After", retry)]
            )
            return False
        return True

    def handleContentChunk(self, data: bytes) -> None:
        self.body_in += len(data)
        relay = self._relay
        if relay is not None:
            limit = self.site.max_body
            if limit and self.body_in > limit:
                self._relay = None
                self.error_reason = "body_limit"
                self.reject(413, "request body too large")
                relay.body_limit()
                return
            relay.body_chunk(data)
        elif self.body_in > DISCARD_LIMIT and not self._answered:
            if self._early is None:
                self.reject(413, "request body too large")
            self.answer_early()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.received = True
        if self._answered:
            return
        if self._relay is not None:
            self._relay.body_done()
        elif self._tunnel is not None and self._early is None:
            self._tunnel.start()
        elif self._early is not None:
            self.answer_early()
        else:
            super().requestReceived(command, self.uri, version)

    def process(self) -> None:
        """Render an operations resource (routing was done in `gotLength`)."""
        assert self._resource is not None
        try:
            self.render(self._resource)
        except Exception:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        _log.failure("error rendering {path}", reason, path=self.path.decode("latin-1"))
        self.respond_error(500, "internal error", self.upstream_name)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        relay = self._relay
        if relay is not None:
            relay.client_lost()
        elif self._tunnel is not None:
            self._tunnel.client_gone_early()
        if relay is None and not self.finished and not self._answered:
            self.note_error("client_abort")
        self.observe()

    # -- answers -------------------------------------------------------------

    def reject(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Refuse this request; the answer goes out once the body is read."""
        self._early = (status, message, headers or [])

    def answer_early(self) -> None:
        assert self._early is not None
        status, message, headers = self._early
        for name, value in headers:
            self.responseHeaders.addRawHeader(name, value)
        self.respond_error(status, message, self.upstream_name)

    def respond_error(self, status: int, message: str, upstream: str) -> None:
        """A short JSON error. Before the client finished sending, it closes
        the connection after the answer (the rest of the body is not read)."""
        if self.finished or self._answered or self._disconnected:
            return
        if getattr(self.channel.transport, "disconnecting", False):
            return  # already hanging up (timed out): nothing more can be said
        if self.startedWriting:
            self.abort_client()
            return
        body = errors.json_error(message, upstream)
        self.setResponseCode(status, _REASONS.get(status))
        headers = self.responseHeaders
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
        headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if self.received:
            self.write(body)
            self.finish()
            return
        headers.setRawHeaders(b"Connection", [b"close"])
        self._answered = True
        self.write(body)
        self.channel.persistent = False
        self.channel.loseConnection()

    def answered_by_tunnel(self) -> None:
        """The 101 went out: the request is complete as far as logs go."""
        self._answered = True

    def note_error(self, reason: str) -> None:
        if self.error_reason is None:
            self.error_reason = reason

    def abort_client(self) -> None:
        if not self._disconnected and self.channel is not None:
            transport: Any = self.channel.transport
            transport.abortConnection()

    def finish(self) -> None:
        super().finish()
        self.observe()

    def observe(self) -> None:
        if self._observed:
            return
        self._observed = True
        self.site.observer.finished(self, complete=bool(self.finished or self._answered))
        # Break the request <-> relay cycles now: left to the cyclic GC they
        # made it run every few hundred requests (p99 doubled).
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.release()


class ProxyChannel(http.HTTPChannel):
    """An `HTTPChannel` that refuses what a reverse proxy must never pass on.

    Twisted already refuses CL+TE, duplicate lengths, bad chunks and too many
    headers; this adds obsolete line folding (400), over-long targets (414)
    and heads (431), and a deadline for the whole request head.
    """

    site: ProxySite
    client_host = b"unknown"
    client_text = "unknown"
    _head_timer: IDelayedCall | None = None

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        # Request.__init__ asks for both per request; getsockname is a syscall.
        return self._host

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._peer = self.transport.getPeer()
        self._host = self.transport.getHost()
        super().connectionMade()
        peer = self._peer
        host = getattr(peer, "host", None)
        if host:
            self.client_text = host
            self.client_host = host.encode()
        self.site.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # The head deadline is armed only when a head is left incomplete by a
        # read: most requests arrive whole, and then no timer is needed.
        if (
            self._head_timer is None
            and self.line_mode
            and not self._handlingRequest
            and (self._buffer or not self._HTTPChannel__first_line)  # type: ignore[attr-defined]
            and self.transport is not None
            and not getattr(self.transport, "disconnecting", False)
        ):
            self._head_timer = self.site.clock.callLater(
                self.site.client_header_timeout, self._head_timed_out
            )

    def lineReceived(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            if len(line) > MAX_TARGET + 32:
                self._refuse(414, "request target too long")
                return
        elif line:
            if line[0] in b" \t":
                self._refuse(400, "obsolete line folding is not accepted")
                return
            if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
                self._refuse(431, "request head too large")
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            self._refuse(414, "request target too long")
        else:
            self._refuse(431, "request head too large")

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.requests:
            super().allContentReceived()

    def _send100Continue(self) -> None:
        request = self.requests[-1] if self.requests else None
        if isinstance(request, ProxyRequest) and request._early is not None:
            request.answer_early()
            return
        super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, "malformed request")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot even be parsed, and hang up."""
        self._cancel_head_timer()
        self.setTimeout(None)
        transport = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return
        self.site.observer.refused(status, self.client_text, message)
        transport.write(_raw_response(status, message))
        self.persistent = False
        self.dataReceived = _ignore  # type: ignore[method-assign,assignment]
        self.lineReceived = _ignore  # type: ignore[method-assign,assignment]
        self.loseConnection()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, "request head not received in time")

    def _cancel_head_timer(self) -> None:
        timer = self._head_timer
        if timer is not None:
            self._head_timer = None
            if timer.active():
                timer.cancel()

    def timeoutConnection(self) -> None:
        # Idle keep-alive connection: close quietly (Twisted logs each one).
        if not getattr(self.transport, "disconnecting", False):
            self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_timer()
        self.site.connections.discard(self)
        super().connectionLost(reason)

    @property
    def idle(self) -> bool:
        """No request in progress (a keep-alive connection between requests)."""
        return not self.requests


class _Refuse(Protocol):
    """Answers a connection past MAX_CONNECTIONS with 503 and hangs up."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(_raw_response(503, "too many connections"))
        self.transport.loseConnection()


class ProxySite(server.Site):
    """The site: resources, limits, the clock and the observer in one place."""

    requestFactory = ProxyRequest
    protocol = ProxyChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        resource: IResource,
        *,
        clock: IReactorTime,
        observer: Observer,
        upstream_timeout: float,
        max_body: int,
        client_header_timeout: float,
        client_idle_timeout: float,
        max_connections: int,
        client_auth: Callable[[], ClientAuth] | None = None,
        max_websockets: int = 100,
        websocket_idle_timeout: float = 600.0,
    ) -> None:
        super().__init__(resource, timeout=client_idle_timeout, reactor=clock)
        from .clientauth import RateLimiter

        self.client_auth = client_auth
        self.max_websockets = max_websockets
        self.websocket_idle_timeout = websocket_idle_timeout
        self.websockets = 0
        self.limiter = RateLimiter(clock)
        self.clock = clock
        self.observer = observer
        self.upstream_timeout = upstream_timeout
        self.max_body = max_body
        self.client_header_timeout = client_header_timeout
        self.max_connections = max_connections
        self.connections: set[ProxyChannel] = set()

    def sibling(self, resource: IResource) -> ProxySite:
        """A site with these settings serving another resource (the admin listener)."""
        return ProxySite(
            resource,
            clock=self.clock,
            observer=self.observer,
            upstream_timeout=self.upstream_timeout,
            max_body=self.max_body,
            client_header_timeout=self.client_header_timeout,
            client_idle_timeout=self.timeOut or 75.0,
            max_connections=self.max_connections,
        )

    def buildProtocol(self, addr: Any) -> Protocol | None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self.observer.refused(503, getattr(addr, "host", "unknown"), "too many connections")
            return _Refuse()
        return super().buildProtocol(addr)  # type: ignore[no-any-return]

    def log(self, request: object) -> None:
        """Twisted's combined log is replaced by `Observer` (one JSON line)."""

    def log_upstream_failure(
        self, upstream: str, outcome: errors.Outcome, failure: Failure
    ) -> None:
        causes = ",".join(sorted({type(c).__name__ for c in errors._causes(failure)}))
        _log.warn(
            "upstream {upstream} failed: {reason} ({causes})",
            upstream=upstream,
            reason=outcome.reason,
            causes=causes,
        )
