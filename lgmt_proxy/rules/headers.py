"""Pure header rules: what goes upstream and what comes back.

Headers are lists of raw ``(name, value)`` pairs, in the order they came, as
the parser hands them over: no case-folding dictionary per request.

RFC 9110 section 7.6.1: hop-by-hop fields, and every field the ``Connection``
header names, belong to one connection and are never forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable

RawHeaders = list[tuple[bytes, bytes]]

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
#: ``Expect`` (answered here), ``Content-Length`` (the proxy re-frames it).
_REQUEST_DROP = HOP_BY_HOP | {
    b"authorization",
    b"x-scope-orgid",
    b"host",
    b"expect",
    b"content-length",
    b"x-forwarded-for",
}

#: Every request header the proxy treats specially: framing
#: (``Content-Length``, ``Transfer-Encoding``), hop-by-hop, ``Host``, the
#: ``Forwarded`` family and the injected credentials. A client header whose
#: name reads as one of these once ``_`` is read as ``-`` (``Transfer_Encoding``,
#: ``X_Scope_OrgID``) is dropped: an upstream or gateway that maps ``_`` to
#: ``-`` (CGI/WSGI style) would take it for framing or beside the injected
#: one. Only dashed names have such look-alikes, so only they are kept here.
_LOOK_ALIKE_OF = frozenset(
    name
    for name in _REQUEST_DROP
    | {b"forwarded", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port"}
    if b"-" in name
)

#: Response headers never copied back: hop-by-hop, plus ``Content-Length``
#: which the proxy sets from the upstream's framing itself.
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


#: What the one ``Connection`` value nearly every peer sends lists beyond
#: the hop-by-hop fields (the answer of `_also_listed` without a split).
_USUAL_LISTED: dict[bytes, frozenset[bytes]] = {
    b"keep-alive": frozenset(),
    b"close": frozenset({b"close"}),
}


def _also_listed(values: list[bytes] | None) -> frozenset[bytes]:
    """What ``Connection`` lists beyond the hop-by-hop fields, dropped anyway
    (``keep-alive`` and ``close``, nearly always: then nothing more to do)."""
    if not values:
        return frozenset()
    if len(values) == 1:
        usual = _USUAL_LISTED.get(values[0].lower())
        if usual is not None:
            return usual
    return connection_listed(values) - HOP_BY_HOP


def forward_request_headers(
    incoming: RawHeaders,
    *,
    host: bytes,
    authorization: bytes | None,
    tenant: bytes | None,
    client_address: bytes,
    content_encoding: bytes | None = None,
) -> RawHeaders:
    """The headers the upstream gets for a client request. The client's
    credentials are dropped even where none are injected (None), and so are
    ``_`` look-alikes of every header treated specially (``_LOOK_ALIKE_OF``).
    The ``Connection``-listed filter sees the client's headers only: what
    the proxy injects is added after it, once, so nothing a client sends can
    remove or duplicate it (``Connection: host`` once left the upstream
    without a ``Host``). ``content_encoding``: the proxy encodes the body
    (gzip), in place of the client's ``Content-Encoding`` (``identity``)."""
    connection: list[bytes] | None = None
    kept: RawHeaders = []
    forwarded: list[bytes] = []
    drop = _REQUEST_DROP
    for name, value in incoming:
        low = name.lower()
        if low in drop:
            if low == b"x-forwarded-for":
                forwarded.append(value)
            elif low == b"connection":
                connection = [value] if connection is None else [*connection, value]
            continue
        if b"_" in low and low.replace(b"_", b"-") in _LOOK_ALIKE_OF:
            continue
        kept.append((name, value))
    listed = _also_listed(connection)
    if listed:
        kept = [(n, v) for n, v in kept if n.lower() not in listed]
        if b"x-forwarded-for" in listed:
            forwarded = []  # the client's hop-by-hop chain; the proxy's own entry stays
    if content_encoding is not None:
        kept = [(n, v) for n, v in kept if n.lower() != b"content-encoding"]
        kept.append((b"Content-Encoding", content_encoding))
    out: RawHeaders = [(b"Host", host), *kept]
    if authorization is not None:
        out.append((b"Authorization", authorization))
    if tenant is not None:
        out.append((b"X-Scope-OrgID", tenant))
    forwarded.append(client_address)
    out.append((b"X-Forwarded-For", b", ".join(forwarded)))
    return out


def response_headers(upstream: RawHeaders) -> RawHeaders:
    """An upstream response's end-to-end headers, for the client."""
    out: RawHeaders = []
    connection: list[bytes] | None = None
    drop = _RESPONSE_DROP
    for name, value in upstream:
        low = name.lower()
        if low in drop:
            if low == b"connection":
                connection = [value] if connection is None else [*connection, value]
            continue
        out.append((name, value))
    listed = _also_listed(connection)
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out


def response_lines(upstream: RawHeaders) -> bytes:
    """`head_lines` of `response_headers`: one pass, no list of pairs, when
    the upstream's ``Connection`` lists nothing more than the usual."""
    lines: list[bytes] = []
    connection: list[bytes] | None = None
    drop = _RESPONSE_DROP
    for name, value in upstream:
        low = name.lower()
        if low in drop:
            if low == b"connection":
                connection = [value] if connection is None else [*connection, value]
            continue
        lines.append(name + b": " + value + b"\r\n")
    if connection is not None and _also_listed(connection):
        return head_lines(response_headers(upstream))
    return b"".join(lines)


def head_lines(headers: RawHeaders) -> bytes:
    """``name: value\\r\\n`` for each header, joined."""
    return b"".join([n + b": " + v + b"\r\n" for n, v in headers])
