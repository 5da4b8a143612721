"""The checks h2 makes on a received header list, in one compiled pass (pure).

The gRPC listener decodes a call's header block with h2's own HPACK decoder
and takes the HEADERS past h2's stream machinery; these functions refuse
exactly the lists h2 4.4.1 refuses as a server (``client_side=False``,
``validate_inbound_headers`` and ``normalize_inbound_headers`` on), where
h2 runs ``normalize_inbound_headers`` then ``validate_headers`` (seven
chained generators, about 5% of the gRPC path's CPU) and, before them,
``H2Stream._initialize_content_length``. tests/pure/test_h2check.py holds
the equivalence to h2 itself, by hypothesis.

Two effects of h2's normalization are kept on purpose: ``cookie`` fields are
moved to the end and joined with ``"; "`` before validation, so a cookie
among the pseudo-header fields does not end them, and the whitespace rule
applies to the joined value (a last empty cookie ends it with a space).

Cheap for the usual call: one pass, no generator, no regex; a name a gRPC
call usually sends is known by one dict look-up, any other name's bytes are
checked by one ``bytes.translate``, a value's by three ``memchr``.

A reason names the rule broken, never a value nor a received name (bytes a
client chose, which would land in the logs); no reason holds a secret.
What is not about the list stays the caller's: END_STREAM on trailers, the
header list's size (the decoder's), the body's length against
`content_length`.
"""

from __future__ import annotations

from typing import Final

#: Reasons: short, constant, no value or name from the request.
EMPTY_NAME: Final = "empty header name"
ILLEGAL_NAME: Final = "uppercase or illegal character in a header name"
ILLEGAL_VALUE: Final = "NUL, CR or LF in a header value"
WHITESPACE: Final = "header value starts or ends with whitespace"
CONNECTION_SPECIFIC: Final = "connection-specific header field"
BAD_TE: Final = "te other than trailers"
UNKNOWN_PSEUDO: Final = "unknown pseudo-header field"
DUPLICATE_PSEUDO: Final = "duplicate pseudo-header field"
LATE_PSEUDO: Final = "pseudo-header field after a regular field"
PSEUDO_IN_TRAILERS: Final = "pseudo-header field in trailers"
STATUS_IN_REQUEST: Final = ":status in a request"
NO_METHOD: Final = "no :method"
NO_SCHEME_PATH: Final = "no :scheme or no :path"
CONNECT_PATH: Final = "CONNECT with :scheme or :path"
PROTOCOL_NOT_CONNECT: Final = ":protocol without CONNECT"
EMPTY_PATH: Final = "empty :path"
NO_AUTHORITY: Final = "neither :authority nor host"
TWO_HOSTS: Final = "more than one host"
HOST_MISMATCH: Final = ":authority and host differ"
BAD_LENGTH: Final = "content-length is not a decimal number"
TWO_LENGTHS: Final = "conflicting content-length values"

#: The pseudo-header fields h2 knows, as bits of a set.
_METHOD: Final = 1
_SCHEME: Final = 2
_AUTHORITY: Final = 4
_PATH: Final = 8
_PROTOCOL: Final = 16
_STATUS: Final = 32
_SCHEME_PATH: Final = _SCHEME | _PATH
_PSEUDO: Final[dict[bytes, int]] = {
    b":method": _METHOD,
    b":scheme": _SCHEME,
    b":authority": _AUTHORITY,
    b":path": _PATH,
    b":protocol": _PROTOCOL,
    b":status": _STATUS,
}

#: Regular fields by kind: a rule of their own, or (``_PLAIN``) names a
#: gRPC call sends, known legal, whose bytes need no look (0: unknown name).
_PLAIN: Final = 1
_COOKIE: Final = 2
_HOST: Final = 3
_TE: Final = 4
_LENGTH: Final = 5
_HOP: Final = 6
_SPECIAL: Final[dict[bytes, int]] = {
    b"content-type": _PLAIN,
    b"user-agent": _PLAIN,
    b"grpc-accept-encoding": _PLAIN,
    b"grpc-encoding": _PLAIN,
    b"grpc-timeout": _PLAIN,
    b"authorization": _PLAIN,
    b"accept-encoding": _PLAIN,
    b"traceparent": _PLAIN,
    b"cookie": _COOKIE,
    b"host": _HOST,
    b"te": _TE,
    b"content-length": _LENGTH,
    # RFC 9113 8.2.2 (h2's CONNECTION_HEADERS).
    b"connection": _HOP,
    b"proxy-connection": _HOP,
    b"keep-alive": _HOP,
    b"transfer-encoding": _HOP,
    b"upgrade": _HOP,
}

#: 1 for each byte a regular field name may hold, else 0 (RFC 9113 8.2.1:
#: none of 0x00-0x20, 0x41-0x5a, 0x7f-0xff, and a colon only to start a
#: pseudo-header field). ``0 in name.translate(_NAME_TABLE)``: one C pass.
_NAME_TABLE: Final = bytes(
    1 if 0x21 <= c < 0x7F and not 0x41 <= c <= 0x5A and c != 0x3A else 0 for c in range(256)
)
_COLON: Final = 0x3A
_SP: Final = 0x20
_HTAB: Final = 0x09


class ContentLengthError(ValueError):
    """A content-length h2 refuses; the message is `BAD_LENGTH` or
    `TWO_LENGTHS`, never the value."""


