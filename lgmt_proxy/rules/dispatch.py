"""What to do with a request, decided from its facts and what its path
matched: refuse it, answer it here, proxy it or open a WebSocket tunnel.

Today's checks in today's order: ``CONNECT`` and the target's rules
(`read_target`), then `decide`: more than one ``Host`` (any path), and on a
route the policy (405, 403, 421, 403), then client authentication (401, 403,
tenant 403; only with ``CLIENT_AUTH_FILE``, and on a local path only where
a consumer must be named, /metrics). A decision to serve carries the
consumer's budgets (`Limits`): they have state, may be shared through Redis
and so answer later, and the caller asks them last, as the rate limiter
always was. The caller applies the decision; nothing here touches a
connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs

from lgmt_proxy.limits.budget import NO_LIMITS, Limits
from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.facts import RequestFacts
from lgmt_proxy.rules.policy import Policy, choose_tenant, duplicate_host
from lgmt_proxy.rules.routes import Local, Proxied, split_target

_CHALLENGE = ((b"WWW-Authenticate", b'Bearer realm="lgmt-proxy", Basic realm="lgmt-proxy"'),)
_CONNECT = Refusal(400, "CONNECT is not supported: this is not a forward proxy")


class Member(Protocol):
    """A consumer of ``CLIENT_AUTH_FILE`` as the decision reads it."""

    @property
    def name(self) -> str: ...

    @property
    def tenants(self) -> Sequence[str]: ...

    @property
    def limits(self) -> Limits: ...

    def allows(self, method: bytes, path: bytes) -> bool: ...


C = TypeVar("C", bound=Member)


@attrs.frozen
class Refuse:
    """Answer ``refusal`` as a JSON error. ``routed``: the path was matched
    first (the error names its upstream); ``consumer`` and ``tenant``: who
    was authenticated, and the tenant chosen, before the refusal."""

    refusal: Refusal
    consumer: str | None = None
    tenant: bytes | None = None
    routed: bool = True


@attrs.frozen
class ServeLocal:
    """Answer from the matched local resource (/health, /metrics, a 404)."""

    consumer: str | None = None
    #: The consumer's budgets, asked before acting.
    limits: Limits = NO_LIMITS


@attrs.frozen
class Proxy:
    """Forward to the matched route's upstream; ``tenant``: the consumer's,
    on a ``from_consumer`` route."""

    consumer: str | None = None
    tenant: bytes | None = None
    limits: Limits = NO_LIMITS


@attrs.frozen
class Tunnel:
    """A WebSocket upgrade on a route: our own handshake, then a splice."""

    consumer: str | None = None
    tenant: bytes | None = None
    limits: Limits = NO_LIMITS


Decision = Refuse | ServeLocal | Proxy | Tunnel

# Without client authentication nearly every decision is one of these.
_LOCAL = ServeLocal()
_PROXY = Proxy()
_TUNNEL = Tunnel()


def read_target(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """``(path, query)`` of an origin-form target, or raise `Refusal`:
    ``CONNECT`` first (this is no forward proxy), then `split_target`."""
    if method == b"CONNECT":
        raise _CONNECT
    return split_target(target)


def decide(
    facts: RequestFacts,
    match: Proxied[Any] | Local[Any],
    policy: Policy,
    authenticate: Callable[[Sequence[bytes] | None], C | None] | None,
) -> Decision:
    """The decision for a request whose target passed `read_target`.
    ``authenticate`` is None without client authentication."""
    two_hosts = duplicate_host(facts)
    if two_hosts is not None:
        return Refuse(two_hosts, routed=False)
    if isinstance(match, Local):
        if not match.consumers_only or authenticate is None:
            return _LOCAL
        # /metrics names the consumers: with client auth on, only for a
        # consumer allowed it (else --admin-listen).
        checked = _check_client(facts, authenticate, tenant_from_consumer=False)
        if isinstance(checked, Refuse):
            return checked
        return ServeLocal(checked[0], checked[2])
    refused = policy.check(facts)
    if refused is not None:
        return Refuse(refused)
    if authenticate is None:
        return _TUNNEL if facts.websocket else _PROXY
    checked = _check_client(facts, authenticate, match.route.tenant_from_consumer)
    if isinstance(checked, Refuse):
        return checked
    consumer, tenant, limits = checked
    if facts.websocket:
        return Tunnel(consumer, tenant, limits)
    return Proxy(consumer, tenant, limits)


def _check_client(
    facts: RequestFacts,
    authenticate: Callable[[Sequence[bytes] | None], C | None],
    tenant_from_consumer: bool,
) -> Refuse | tuple[str, bytes | None, Limits]:
    """Client auth: 401 or 403, else the consumer's name, on a
    ``from_consumer`` route the tenant it sends, and its budgets."""
    consumer = authenticate(facts.authorization)
    if consumer is None:
        return Refuse(Refusal(401, "missing or invalid client credentials", _CHALLENGE))
    name = consumer.name
    if not consumer.allows(facts.method, facts.path):
        method = facts.method.decode("latin-1")
        return Refuse(Refusal(403, f"consumer {name} may not {method} this path"), name)
    tenant: bytes | None = None
    if tenant_from_consumer:
        chosen = choose_tenant(consumer.tenants, facts.orgids)
        if isinstance(chosen, Refusal):
            return Refuse(Refusal(chosen.status, f"consumer {name}: {chosen.message}"), name)
        tenant = chosen
    return name, tenant, consumer.limits
