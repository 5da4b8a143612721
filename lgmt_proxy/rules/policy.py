"""Pure request policy for proxy routes: which methods pass, which browser
origins may send requests (WebSocket or not), which ``Host`` names are
served, and which tenant a consumer's request carries; and, for every
route, the one ``Host`` a request may have.

Everything here is a function of the request's facts (`facts.RequestFacts`,
gathered once in the header pass) and the configuration passed in; the
dispatch decision asks once per request and turns a `Refusal` into a JSON
answer. What llhttp already refuses (control bytes in
header values, unknown method tokens) never reaches this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.facts import RequestFacts

#: The methods the contract forwards; client-auth ``methods: "*"`` means these.
ALLOWED_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"})
_ALLOW = b"GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH"


_TWO_HOSTS = Refusal(400, "more than one Host header")


def normalise_origin(origin: str) -> str:
    """``Origin`` as compared: lower-case, no trailing ``/`` (RFC 6454 serialisation)."""
    return origin.strip().lower().rstrip("/")


def normalise_host(host: str) -> str:
    """A host name as compared: lower-case, no port, no trailing dot, IPv6 unbracketed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


@attrs.frozen
class Policy:
    """``ALLOWED_ORIGINS`` and ``ALLOWED_HOSTS``, normalised once."""

    origins: frozenset[bytes] = frozenset()
    hosts: frozenset[bytes] = frozenset()

    @classmethod
    def build(cls, origins: Iterable[str] = (), hosts: Iterable[str] = ()) -> Policy:
        return cls(
            frozenset(normalise_origin(o).encode() for o in origins),
            frozenset(normalise_host(h).encode() for h in hosts),
        )

    def check(self, facts: RequestFacts) -> Refusal | None:
        """Why a request on a proxy route is not forwarded, or None.

        TRACE would reflect the injected credentials (RFC 9110 section 9.3.8
        forbids them in it), so only the seven methods pass. A foreign
        ``Host`` is a DNS-rebinding page. Every request with an unlisted
        ``Origin`` is refused, not only WebSocket upgrades: upstreams answer
        ``Access-Control-Allow-Origin: *`` (a page could read the results)
        and a simple cross-origin POST needs no preflight (CSRF). Only
        browsers send ``Origin``. A second ``Origin`` is refused, so the one
        checked is the only one there is (a second ``Host`` was refused by
        `duplicate_host`, on every route, before this runs).
        """
        if facts.method not in ALLOWED_METHODS:
            return Refusal(405, "method not allowed", ((b"Allow", _ALLOW),))
        origins = facts.origins
        if origins is not None and len(origins) > 1:
            return Refusal(403, "more than one Origin header")
        if self.hosts:
            host = facts.host
            if host is None or normalise_host(host.decode("latin-1")).encode() not in self.hosts:
                return Refusal(421, "this host name is not served here (ALLOWED_HOSTS)")
        if origins and normalise_origin(origins[0].decode("latin-1")).encode() not in self.origins:
            return Refusal(403, "requests from this origin are not allowed (ALLOWED_ORIGINS)")
        return None


def duplicate_host(facts: RequestFacts) -> Refusal | None:
    """400 for a request with more than one ``Host`` (RFC 9112 section 3.2),
    on any route: a check reading one and a log or upstream reading another
    is how ``ALLOWED_HOSTS`` would be passed."""
    return _TWO_HOSTS if facts.host_count > 1 else None


def choose_tenant(tenants: Sequence[str], requested: Sequence[bytes] | None) -> bytes | Refusal:
    """The ``X-Scope-OrgID`` a consumer's request carries on a ``from_consumer``
    route: the one it asks for (its own ``X-Scope-OrgID``) if it is in its
    list, else the first of its list when it asks for none."""
    if not tenants:
        return Refusal(403, "this route needs a consumer with a tenant")
    if not requested:
        return tenants[0].encode()
    if len(requested) == 1:
        wanted = requested[0].strip()
        for tenant in tenants:
            if tenant.encode() == wanted:
                return wanted
    return Refusal(403, "X-Scope-OrgID names a tenant this consumer may not use")
