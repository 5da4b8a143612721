"""Acting on each request of one client connection: its path matched
(`RouteTable.match`), the pure decision taken (`rules.dispatch.decide`),
then a refusal, a local answer, an `Exchange` (proxied, its body streamed
under ``MAX_REQUEST_BODY_BYTES``) or a `Tunnel` (WebSocket).

A refusal is a JSON error the proxy answers itself. There are three ways to
give one, by what can still be read of the request:

- `Dispatcher.refuse_after_body`: the request broke a rule (policy, client
  auth, limits) and is framed: its body is read and dropped first, so the
  connection can carry the next request (and closing with unread input would
  reset it under the answer).
- `ResponseWriter.refuse_now`: the active request is answered at once,
  nothing more is waited for: the body is already in, or its handler
  (exchange, tunnel) failed and the connection closes if the body is not.
- `ClientConnection.close_refusing`: the input cannot be framed (llhttp
  refused it, a head limit, a head or body timeout): the answer goes out and
  the connection closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from lgmt_proxy.dataplane.exchange import Exchange
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.dataplane.resources import RouteMatch
from lgmt_proxy.dataplane.response import ResponseWriter
from lgmt_proxy.dataplane.tunnel import Sessions, Tunnel, TunnelClient
from lgmt_proxy.dataplane.upstream import Upstream
from lgmt_proxy.io.sending import SendQueue
from lgmt_proxy.io.timers import IdleTimer
from lgmt_proxy.limits.budget import Limits, Verdict, budget_refusal
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.obs.record import Recorder
from lgmt_proxy.rules import errors
from lgmt_proxy.rules.dispatch import Decision, Proxy, Refuse, ServeLocal, decide, read_target
from lgmt_proxy.rules.dispatch import Tunnel as OpenTunnel
from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.policy import Policy
from lgmt_proxy.rules.routes import Local, Proxied, RouteTable, upstream_target

#: Bytes of an unwanted request body (refused) read and thrown away before the
#: connection is closed instead.
DISCARD_LIMIT = 64 * 1024 * 1024

#: Methods whose request, without a body, may be sent again on a fresh
#: connection when a reused one drops before answering.
RETRY_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS"})

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Shared(Protocol):
    """What the requests of every connection of one listener share (the
    `ProxyFactory`)."""

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def sends(self) -> SendQueue: ...

    @property
    def routes(self) -> RouteTable[RouteMatch]: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def client_auth(self) -> Callable[[], Any] | None: ...

    @property
    def budgets(self) -> BudgetKeeper: ...

    @property
    def recorder(self) -> Recorder: ...

    @property
    def max_body(self) -> int: ...

    @property
    def upstream_timeout(self) -> float: ...

    @property
    def websockets(self) -> Sessions: ...

    @property
    def websocket_idle_timeout(self) -> float: ...

    def log_upstream_failure(
        self, upstream: str, outcome: errors.Outcome, failure: Failure
    ) -> None: ...


class Connection(TunnelClient, Protocol):
    """What the dispatcher asks of the client connection it acts for (and
    a tunnel of it)."""

    handler: Exchange | Tunnel | None

    def close_now(self) -> None: ...

    def hold_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Dispatcher:
    """Acts on the decision for each request of one connection (see the
    module docstring); one per connection."""

    __slots__ = ("_charge", "_conn", "_shared", "_upstream_timer", "_writer")

    def __init__(self, conn: Connection, shared: Shared, writer: ResponseWriter) -> None:
        self._conn = conn
        self._shared = shared
        self._writer = writer
        #: UPSTREAM_TIMEOUT_SECONDS for each exchange in turn (one timer call
        #: for many keep-alive requests).
        self._upstream_timer = IdleTimer(shared.clock, shared.upstream_timeout)
        #: The consumer and byte budget a chunked body is charged to as it streams.
        self._charge: tuple[str, Limits] | None = None

    def close(self) -> None:
        """The connection is gone."""
        self._upstream_timer.cancel()

    def start(self, req: Incoming) -> None:
        """Answer ``req`` (the writer has begun it): match, decide, act."""
        try:
            req.path, req.query = read_target(req.method, req.target)
        except Refusal as refusal:
            self.refuse_after_body(refusal.status, refusal.message)
            return
        shared = self._shared
        match = shared.routes.match(req.path)
        auth = shared.client_auth
        decision = decide(req, match, shared.policy, None if auth is None else auth().authenticate)
        self._charge = None
        if isinstance(decision, Refuse) or not decision.limits.limited:
            _ACTIONS[type(decision)](self, req, match, decision)
            return
        # The consumer's budgets, last: at once without Redis, and with it
        # while the consumer's lease covers the request; else the body waits
        # (reading held, bytes already read kept) until Redis answers or
        # the deadline passes.
        budgets, name = shared.budgets, decision.consumer or ""
        if req.upgrade:
            # The parser stops at an upgrade's head (a WebSocket, or h2c
            # served as HTTP/1.1) and hands the connection over at once: no
            # waiting for Redis here, this replica's budgets decide.
            self._budgeted(req, match, decision, budgets.check_now(name, decision.limits, None))
            return
        verdict = budgets.check(name, decision.limits, req.length)
        if not isinstance(verdict, Deferred):
            self._budgeted(req, match, decision, verdict)
            return
        conn, writer = self._conn, self._writer
        conn.hold_reading()
        if req.buffered is None and not req.complete:
            req.buffered = []

        def decided(verdict: Verdict) -> None:
            if writer.req is not req:
                return  # the client went away meanwhile
            conn.resume_reading()
            self._budgeted(req, match, decision, verdict)

        verdict.addCallback(decided)

    def _budgeted(
        self, req: Incoming, match: RouteMatch, decision: Proxy | OpenTunnel | ServeLocal,
        verdict: Verdict,
    ) -> None:  # fmt: skip
        """Act on a decision its consumer's budgets answered: 429 with
        ``Retry-After`` past one (413 for a body larger than the whole byte
        burst: no wait makes it fit), nothing upstream, and a declared body
        not waited for; a chunked body is charged as it streams."""
        name, limits = decision.consumer or "", decision.limits
        if verdict.allowed:
            if req.chunked and limits.bytes is not None:
                self._charge = (name, limits)
            _ACTIONS[type(decision)](self, req, match, decision)
            return
        refusal = budget_refusal(name, verdict, limits, req.length)
        tenant = None if isinstance(decision, ServeLocal) else decision.tenant
        # A declared body that does not fit is refused before it is read.
        self.refuse(req, match, Refuse(refusal, name, tenant), at_once=bool(req.length))

    # -- the four decisions (one each) -----------------------------------------------

    def refuse(
        self, req: Incoming, match: RouteMatch, decision: Refuse, *, at_once: bool = False
    ) -> None:
        """``at_once``: a declared body is not waited for (a budget it does
        not fit): answered now, the connection lingers, then closes."""
        if decision.routed:
            req.upstream_name = match.upstream_name
            if isinstance(match, Local):
                req.quiet = match.quiet
            else:
                req.counted = True
        req.consumer = decision.consumer
        req.tenant = decision.tenant
        refusal = decision.refusal
        answer = self.refuse_unread if at_once else self.refuse_after_body
        answer(refusal.status, refusal.message, list(refusal.headers))

    def serve_local(self, req: Incoming, match: Local[IResource], decision: ServeLocal) -> None:
        req.upstream_name = match.upstream_name
        req.quiet = match.quiet
        req.consumer = decision.consumer
        resource = match.resource
        writer = self._writer
        self.when_complete(req, lambda: writer.render_local(req, resource))

    def open_tunnel(self, req: Incoming, match: Proxied[Upstream], decision: OpenTunnel) -> None:
        if not self._forwarding(req, match, decision.consumer, decision.tenant):
            return
        shared = self._shared
        tunnel = Tunnel(
            self._conn,
            req,
            match.route,
            match.upstream,
            clock=shared.clock,
            sends=shared.sends,
            sessions=shared.websockets,
            handshake_timeout=shared.upstream_timeout,
            idle_timeout=shared.websocket_idle_timeout,
        )
        self._conn.handler = tunnel
        self.when_complete(req, tunnel.start)

    def _forwarding(
        self, req: Incoming, match: Proxied[Upstream], consumer: str | None, tenant: bytes | None
    ) -> bool:
        """Counted from here on; False if the declared body is over the limit (413)."""
        req.upstream_name = match.route.upstream_name
        req.counted = True
        req.consumer = consumer
        req.tenant = tenant
        req.in_flight = True
        shared = self._shared
        shared.recorder.started(req)
        limit = shared.max_body
        if limit and req.length is not None and req.length > limit:
            # Answered at once, not after up to 64 MiB of a body that will be
            # thrown away: a client waiting for an early answer gets it, and
            # the connection closes after a brief linger.
            req.note_error("body_limit")
            self.refuse_unread(413, "request body too large")
            return False
        return True

    def proxy(self, req: Incoming, match: Proxied[Upstream], decision: Proxy) -> None:
        if not self._forwarding(req, match, decision.consumer, decision.tenant):
            return
        writer = self._writer
        if req.upgrade:
            # Other upgrades (h2c) are not offered: served as plain HTTP/1.1,
            # and the connection closes after (the parser stopped at the head).
            writer.close_after()
        upstream = match.upstream
        has_body = req.chunked or bool(req.length)
        target = upstream_target(match.route, upstream.base_path, req.path, req.query)
        headers, req.gzip = upstream.forward(
            req.method, target, req.headers, self._conn.client_host, req.tenant, has_body
        )
        exchange = Exchange(
            writer,
            upstream,
            self._upstream_timer,
            method=req.method,
            target=target,
            headers=headers,
            length=req.length,
            chunked=req.chunked,
            retry_safe=req.method in RETRY_SAFE and not has_body,
            log_failure=self._shared.log_upstream_failure,
            gzip=req.gzip,
        )
        self._conn.handler = exchange
        if not has_body:
            # Nothing to stream: the head goes out alone, no producer set up.
            if not req.complete:
                req.on_complete = _nothing
            exchange.body_end()
            exchange.start()
            return
        if not req.complete:
            if req.expect_continue and req.version == "1.1":
                writer.out.write(_CONTINUE)
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
        req = self._writer.req
        exchange = self._conn.handler
        if req is None or not isinstance(exchange, Exchange):
            return
        limit = self._shared.max_body
        if limit and req.body_in > limit:
            req.note_error("body_limit")
            self._conn.handler = None
            exchange.cancel()
            req.on_body = None
            req.on_complete = None
            if self._writer.started:
                self._conn.close_now()
            else:
                self.refuse_after_body(413, "request body too large")
            return
        charge = self._charge
        if charge is not None:
            self._shared.budgets.charge(charge[0], charge[1], len(data))
        exchange.body(data)

    # -- refusals and bodies nobody reads -----------------------------------------------

    def refuse_after_body(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Refuse the active request with a JSON error once its body is in."""
        writer = self._writer
        req = writer.req
        if req is None:
            return
        self._conn.handler = None

        def answer() -> None:
            if writer.req is req:
                writer.refuse_now(status, message, headers)

        self.when_complete(req, answer)

    def refuse_unread(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Refuse the active request now, without reading a body it declared
        (over a limit or a budget): the connection lingers, then closes. A
        body already in is answered as `refuse_after_body` answers it."""
        writer = self._writer
        req = writer.req
        if req is None:
            return
        if req.complete:
            self.refuse_after_body(status, message, headers)
            return
        self._conn.handler = None
        req.buffered = None
        writer.linger_after()
        writer.refuse_now(status, message, headers)

    def when_complete(self, req: Incoming, then: Callable[[], None]) -> None:
        """Run ``then`` once the request's body is in (read and dropped)."""
        req.buffered = None  # nobody reads this body
        if req.complete:
            then()
            return
        writer = self._writer
        if req.expect_continue:
            # Not worth a 100 Continue: answer now, the body is never read.
            writer.close_after()
            then()
            return

        def discard(data: bytes) -> None:
            if req.body_in > DISCARD_LIMIT:
                req.on_body = None
                writer.close_after()
                req.on_complete = None
                then()

        req.on_body = discard
        req.on_complete = then


def _nothing() -> None:
    pass


#: How a dispatcher acts on each kind of decision (one lookup per request).
_ACTIONS: dict[type[Decision], Callable[[Dispatcher, Incoming, Any, Any], None]] = {
    Proxy: Dispatcher.proxy,
    Refuse: Dispatcher.refuse,
    ServeLocal: Dispatcher.serve_local,
    OpenTunnel: Dispatcher.open_tunnel,
}
