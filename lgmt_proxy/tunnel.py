"""WebSocket passthrough (Loki live tail and any route asked to upgrade).

The proxy performs the upstream handshake itself, over the upstream's own
endpoint (TLS verified as for every request), with the injected
``Authorization`` and ``X-Scope-OrgID``; the client's ``Sec-WebSocket-Key``
goes along, so the upstream's ``Sec-WebSocket-Accept`` is valid for the
client. After a 101 the two connections are spliced byte for byte, each
transport registered as the other's producer (backpressure both ways), until
either side closes or the tunnel is idle too long.

A byte splice was chosen over a frame-level relay (autobahn, or Twisted's
`twisted.web.websocket`, whose client cannot add headers): frames, masking
and negotiated extensions pass untouched, and nothing is parsed twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import errors
from .routes import Route, upstream_target
from .timers import IdleTimer

if TYPE_CHECKING:
    from .server import ProxyRequest
    from .upstream import Upstream

_log = Logger(namespace="lgmt_proxy.tunnel")

#: Most bytes of an upstream handshake answer we read before giving up.
MAX_HEAD = 16384


def wants_websocket(request: ProxyRequest) -> bool:
    """A GET asking to upgrade to WebSocket (RFC 6455 section 4.1)."""
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    return bool(upgrade) and any(b"websocket" in v.lower() for v in upgrade)  # type: ignore[union-attr]


def handshake_bytes(request: ProxyRequest, route: Route, upstream: Upstream) -> bytes:
    headers = upstream.forward_headers(request.requestHeaders, request.channel.client_host)
    target = upstream_target(route, upstream.base_path, request.path, request.query)
    lines = [b"GET " + target + b" HTTP/1.1", b"Connection: Upgrade", b"Upgrade: websocket"]
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _UpstreamSide(Protocol):
    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._head = b""
        self._switched = False

    def connectionMade(self) -> None:
        self._tunnel.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._switched:
            self._tunnel.to_client(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._tunnel.upstream_garbled()
            return
        head, rest = self._head[: end + 4], self._head[end + 4 :]
        self._head = b""
        self._switched = True
        self._tunnel.upstream_answered(head, rest)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._tunnel.upstream_lost()


class Tunnel:
    """One WebSocket session between a client and an upstream."""

    def __init__(self, request: ProxyRequest, route: Route, upstream: Upstream) -> None:
        self.request = request
        self.route = route
        self.upstream = upstream
        self.site = request.site
        self._clock = self.site.clock
        self._upstream: _UpstreamSide | None = None
        self._timer: IdleTimer | None = None
        self._open = False
        self._counted = False
        self._closed = False
        self._client_lost: Any = None

    @property
    def name(self) -> str:
        return self.route.signal

    def start(self) -> None:
        site = self.site
        if site.websockets >= site.max_websockets:
            self.request.respond_error(503, "too many WebSocket sessions open", self.name)
            return
        site.websockets += 1
        self._counted = True
        self._handshake = handshake_bytes(self.request, self.route, self.upstream)
        factory = Factory.forProtocol(lambda: _UpstreamSide(self))
        factory.noisy = False
        self._connecting = self.upstream.endpoint.connect(factory)
        self._connecting.addErrback(self._connect_failed)
        self._arm(self.site.upstream_timeout)

    # -- before the switch ----------------------------------------------------

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        outcome = errors.TIMEOUT if self._timed_out_flag else errors.classify(failure)
        self._fail(outcome.status, outcome.message, outcome.reason)

    _timed_out_flag = False

    def upstream_connected(self, side: _UpstreamSide) -> None:
        self._connecting = None
        self._upstream = side
        if self._closed:
            self._abort_upstream()
            return
        assert side.transport is not None
        side.transport.write(self._handshake)

    def upstream_garbled(self) -> None:
        self._abort_upstream()

    def upstream_answered(self, head: bytes, rest: bytes) -> None:
        if self._closed:
            self._abort_upstream()
            return
        status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 502
        if status != 101:
            self._abort_upstream()
            code = status if 400 <= status < 600 else 502
            self._fail(code, f"upstream refused the WebSocket upgrade (HTTP {status})", None)
            return
        self._switch(head, rest)

    def _switch(self, head: bytes, rest: bytes) -> None:
        request = self.request
        channel = request.channel
        client: Any = channel.transport
        assert self._upstream is not None
        upstream: Any = self._upstream.transport
        channel.setTimeout(None)
        buffered = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        self._client_lost = channel.connectionLost
        channel.dataReceived = self.from_client  # type: ignore[method-assign]
        channel.connectionLost = self.client_lost  # type: ignore[method-assign,assignment]
        request.setResponseCode(101)
        request.answered_by_tunnel()
        client.write(head)
        request.sentLength += len(rest)
        if rest:
            client.write(rest)
        client.unregisterProducer()
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)
        client.resumeProducing()
        self._open = True
        self.site.observer.metrics.websocket(self.name, +1)
        if buffered:
            self.from_client(buffered)
        self._arm(self.site.websocket_idle_timeout)

    # -- spliced ---------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.touch()
        self.request.body_in += len(data)
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.write(data)

    def to_client(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.touch()
        self.request.sentLength += len(data)
        client: Any = self.request.channel.transport
        client.write(data)

    def client_lost(self, reason: Failure) -> None:
        self._close()
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.loseConnection()
        if self._client_lost is not None:
            self._client_lost(reason)

    def client_gone_early(self) -> None:
        """The client left before the switch: drop the upstream attempt."""
        if self._closed:
            return  # after the switch `client_lost` already closed both sides
        self._close()
        if self._connecting is not None:
            self._connecting.cancel()
        self._abort_upstream()

    def upstream_lost(self) -> None:
        if self._open and not self._closed:
            # Let the client read what was relayed, then close.
            client: Any = self.request.channel.transport
            client.loseConnection()
        else:
            self._fail(502, "upstream closed during the WebSocket handshake", "reset")
        self._close()

    # -- lifecycle ---------------------------------------------------------------

    _connecting: Any = None

    def _abort_upstream(self) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, status: int, message: str, reason: str | None) -> None:
        """The session never opened: answer the client with a JSON error."""
        if self._closed:
            return
        self._close()
        if reason is not None:
            self.request.note_error(reason)
        self.request.respond_error(status, message, self.name)

    def _finish_count(self) -> None:
        if self._counted:
            self._counted = False
            self.site.websockets -= 1

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finish_count()
        if self._open:
            self._open = False
            self.site.observer.metrics.websocket(self.name, -1)
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = IdleTimer(self._clock, seconds, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self._closed:
            return
        if not self._open:
            # No connect or no handshake answer in time.
            self._timed_out_flag = True
            if self._connecting is not None:
                self._connecting.cancel()
                return
            self._abort_upstream()
            self._fail(504, "upstream did not answer the WebSocket handshake in time", "timeout")
            return
        _log.info("closing idle WebSocket session to {upstream}", upstream=self.name)
        self._abort_upstream()
        client: Any = self.request.channel.transport
        client.loseConnection()
