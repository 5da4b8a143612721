"""Pure header rules: what goes upstream and what comes back.

RFC 9110 section 7.6.1: hop-by-hop fields, and every field the ``Connection``
header names, belong to one connection and are never forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers never copied from the client: hop-by-hop ones, the
#: credentials the proxy replaces, ``Host`` (the upstream's own is set),
#: ``Expect`` (answered here), ``Content-Length`` (the client side re-frames it).
_REQUEST_DROP = HOP_BY_HOP | {
    b"authorization",
    b"x-scope-orgid",
    b"host",
    b"expect",
    b"content-length",
    b"x-forwarded-for",
}

#: Response headers never copied back: hop-by-hop, plus ``Content-Length``
#: which the relay sets from the upstream's framing itself.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}


def connection_listed(values: Iterable[bytes] | None) -> frozenset[bytes]:
    """The lower-cased field names that ``Connection`` header values list."""
    if not values:
        return frozenset()
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return frozenset(names)


def forward_request_headers(
    incoming: Headers,
    *,
    host: bytes,
    authorization: bytes | None,
    tenant: bytes | None,
    client_address: bytes,
) -> Headers:
    """The headers the upstream gets for a client request. The client's
    credentials are dropped even where none are injected (None)."""
    listed = connection_listed(incoming.getRawHeaders(b"connection"))
    out = Headers()
    forwarded: list[bytes] = []
    for name, values in incoming.getAllRawHeaders():
        low = name.lower()
        if low == b"x-forwarded-for":
            forwarded.extend(values)
        elif low not in _REQUEST_DROP and low not in listed:
            out.setRawHeaders(name, list(values))
    forwarded.append(client_address)
    out.setRawHeaders(b"Host", [host])
    if authorization is not None:
        out.setRawHeaders(b"Authorization", [authorization])
    if tenant is not None:
        out.setRawHeaders(b"X-Scope-OrgID", [tenant])
    out.setRawHeaders(b"X-Forwarded-For", [b", ".join(forwarded)])
    return out


def copy_response_headers(upstream: Headers, out: Headers) -> None:
    """Copy an upstream response's end-to-end headers into ``out``."""
    listed = connection_listed(upstream.getRawHeaders(b"connection"))
    for name, values in upstream.getAllRawHeaders():
        low = name.lower()
        if low not in _RESPONSE_DROP and low not in listed:
            out.setRawHeaders(name, list(values))
