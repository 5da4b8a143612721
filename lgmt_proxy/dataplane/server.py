"""The client side of the data plane: client connections parsed by llhttp
(httptools), routed through the resource tree, answered by an `Exchange`
(proxied), a `Tunnel` (WebSocket) or a local resource (/health, /ready,
/metrics, JSON 404s).

twisted.web's `HTTPChannel`/`Request` read whole bodies before ``render``,
and together with the Agent cost four fifths of the CPU of a proxied request;
this is a `Protocol` on public Twisted APIs only. What llhttp refuses by
itself (CL with TE, two lengths, bad chunks, obsolete line folding, bare CR,
control bytes in values) is answered 400 and the connection closed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource

from lgmt_proxy.dataplane.exchange import Exchange
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.dataplane.resources import RouteMatch, route_table
from lgmt_proxy.dataplane.tunnel import Sessions, Tunnel
from lgmt_proxy.dataplane.upstream import Upstream
from lgmt_proxy.io.sending import Sender, SendQueue
from lgmt_proxy.io.timers import IdleTimer
from lgmt_proxy.rules import errors
from lgmt_proxy.rules.dispatch import Decision, Proxy, Refuse, ServeLocal, decide, read_target
from lgmt_proxy.rules.dispatch import Tunnel as OpenTunnel
from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.headers import RawHeaders, head_lines, response_headers
from lgmt_proxy.rules.policy import Policy
from lgmt_proxy.rules.routes import MAX_TARGET, Local, Proxied, upstream_target

if TYPE_CHECKING:
    from lgmt_proxy.config.clientauth import ClientAuth, RateLimiter
    from lgmt_proxy.obs.record import Recorder

_log = Logger(namespace="lgmt_proxy.server")

#: Bytes of an unwanted request body (refused) read and thrown away before the
#: connection is closed instead.
DISCARD_LIMIT = 64 * 1024 * 1024
#: The whole request head (request line and headers), and how many headers.
MAX_HEAD = 16384
MAX_HEADERS = 500

#: Methods whose request, without a body, may be sent again on a fresh
#: connection when a reused one drops before answering.
RETRY_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS"})

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _StopParsing(Exception):
    """Raised inside a parser callback to stop parsing a hostile head
    (``_refusal`` holds the answer `refuse_and_close` gives)."""


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


class ClientConnection(Protocol):
    """One client connection: requests in order, one answered at a time."""

    factory: ProxyFactory

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: Incoming | None = None
        self._pipelined: deque[Incoming] = deque()
        self.active: Incoming | None = None
        self._handler: Exchange | Tunnel | None = None
        self._head_size = 0
        self._head_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._idle_since = 0.0
        self._last_read = 0.0
        self._refusal: tuple[int, str] | None = None
        self._closing = False
        self._tunnel: Tunnel | None = None
        self._upgrading: Tunnel | None = None
        self._chunked_out = False
        self._response_started = False
        self._close_after = False
        self._drain_first = False
        self._streaming: Any = None
        self.client_text = "unknown"
        self.client_host = b"unknown"
        self.sender: Sender | None = None
        #: UPSTREAM_TIMEOUT_SECONDS for each exchange in turn (one timer call
        #: for many keep-alive requests).
        self._upstream_timer = IdleTimer(self.clock, factory.upstream_timeout)

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        host = getattr(self.transport.getPeer(), "host", None)
        if host and host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack socket
        if host:
            self.client_text = host
            self.client_host = host.encode()
        self.sender = self.factory.sends.sender(self.transport)
        self.factory.connections.add(self)
        self._idle_since = self._last_read = self.clock.seconds()
        self._arm_idle(self.factory.client_idle_timeout)

    @property
    def idle(self) -> bool:
        """Between requests: nothing being parsed, answered or queued."""
        return self.active is None and self._parsing is None and not self._pipelined

    def dataReceived(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.from_client(data)
            return
        self._last_read = self.clock.seconds()
        upgrading = self._upgrading
        if upgrading is not None:
            upgrading.client_bytes(data)
            return
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :] if upgrade.args else b"")
            return
        except httptools.HttpParserCallbackError:
            refusal = self._refusal
            if refusal is None:
                _log.failure("error handling a request", Failure())
                refusal = (500, "internal error")
            self.refuse_and_close(*refusal)
            return
        except httptools.HttpParserInvalidMethodError:
            self.refuse_and_close(501, "request method not implemented")
            return
        except httptools.HttpParserError as e:
            self.refuse_and_close(400, _parse_error_message(e))
            return
        parsing = self._parsing
        if parsing is not None and parsing.in_head and self._head_timer is None:
            # Most heads arrive whole; a timer only for those that do not.
            self._head_timer = self.clock.callLater(
                self.factory.client_header_timeout, self._head_timed_out
            )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._cancel_head_timer()
        self._cancel_idle()
        if self.sender is not None:
            self.sender.connection_lost()
        self._upstream_timer.cancel()
        self.factory.connections.discard(self)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.client_lost()
        handler, self._handler = self._handler, None
        active, self.active = self.active, None
        if handler is not None:
            handler.cancel()
        if active is not None:
            if not self._response_started:
                active.note_error("client_abort")
                active.status = 499
            self._record(active)
        self._pipelined.clear()
        self._parsing = None

    # -- parser callbacks (httptools) ------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Incoming(self.clock.seconds())
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        parsing = self._parsing
        assert parsing is not None
        parsing.target += url
        if len(parsing.target) > MAX_TARGET:
            self._refusal = (414, "request target too long")
            raise _StopParsing()

    def on_header(self, name: bytes, value: bytes) -> None:
        parsing = self._parsing
        assert parsing is not None
        if not parsing.in_head:
            return  # trailers of a chunked body are not forwarded
        self._head_size += len(name) + len(value) + 4
        headers = parsing.headers
        headers.append((name, value))
        if self._head_size > MAX_HEAD:
            self._refusal = (431, "request head too large")
            raise _StopParsing()
        if len(headers) > MAX_HEADERS:
            self._refusal = (431, "too many request headers")
            raise _StopParsing()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        parser = self._parser
        req = self._parsing
        assert req is not None
        req.in_head = False
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        refused = req.read_head()
        if refused is not None:
            self._refusal = (501, refused)
            raise _StopParsing()
        if self.active is None:
            self._route_request(req)
        else:
            # Pipelined behind the request being answered: hold it (and stop
            # reading) until that one is done.
            req.buffered = []
            self._pipelined.append(req)
            self._hold_reading()

    def on_body(self, data: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.body_in += len(data)
        on_body = req.on_body
        if on_body is not None:
            on_body(data)
        elif req.buffered is not None:
            req.buffered.append(data)

    def on_message_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._parsing = None
        req.complete = True
        on_complete = req.on_complete
        if on_complete is not None:
            on_complete()

    # -- dispatch ---------------------------------------------------------------------

    def _route_request(self, req: Incoming) -> None:
        """Start answering ``req``: match its path, decide, act."""
        self.active = req
        self._response_started = False
        self._drain_first = False
        # After CONNECT or an upgrade the parser reads no further request.
        self._close_after = (
            not req.keep_alive or self.factory.draining or req.upgrade or req.method == b"CONNECT"
        )
        try:
            req.path, req.query = read_target(req.method, req.target)
        except Refusal as refusal:
            self.refuse_after_body(refusal.status, refusal.message)
            return
        factory = self.factory
        match = factory.routes.match(req.path)
        auth = factory.client_auth
        decision = decide(
            req,
            match,
            factory.policy,
            None if auth is None else auth().authenticate,
            factory.limiter.wait,
        )
        _ACTIONS[type(decision)](self, req, match, decision)

    def _refuse(self, req: Incoming, match: RouteMatch, decision: Refuse) -> None:
        if decision.routed:
            req.upstream_name = match.upstream_name
            if isinstance(match, Local):
                req.quiet = match.quiet
            else:
                req.counted = True
        req.consumer = decision.consumer
        req.tenant = decision.tenant
        refusal = decision.refusal
        self.refuse_after_body(refusal.status, refusal.message, list(refusal.headers))

    def _serve_local(self, req: Incoming, match: Local[IResource], decision: ServeLocal) -> None:
        req.upstream_name = match.upstream_name
        req.quiet = match.quiet
        req.consumer = decision.consumer
        resource = match.resource
        self._when_complete(req, lambda: self._render_local(req, resource))

    def _open_tunnel(self, req: Incoming, match: Proxied[Upstream], decision: OpenTunnel) -> None:
        if not self._forwarding(req, match, decision.consumer, decision.tenant):
            return
        factory = self.factory
        tunnel = Tunnel(
            self,
            req,
            match.route,
            match.upstream,
            clock=self.clock,
            sessions=factory.websockets,
            handshake_timeout=factory.upstream_timeout,
            idle_timeout=factory.websocket_idle_timeout,
        )
        self._handler = tunnel
        self._when_complete(req, tunnel.start)

    def _forwarding(
        self, req: Incoming, match: Proxied[Upstream], consumer: str | None, tenant: bytes | None
    ) -> bool:
        """Counted from here on; False if the declared body is over the limit (413)."""
        req.upstream_name = match.route.upstream_name
        req.counted = True
        req.consumer = consumer
        req.tenant = tenant
        req.in_flight = True
        factory = self.factory
        factory.recorder.started(req)
        limit = factory.max_body
        if limit and req.length is not None and req.length > limit:
            req.note_error("body_limit")
            self.refuse_after_body(413, "request body too large")
            return False
        return True

    def _proxy(self, req: Incoming, match: Proxied[Upstream], decision: Proxy) -> None:
        if not self._forwarding(req, match, decision.consumer, decision.tenant):
            return
        if req.upgrade:
            # Other upgrades (h2c) are not offered: served as plain HTTP/1.1,
            # and the connection closes after (the parser stopped at the head).
            self._close_after = True
        route = match.route
        upstream = match.upstream
        factory = self.factory
        has_body = req.chunked or bool(req.length)
        exchange = Exchange(
            self,
            upstream,
            self._upstream_timer,
            method=req.method,
            target=upstream_target(route, upstream.base_path, req.path, req.query),
            headers=upstream.forward_headers(req.headers, self.client_host, req.tenant),
            length=req.length,
            chunked=req.chunked,
            retry_safe=req.method in RETRY_SAFE and not has_body,
            log_failure=factory.log_upstream_failure,
        )
        self._handler = exchange
        if not has_body:
            # Nothing to stream: the head goes out alone, no producer set up.
            if not req.complete:
                req.on_complete = _nothing
            exchange.body_end()
            exchange.start()
            return
        if not req.complete:
            if req.expect_continue and req.version == "1.1":
                self._emit(_CONTINUE)
            req.on_body = self._body_chunk
            req.on_complete = exchange.body_end
        exchange.start()
        buffered, req.buffered = req.buffered, None
        if buffered:
            for chunk in buffered:
                self._body_chunk(chunk)
        if req.complete:
            exchange.body_end()

    def _body_chunk(self, data: bytes) -> None:
        req = self.active
        exchange = self._handler
        if req is None or not isinstance(exchange, Exchange):
            return
        limit = self.factory.max_body
        if limit and req.body_in > limit:
            req.note_error("body_limit")
            self._handler = None
            exchange.cancel()
            req.on_body = None
            req.on_complete = None
            if self._response_started:
                self.abort()
            else:
                self.refuse_after_body(413, "request body too large")
            return
        exchange.body(data)

    def _when_complete(self, req: Incoming, then: Callable[[], None]) -> None:
        """Run ``then`` once the request's body is in (read and dropped)."""
        req.buffered = None  # nobody reads this body
        if req.complete:
            then()
            return
        if req.expect_continue:
            # Not worth a 100 Continue: answer now, the body is never read.
            self._close_after = True
            then()
            return

        def discard(data: bytes) -> None:
            if req.body_in > DISCARD_LIMIT:
                req.on_body = None
                self._close_after = True
                req.on_complete = None
                then()

        req.on_body = discard
        req.on_complete = then

    # -- local answers --------------------------------------------------------------------

    # A refusal is a JSON error the proxy answers itself. There are three
    # ways to give one, by what can still be read of the request:
    #
    # - refuse_after_body: the request broke a rule (policy, client auth,
    #   limits) and is framed: its body is read and dropped first, so the
    #   connection can carry the next request (and closing with unread input
    #   would reset it under the answer).
    # - refuse_now: the active request is answered at once, nothing more is
    #   waited for: the body is already in, or its handler (exchange, tunnel)
    #   failed and the connection closes if the body is not (a failure of
    #   the upstream side, a local resource that could not render).
    # - refuse_and_close: the input cannot be framed (llhttp refused it, a
    #   head limit, a head or body timeout): there may be no request at all
    #   and no end to find, so the answer goes out and the connection closes.

    def refuse_after_body(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Refuse the active request with a JSON error once its body is in."""
        req = self.active
        if req is None:
            return
        self._handler = None

        def answer() -> None:
            if self.active is req:
                self.refuse_now(status, message, headers)

        self._when_complete(req, answer)

    def refuse_now(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Refuse the active request with a JSON error now (the connection
        closes after unless the body is in); after the response head, cut
        the connection instead."""
        req = self.active
        if req is None:
            return
        if self._response_started:
            self.abort()
            return
        if not req.complete or self.factory.draining:
            self._close_after = True
        close = self._close_after  # error_response writes the Connection line
        req.status = status
        body = errors.error_response(
            status,
            message,
            req.upstream_name,
            close=close,
            headers=headers or [],
            head_only=req.method == b"HEAD",
        )
        self._response_started = True
        req.body_out = 0
        self._emit(body)
        self._request_done(req)

    def _render_local(self, req: Incoming, resource: IResource) -> None:
        if self.active is not req:
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
        headers = list(local.responseHeaders.getAllRawHeaders())
        lines = b"".join(n + b": " + v + b"\r\n" for n, vs in headers for v in vs)
        lines += self._connection_header(req)
        phrase = local.code_message or errors.reason(local.code)
        head = b"HTTP/1.1 %d %s\r\n%s\r\n" % (local.code, phrase, lines)
        self._response_started = True
        if req.method == b"HEAD":
            self._emit(head)
        else:
            req.body_out = len(body)
            self._emit(head + body)
        self._request_done(req)

    def refuse_and_close(self, status: int, message: str) -> None:
        """Refuse input that cannot be framed: answer (if nothing was yet) and
        hang up. Unlike `refuse_now` it needs no parsed request (a head that
        broke a limit has none) and never waits for a body it cannot delimit."""
        self._cancel_head_timer()
        transport = self.transport
        if self._closing or transport is None:
            return
        self._closing = True
        self._refusal = None
        active = self.active
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.cancel()
        if active is not None and self._response_started:
            self.abort()
            return
        if active is None:
            self.factory.recorder.refused(status, self.client_text, message)
        else:
            active.status = status
            active.note_error("malformed")
            self.active = None
            self._record(active)
        self._emit(errors.error_response(status, message))
        self._lose()

    # -- the response of a proxied request (called by Exchange) ------------------------

    def response_head(
        self, status: int, reason: bytes, headers: RawHeaders, length: int | None, chunked: bool
    ) -> None:
        req = self.active
        if req is None:
            return
        req.status = status
        req.from_upstream = True
        head_only = req.method == b"HEAD" or status in (204, 304)
        framing = b""
        self._chunked_out = False
        if head_only:
            if req.method == b"HEAD" and status not in (204, 304) and length is not None:
                framing = b"Content-Length: %d\r\n" % length
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif req.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            self._chunked_out = True
        else:
            self._close_after = True  # HTTP/1.0: the close ends the body
        if not req.complete:
            # The upstream answered before the client finished sending: the
            # rest is read and dropped (see _request_done), then the
            # connection closes.
            self._close_after = True
            self._drain_first = True
        framing += self._connection_header(req)
        self._response_started = True
        self._emit(
            b"HTTP/1.1 %d %s\r\n%s%s\r\n"
            % (
                status,
                reason or errors.reason(status),
                head_lines(response_headers(headers)),
                framing,
            )
        )

    def _connection_header(self, req: Incoming) -> bytes:
        """The ``Connection`` line of a response head, decided as the head
        goes out: from SIGTERM on every response says close, whenever its
        request came in, so clients move to other pods during the delay."""
        if self.factory.draining:
            self._close_after = True
        if self._close_after:
            return b"Connection: close\r\n"
        if req.version == "1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def response_body(self, data: bytes) -> None:
        req = self.active
        if req is None:
            return
        req.body_out += len(data)
        sender = self.sender
        assert sender is not None
        if self._chunked_out:
            sender.write(b"%x\r\n" % len(data))
            sender.write(data)
            sender.write(b"\r\n")
        else:
            sender.write(data)

    def response_end(self) -> None:
        req = self.active
        if req is None:
            return
        self._handler = None
        if self._chunked_out:
            self._emit(b"0\r\n\r\n")
        self._request_done(req)

    def response_failed(self, outcome: errors.Outcome, *, timed_out_body: bool = False) -> None:
        """The upstream side failed: a JSON error before the head, else the
        connection is cut so the body never looks complete."""
        req = self.active
        if req is None:
            return
        self._handler = None
        req.note_error(outcome.reason)
        if self._response_started:
            self.abort()
            return
        if timed_out_body:
            self.refuse_now(408, "client stopped sending the request body")
            return
        self.refuse_now(outcome.status, outcome.message)

    def stream_from(self, producer: Any) -> None:
        """The upstream's transport produces the response: a slow client pauses it."""
        assert self.sender is not None
        self._streaming = producer
        self.sender.register_producer(producer)

    def stop_streaming(self) -> None:
        if self._streaming is not None:
            self._streaming = None
            if self.sender is not None:
                self.sender.unregister_producer()

    @property
    def body_producer(self) -> Any:
        """The client's transport, to register on the upstream's (upload backpressure)."""
        return self.transport

    def pause_body(self) -> None:
        self._hold_reading()

    def resume_body(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- WebSocket (called by Tunnel) ---------------------------------------------------

    def tunnel_open(self, tunnel: Tunnel) -> Any:
        """The upstream switched protocols: every further byte is the tunnel's."""
        req = self.active
        if self.sender is not None:
            self.sender.hand_over()
        self._tunnel = tunnel
        self._upgrading = None
        self._response_started = True
        self._cancel_idle()
        if req is not None:
            req.status = 101
        return self.transport

    def tunnel_failed(self, status: int, message: str, reason: str | None) -> None:
        req = self.active
        if req is None:
            return
        if reason is not None:
            req.note_error(reason)
        self._handler = None
        self._close_after = True
        self.refuse_now(status, message)

    def tunnel_closed(self) -> None:
        """After the switch: the session ended, log it."""
        req, self.active = self.active, None
        if req is not None:
            self._record(req)

    def _upgraded(self, rest: bytes) -> None:
        """The parser stopped after a head asking to upgrade (or CONNECT)."""
        if self._closing:
            return
        req = self.active
        if req is None:
            # Pipelined behind another request: not served.
            self.refuse_and_close(400, "upgrade requested while another request is pending")
            return
        if isinstance(self._handler, Tunnel):
            self._upgrading = self._handler
            self._handler.client_bytes(rest)
            return
        # Not a tunnel (refused, or an upgrade we do not offer): no more
        # requests on this connection.
        self._close_after = True
        self._closing = True

    # -- end of a request ------------------------------------------------------------------

    def _request_done(self, req: Incoming) -> None:
        self.stop_streaming()
        self.active = None
        self._handler = None
        self._record(req)
        transport = self.transport
        if transport is None:
            return
        if not req.complete and self._drain_first and req.body_in <= DISCARD_LIMIT:
            # Read the rest of the body and drop it, then close: closing with
            # unread input would reset the connection under the answer.
            def drop(data: bytes) -> None:
                if req.body_in > DISCARD_LIMIT:
                    req.on_body = req.on_complete = None
                    self._hang_up()

            req.on_body = drop
            req.on_complete = self._hang_up
            self.resume_body()
            return
        if self._close_after or not req.complete:
            self._hang_up()
            return
        self._next()

    def _hang_up(self) -> None:
        self._closing = True
        self._lose()

    def _lose(self) -> None:
        """Close once what was written is sent."""
        if self.sender is not None:
            self.sender.close()

    def _next(self) -> None:
        if self._pipelined:
            req = self._pipelined.popleft()
            self.resume_body()
            self._route_request(req)
            return
        self._idle_since = self.clock.seconds()
        self.resume_body()

    def _record(self, req: Incoming) -> None:
        self.factory.recorder.finished(req, self.client_text)

    # -- helpers -------------------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        if self.sender is not None:
            self.sender.write(data)

    def _hold_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Cut the connection: what was sent must not look complete."""
        self._closing = True
        if self.sender is not None:
            self.sender.abort()

    def close_when_done(self, quiet_for: float = 0.0) -> None:
        """Drain: close now if idle for ``quiet_for`` seconds, else after the
        current response. A connection accepted a moment ago, or between two
        requests of a busy client, is likely to carry a request already on
        its way: closing it then would cut that request."""
        if self.idle:
            quiet = self.clock.seconds() - max(self._idle_since, self._last_read)
            if quiet >= quiet_for:
                self._hang_up()
        else:
            self._close_after = True

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.refuse_and_close(408, "request head not received in time")

    def _cancel_head_timer(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_idle(self, seconds: float) -> None:
        self._idle_timer = self.clock.callLater(seconds, self._idle_check)

    def _cancel_idle(self) -> None:
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _idle_check(self) -> None:
        """Idle keep-alive connections close after CLIENT_IDLE_TIMEOUT_SECONDS;
        one timer per connection, re-armed for what is left."""
        self._idle_timer = None
        timeout = self.factory.client_idle_timeout
        if not self.idle:
            if self._handler is None and (self.active is None or not self._response_started):
                # Reading a body only to drop it (a local answer or a refusal
                # waits for it): a client gone silent is not waited for.
                left = self._last_read + timeout - self.clock.seconds()
                if left <= 0:
                    if self.active is None:
                        self._hang_up()  # answered; the rest of the body never came
                    else:
                        self.refuse_and_close(408, "request body not received in time")
                    return
                self._arm_idle(left)
                return
            self._arm_idle(timeout)
            return
        now = self.clock.seconds()
        left = max(self._idle_since, self._last_read) + timeout - now
        if left > 0:
            self._arm_idle(left)
            return
        self._closing = True
        sender = self.sender
        if sender is not None and sender.backed_up:
            # The answer's tail is still unsent: the client gets an idle
            # timeout from the last time it took any bytes, then is cut (a
            # close would wait for it for ever).
            left = sender.last_sent + timeout - now
            if left <= 0:
                self.abort()
                return
            self._arm_idle(left)
        self._lose()


def _parse_error_message(error: Exception) -> str:
    """A short reason for what llhttp refused (its own words are for developers)."""
    text = str(error).lower()
    if "whitespace after header value" in text:
        return "obsolete line folding is not accepted"
    if "content-length" in text and "transfer-encoding" in text:
        return "both Content-Length and Transfer-Encoding"
    if "content-length" in text:
        return "invalid or repeated Content-Length"
    if "chunk" in text:
        return "malformed chunked body"
    return "malformed request"


def _nothing() -> None:
    pass


#: How a connection acts on each kind of decision.
_ACTIONS: dict[type[Decision], Callable[[ClientConnection, Incoming, Any, Any], None]] = {
    Proxy: ClientConnection._proxy,
    Refuse: ClientConnection._refuse,
    ServeLocal: ClientConnection._serve_local,
    OpenTunnel: ClientConnection._open_tunnel,
}


class _RefuseConnection(Protocol):
    """Answers a connection past MAX_CONNECTIONS with 503 and hangs up."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(errors.error_response(503, "too many connections"))
        self.transport.loseConnection()


class ProxyFactory(Factory):
    """The main listener's factory: the resource tree (route table), limits,
    the clock and the recorder in one place."""

    noisy = False

    def __init__(
        self,
        resource: Resource,
        *,
        clock: IReactorTime,
        recorder: Recorder,
        upstream_timeout: float,
        max_body: int,
        client_header_timeout: float,
        client_idle_timeout: float,
        max_connections: int,
        client_auth: Callable[[], ClientAuth] | None = None,
        limiter: RateLimiter | None = None,
        max_websockets: int = 100,
        websocket_idle_timeout: float = 600.0,
        policy: Policy | None = None,
        sends: SendQueue | None = None,
    ) -> None:
        self.resource = resource
        #: What each path goes to, read off the tree once.
        self.routes = route_table(resource)
        self.clock = clock
        #: Shared with the upstream pools: the sends of a reactor turn go out together.
        self.sends = sends if sends is not None else SendQueue(clock)
        self.recorder = recorder
        self.upstream_timeout = upstream_timeout
        self.max_body = max_body
        self.client_header_timeout = client_header_timeout
        self.client_idle_timeout = client_idle_timeout
        self.max_connections = max_connections
        self.client_auth = client_auth
        #: Methods, ALLOWED_HOSTS and ALLOWED_ORIGINS for proxy routes.
        self.policy = policy if policy is not None else Policy()
        if limiter is None:
            from lgmt_proxy.config.clientauth import RateLimiter

            limiter = RateLimiter(clock)
        self.limiter = limiter
        self.websocket_idle_timeout = websocket_idle_timeout
        self.websockets = Sessions(max_websockets, recorder.websocket)
        self.connections: set[ClientConnection] = set()
        #: From SIGTERM on: every response says ``Connection: close``.
        self.draining = False

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if len(self.connections) >= self.max_connections:
            self.recorder.refused(503, getattr(addr, "host", "unknown"), "too many connections")
            return _RefuseConnection()
        return ClientConnection(self)

    def log_upstream_failure(
        self, upstream: str, outcome: errors.Outcome, failure: Failure
    ) -> None:
        _log.warn(
            "upstream {upstream} failed: {reason} ({causes})",
            upstream=upstream,
            reason=outcome.reason,
            causes=errors.cause_names(failure),
        )
