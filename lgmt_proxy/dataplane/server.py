"""The main listener's factory: one `ClientConnection` per accepted
connection, up to ``MAX_CONNECTIONS`` (past it a 503 and the close), and
everything its connections share: the route table, the policy, client auth,
limits, the clock and the recorder."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from lgmt_proxy.dataplane.inbound import ClientConnection
from lgmt_proxy.dataplane.resources import route_table
from lgmt_proxy.dataplane.tunnel import Sessions
from lgmt_proxy.io.sending import SendQueue
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.obs.record import Recorder
from lgmt_proxy.rules import errors
from lgmt_proxy.rules.policy import Policy

if TYPE_CHECKING:
    from lgmt_proxy.config.clientauth import ClientAuth

_log = Logger(namespace="lgmt_proxy.server")


class _RefuseConnection(Protocol):
    """Answers a connection past MAX_CONNECTIONS with 503 and hangs up."""

    def __init__(self, sends: SendQueue) -> None:
        self._sends = sends

    def connectionMade(self) -> None:
        out = self._sends.install(self)
        out.write(errors.error_response(503, "too many connections"))
        out.close()


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
        budgets: BudgetKeeper | None = None,
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
        #: Consumers' budgets: this replica's own unless the service shares them.
        self.budgets = budgets if budgets is not None else BudgetKeeper(LocalLimiter(clock))
        self.websocket_idle_timeout = websocket_idle_timeout
        self.websockets = Sessions(max_websockets, recorder.websocket)
        self.connections: set[ClientConnection] = set()
        #: From SIGTERM on: every response says ``Connection: close``.
        self.draining = False

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if len(self.connections) >= self.max_connections:
            self.recorder.refused(
                503,
                getattr(addr, "host", "unknown"),
                "too many connections",
                bytes_out=len(errors.json_error("too many connections", "none")),
            )
            return _RefuseConnection(self.sends)
        return ClientConnection(self)

    def log_upstream_failure(
        self, upstream: str, outcome: errors.Outcome, failure: Failure
    ) -> None:
        # The outcome's message is our own fixed text (a forward proxy's
        # refusal carries its status there), never the exception's.
        _log.warn(
            "upstream {upstream} failed: {reason}: {message} ({causes})",
            upstream=upstream,
            reason=outcome.reason,
            message=outcome.message,
            causes=errors.cause_names(failure),
        )
