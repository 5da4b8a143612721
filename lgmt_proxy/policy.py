"""Pure request policy for proxy routes: which methods pass, which browser
origins may open a WebSocket, which ``Host`` names are served, and which
tenant a consumer's request carries.

Everything here is a function of the request head and the configuration
passed in; `server.ClientConnection` asks once per proxied request and turns
a `Refused` into a JSON answer. What llhttp already refuses (control bytes in
header values, unknown method tokens) never reaches this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from .headers import RawHeaders

#: The methods the contract forwards; client-auth ``methods: "*"`` means these.
ALLOWED_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"})
_ALLOW = b"GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH"


@attrs.frozen
class Refused:
    """A request the policy will not forward: status, short reason, extra headers."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


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

    def check(self, method: bytes, headers: RawHeaders, *, websocket: bool) -> Refused | None:
        """Why a request on a proxy route is not forwarded, or None.

        TRACE would reflect the injected credentials (RFC 9110 section 9.3.8
        forbids them in it), so only the seven methods pass. A foreign
        ``Host`` is a DNS-rebinding page; a browser's cross-origin WebSocket
        is not subject to CORS, so ``Origin`` is checked here.
        """
        if method not in ALLOWED_METHODS:
            return Refused(405, "method not allowed", ((b"Allow", _ALLOW),))
        if not self.hosts and not websocket:
            return None
        host: bytes | None = None
        origin: bytes | None = None
        for name, value in headers:
            low = name.lower()
            if low == b"host":
                host = value
            elif low == b"origin":
                origin = value
        if self.hosts and (
            host is None or normalise_host(host.decode("latin-1")).encode() not in self.hosts
        ):
            return Refused(421, "this host name is not served here (ALLOWED_HOSTS)")
        if websocket and origin is not None:
            if normalise_origin(origin.decode("latin-1")).encode() not in self.origins:
                return Refused(403, "WebSocket from this origin is not allowed (ALLOWED_ORIGINS)")
        return None


def choose_tenant(tenants: Sequence[str], requested: Sequence[bytes]) -> bytes | Refused:
    """The ``X-Scope-OrgID`` a consumer's request carries on a ``from_consumer``
    route: the one it asks for (its own ``X-Scope-OrgID``) if it is in its
    list, else the first of its list when it asks for none."""
    if not tenants:
        return Refused(403, "this route needs a consumer with a tenant")
    if not requested:
        return tenants[0].encode()
    if len(requested) == 1:
        wanted = requested[0].strip()
        for tenant in tenants:
            if tenant.encode() == wanted:
                return wanted
    return Refused(403, "X-Scope-OrgID names a tenant this consumer may not use")
