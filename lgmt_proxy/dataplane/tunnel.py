"""WebSocket passthrough (Loki live tail and any route asked to upgrade).

The proxy performs the upstream handshake itself, over the upstream's own
endpoint (TLS verified as for every request), with the injected
``Authorization`` and ``X-Scope-OrgID``; the client's ``Sec-WebSocket-Key``
goes along, so the upstream's ``Sec-WebSocket-Accept`` is valid for the
client. The upstream's answer is parsed by llhttp; after a 101 the two
connections are spliced byte for byte, each written through its own `Sender`
with the other's `ReadGate` as its producer (backpressure both ways), until
either side closes or the tunnel is idle too long.

A byte splice was chosen over a frame-level relay (autobahn, or Twisted's
`twisted.web.websocket`, whose client cannot add headers): frames, masking
and negotiated extensions pass untouched, and nothing is parsed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.dataplane.upstream import Upstream
from lgmt_proxy.io.reading import Hold
from lgmt_proxy.io.sending import Sender, SendQueue
from lgmt_proxy.io.timers import IdleTimer
from lgmt_proxy.rules import errors
from lgmt_proxy.rules.headers import head_lines
from lgmt_proxy.rules.routes import Route, upstream_target

_log = Logger(namespace="lgmt_proxy.tunnel")

#: Most bytes of an upstream handshake answer read before giving up.
MAX_HEAD = 16384


def handshake_bytes(req: Incoming, route: Route, upstream: Upstream, client_host: bytes) -> bytes:
    headers = upstream.forward_headers(req.headers, client_host, req.tenant)
    target = upstream_target(route, upstream.base_path, req.path, req.query)
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        + head_lines(headers)
        + b"\r\n"
    )


class TunnelClient(TypingProtocol):
    """What a tunnel asks of the client connection it serves (as an
    `Exchange` asks `ClientSide`)."""

    @property
    def client_host(self) -> bytes: ...

    def pause_body(self) -> None: ...

    def tunnel_open(self, tunnel: Tunnel) -> Sender:
        """The switch: every further byte from the client is the tunnel's;
        returns the client connection's sender (its ``reading`` too)."""

    def tunnel_failed(self, status: int, message: str, reason: str | None) -> None: ...

    def tunnel_closed(self) -> None: ...


class Sessions:
    """The WebSocket sessions open at once: capped by ``MAX_WEBSOCKETS``,
    and reported to ``gauge`` (``proxy_websockets_open``) by upstream name."""

    def __init__(self, limit: int, gauge: Callable[[str, int], None]) -> None:
        self.limit = limit
        self.count = 0
        self.gauge = gauge

    def take(self) -> bool:
        """One more session, if under the cap."""
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def give_back(self) -> None:
        self.count -= 1


@implementer(IHandshakeListener)
class _UpstreamSide(Protocol):
    """The upstream connection: its handshake answer parsed, then raw bytes."""

    def __init__(self, tunnel: Tunnel, sends: SendQueue, tls: bool) -> None:
        self._tunnel = tunnel
        self._sends = sends
        self._tls = tls
        self.out: Sender | None = None
        self._head = b""
        self._switched = False
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0

    def connectionMade(self) -> None:
        self.out = self._sends.install(self)
        self._tunnel.upstream_connected(self)
        if not self._tls:
            self._tunnel.upstream_ready()

    def handshakeCompleted(self) -> None:
        self._tunnel.upstream_ready()

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def dataReceived(self, data: bytes) -> None:
        if self._switched:
            self._tunnel.to_client(data)
            return
        self._head += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # 101: everything after the head already belongs to the session.
            offset = len(self._head) - len(data) + upgrade.args[0]
            head, rest = self._head[:offset], self._head[offset:]
            self._head = b""
            self._switched = True
            self._tunnel.upstream_answered(101, head, rest)
            return
        except httptools.HttpParserError:
            self._tunnel.upstream_answered(0, b"", b"")
            return
        if self.status:
            self._tunnel.upstream_answered(self.status, b"", b"")
        elif len(self._head) > MAX_HEAD:
            self._tunnel.upstream_answered(0, b"", b"")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tunnel.upstream_lost(reason)