def request_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why h2, as a server, would refuse this list as a request's HEADERS
    (a connection error, PROTOCOL_ERROR), or None when it would accept it."""
    return _problem(headers, False)


def trailers_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why h2, as a server, would refuse this list as a request's trailers,
    or None. h2 reads content-length in trailers too (and refuses one that
    is not a number), so this does."""
    return _problem(headers, True)


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's declared body length, or None without a content-length;
    `ContentLengthError` where h2 refuses one.

    h2 4.4.1 reads every content-length field (not only the first): each
    must be ``bytes.isdigit`` (ASCII digits, at least one) and parse with
    ``int(v, 10)``, which is RFC 9110 8.6's ``1*DIGIT``, and all must agree
    (RFC 9110 8.6 lets a recipient refuse differing values). Not stricter
    than h2 anywhere: leading zeros pass, a list such as ``5, 5`` is refused
    as h2 refuses it, and so is a number past Python's digit limit for
    ``int`` (4300 digits), h2's ``ValueError``. h2 skips the check for a
    HEAD request only where it sent that request itself, never as a server.
    """
    length = -1
    for name, value in headers:
        if name == b"content-length":
            n = _parse_length(value)
            if n < 0:
                raise ContentLengthError(BAD_LENGTH)
            if length >= 0 and n != length:
                raise ContentLengthError(TWO_LENGTHS)
            length = n
    return length if length >= 0 else None


def _parse_length(value: bytes) -> int:
    """h2's parse of one content-length value, or -1 where it refuses it."""
    if not value.isdigit():
        return -1
    try:
        return int(value, 10)
    except ValueError:  # past sys.get_int_max_str_digits()
        return -1


def _problem(headers: list[tuple[bytes, bytes]], trailers: bool) -> str | None:
    """One pass over the list for every check of h2's pipeline; the checks
    of the whole (required fields, cookies joined) after it."""
    seen = 0
    regular = False
    method = b""
    authority: bytes | None = None
    host: bytes | None = None
    cookies = 0
    first_cookie = b""
    last_cookie = b""
    length = -1
    for name, value in headers:
        if not name:
            return EMPTY_NAME
        # An int's membership is a memchr; a bytes one first fails (and
        # raises, inside CPython) as an int, three times slower.
        if value and (0 in value or 10 in value or 13 in value):
            return ILLEGAL_VALUE
        if name[0] == _COLON:
            if trailers:
                return PSEUDO_IN_TRAILERS
            if regular:
                return LATE_PSEUDO
            bit = _PSEUDO.get(name, 0)
            if bit == 0:
                return UNKNOWN_PSEUDO
            if seen & bit:
                return DUPLICATE_PSEUDO
            seen |= bit
            if bit == _METHOD:
                method = value
            elif bit == _AUTHORITY:
                authority = value
            elif bit == _PATH:
                if not value:
                    return EMPTY_PATH
            elif bit == _STATUS:
                return STATUS_IN_REQUEST
        else:
            kind = _SPECIAL.get(name, 0)
            if kind == _COOKIE:
                # Joined at the end by h2's normalization: not a regular
                # field here, and its whitespace is checked once joined.
                cookies += 1
                if cookies == 1:
                    first_cookie = value
                last_cookie = value
                continue
            regular = True
            if kind == 0:
                if 0 in name.translate(_NAME_TABLE):
                    return ILLEGAL_NAME
            elif kind == _HOST:
                if host is not None and not trailers:  # h2 checks hosts in requests only
                    return TWO_HOSTS
                host = value
            elif kind == _TE:
                if value.lower() != b"trailers":
                    return BAD_TE
            elif kind == _LENGTH:
                n = _parse_length(value)
                if n < 0:
                    return BAD_LENGTH
                if length >= 0 and n != length:
                    return TWO_LENGTHS
                length = n
            elif kind == _HOP:
                return CONNECTION_SPECIFIC
        if value:
            c = value[0]
            if c == _SP or c == _HTAB:
                return WHITESPACE
            c = value[-1]
            if c == _SP or c == _HTAB:
                return WHITESPACE
    if cookies:
        if first_cookie:
            c = first_cookie[0]
            if c == _SP or c == _HTAB:
                return WHITESPACE
        if last_cookie:
            c = last_cookie[-1]
            if c == _SP or c == _HTAB:
                return WHITESPACE
        elif cookies > 1:
            return WHITESPACE  # the joined value ends with "; "
    if trailers:
        return None
    return _request_whole(seen, method, authority, host)


def _request_whole(
    seen: int, method: bytes, authority: bytes | None, host: bytes | None
) -> str | None:
    """A request's pseudo-header fields together (RFC 9113 8.3.1, RFC 8441
    4, as h2 reads them) and its :authority against its host."""
    if not seen & _METHOD:
        return NO_METHOD
    connect = method == b"CONNECT"
    if connect and not seen & _PROTOCOL:
        if seen & _SCHEME_PATH:
            return CONNECT_PATH
    elif seen & _SCHEME_PATH != _SCHEME_PATH:
        return NO_SCHEME_PATH
    if not connect and seen & _PROTOCOL:
        return PROTOCOL_NOT_CONNECT
    if authority is None:
        if host is None:
            return NO_AUTHORITY
    elif host is not None and host != authority:
        return HOST_MISMATCH
    return None