class Tunnel:
    """One WebSocket session between a client and an upstream."""

    def __init__(
        self,
        client: TunnelClient,
        req: Incoming,
        route: Route,
        upstream: Upstream,
        *,
        clock: IReactorTime,
        sends: SendQueue,
        sessions: Sessions,
        handshake_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.client = client
        self.req = req
        self.route = route
        self.upstream = upstream
        self._clock = clock
        self._sends = sends
        self._sessions = sessions
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._client_out: Sender | None = None
        self._upstream: _UpstreamSide | None = None
        self._connecting: Deferred[Any] | None = None
        self._timer: IdleTimer | None = None
        self._early: list[bytes] = []
        self._open = False
        self._counted = False
        self._closed = False
        self._timed_out = False
        #: TCP (and TLS) up: the connect deadline is met.
        self._ready = False
        self._handshake = b""

    @property
    def name(self) -> str:
        return self.route.upstream_name

    def start(self) -> None:
        if not self._sessions.take():
            self._fail(503, "too many WebSocket sessions open", None)
            return
        self._counted = True
        self._handshake = handshake_bytes(
            self.req, self.route, self.upstream, self.client.client_host
        )
        tls = self.upstream.pool.tls
        proto_factory = Factory.forProtocol(lambda: _UpstreamSide(self, self._sends, tls))
        proto_factory.noisy = False
        self._connecting = self.upstream.endpoint.connect(proto_factory)
        self._connecting.addErrback(self._connect_failed)
        # TCP and the TLS handshake under the connect deadline, as requests'.
        self._arm(self.upstream.pool.connect_timeout)

    # -- before the switch -----------------------------------------------------------

    def client_bytes(self, data: bytes) -> None:
        """Bytes the client sent after its head, before the switch."""
        if data:
            self._early.append(data)
            self.client.pause_body()  # resumed at the switch

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        outcome = errors.CONNECT_TIMEOUT if self._timed_out else errors.classify(failure)
        self._fail(outcome.status, outcome.message, outcome.reason)

    def upstream_connected(self, side: _UpstreamSide) -> None:
        self._connecting = None
        self._upstream = side
        if self._closed:
            self._abort_upstream()

    def upstream_ready(self) -> None:
        """Connected (TLS: handshake done): our handshake goes out, its
        answer awaited under the upstream timeout."""
        side = self._upstream
        if self._closed or side is None or side.out is None:
            return
        self._ready = True
        self._arm(self._handshake_timeout)
        side.out.write(self._handshake)

    def upstream_answered(self, status: int, head: bytes, rest: bytes) -> None:
        if self._closed:
            self._abort_upstream()
            return
        if status != 101:
            self._abort_upstream()
            if 400 <= status < 600:
                self._fail(status, f"upstream refused the WebSocket upgrade (HTTP {status})", None)
            else:
                self._fail(502, "upstream did not accept the WebSocket upgrade", "reset")
            return
        self._switch(head, rest)

    def _switch(self, head: bytes, rest: bytes) -> None:
        side = self._upstream
        assert side is not None and side.out is not None
        upstream = side.out
        client = self._client_out = self.client.tunnel_open(self)
        client.write(head)
        if rest:
            self.req.body_out += len(rest)
            client.write(rest)
        client.register_producer(upstream.reading)
        upstream.register_producer(client.reading)
        client.reading.release(Hold.REQUEST)  # the early bytes are sent below
        self._open = True
        self._sessions.gauge(self.name, +1)
        early, self._early = self._early, []
        for data in early:
            self.from_client(data)
        self._arm(self._idle_timeout)

    # -- spliced -------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.touch()
        self.req.body_in += len(data)
        if self._upstream is not None and self._upstream.out is not None:
            self._upstream.out.write(data)

    def to_client(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.touch()
        self.req.body_out += len(data)
        if self._client_out is not None:
            self._client_out.write(data)

    def client_lost(self) -> None:
        """The client's connection closed after the switch."""
        was_open = self._open
        self._close()
        if self._upstream is not None and self._upstream.out is not None:
            self._upstream.out.close()
        if was_open:
            self.client.tunnel_closed()

    def cancel(self) -> None:
        """The client left before the switch: drop the upstream attempt."""
        if self._closed:
            return
        self._close()
        if self._connecting is not None:
            self._connecting.cancel()
        self._abort_upstream()

    def upstream_lost(self, reason: Failure) -> None:
        if self._open and not self._closed:
            # Let the client read what was relayed, then close.
            self._close_client()
        elif not self._closed and not self._ready:
            outcome = errors.classify(reason)  # TLS refused, cut mid-handshake
            self._fail(outcome.status, outcome.message, outcome.reason)
        elif not self._closed:
            self._fail(502, "upstream closed during the WebSocket handshake", "reset")
        self._close()

    # -- lifecycle ---------------------------------------------------------------------------

    def _close_client(self) -> None:
        if self._client_out is not None:
            self._client_out.close()

    def _abort_upstream(self) -> None:
        if self._upstream is not None and self._upstream.out is not None:
            self._upstream.out.abort()

    def _fail(self, status: int, message: str, reason: str | None) -> None:
        """The session never opened: answer the client with a JSON error."""
        if self._closed:
            return
        self._close()
        self.client.tunnel_failed(status, message, reason)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._counted:
            self._counted = False
            self._sessions.give_back()
        if self._open:
            self._open = False
            self._sessions.gauge(self.name, -1)
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = IdleTimer(self._clock, seconds, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self._closed:
            return
        if not self._open:
            # No connect or no handshake answer in time.
            self._timed_out = True
            if self._connecting is not None:
                self._connecting.cancel()
                return
            self._abort_upstream()
            if not self._ready:  # TLS handshake unfinished
                outcome = errors.CONNECT_TIMEOUT
                self._fail(outcome.status, outcome.message, outcome.reason)
                return
            self._fail(504, "upstream did not answer the WebSocket handshake in time", "timeout")
            return
        _log.info("closing idle WebSocket session to {upstream}", upstream=self.name)
        self._abort_upstream()
        self._close_client()
