"""Answers the proxy gives itself, in one place: status phrases, JSON error
bodies, and failures of the upstream side turned into status, metric reason
and message.

The message is short and fixed per kind: never the exception's text, which can
carry hostnames with credentials, certificate dumps or tracebacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure


@attrs.define(frozen=True, auto_exc=False)
class Refusal(Exception):
    """A request the proxy answers itself instead of forwarding: its status,
    a short reason and any extra headers. Raised where a check runs deep (the
    target's rules), returned where a check is a pure function (the policy);
    equal by value either way."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


#: Reason phrases of the statuses the proxy answers itself.
REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reason(status: int) -> bytes:
    return REASONS.get(status, b"Error")


@attrs.frozen
class Outcome:
    """An answer for a failure; ``reason`` labels proxy_upstream_errors_total
    (connect, timeout, tls, reset or proxy here; client_abort and body_limit are set
    by the client side itself)."""

    status: int
    reason: str
    message: str


TIMEOUT = Outcome(504, "timeout", "upstream did not answer in time")
CONNECT_TIMEOUT = Outcome(504, "timeout", "upstream connection not established in time")
INVALID_RESPONSE = Outcome(502, "reset", "upstream sent an invalid response")
CLOSED = Outcome(502, "reset", "upstream closed the connection without answering")


class InvalidResponse(Exception):
    """The upstream's bytes are not an HTTP/1.1 response we can relay."""


def _is_tls(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("OpenSSL", "service_identity")) or "SSL" in type(exc).__name__


def causes(failure: Failure) -> list[BaseException]:
    """The failure's exception and, for wrapped failures, every cause inside."""
    exc = failure.value
    found: list[BaseException] = [exc] if exc is not None else []
    reasons = getattr(exc, "reasons", None)
    if reasons:
        for inner in reasons:
            if isinstance(inner, Failure):
                found.extend(causes(inner))
    return found


def classify(failure: Failure) -> Outcome:
    """Map a failure of the upstream side to what the client gets."""
    found = causes(failure)
    if any(_is_tls(c) for c in found):
        return Outcome(502, "tls", "upstream TLS verification failed")
    for exc in found:
        if isinstance(exc, InvalidResponse):
            return INVALID_RESPONSE
        if (status := getattr(exc, "proxy_status", None)) is not None:
            # The forward proxy refused CONNECT (407, 403, 502...).
            return Outcome(
                502, "proxy", f"forward proxy refused the connection ({status or 'not HTTP'})"
            )
        if isinstance(exc, ierror.TimeoutError):
            return CONNECT_TIMEOUT
        if isinstance(exc, CancelledError | ierror.ConnectingCancelledError):
            return TIMEOUT
        if isinstance(exc, ierror.DNSLookupError):
            return Outcome(502, "connect", "upstream host name did not resolve")
        if isinstance(exc, ierror.ConnectionRefusedError | ierror.ConnectError):
            return Outcome(502, "connect", "upstream refused the connection")
    if any(isinstance(c, ierror.ConnectionDone | ierror.ConnectionLost) for c in found):
        return CLOSED
    return Outcome(502, "reset", "upstream connection failed")


def cause_names(failure: Failure) -> str:
    """Exception type names for a log line (never their text)."""
    return ",".join(sorted({type(c).__name__ for c in causes(failure)}))


def json_error(message: str, upstream: str) -> bytes:
    return json.dumps({"error": message, "upstream": upstream}).encode() + b"\n"


def format_head(status: int, reason: bytes, lines: bytes, more: bytes = b"") -> bytes:
    """A response head, the one formatter of every answer (proxied, local,
    refused): status line (``reason``, else the status's phrase), the header
    lines (each ending in CRLF) and ``more`` of them, the blank line."""
    return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
        status,
        reason or REASONS.get(status, b"Error"),
        lines,
        more,
    )


def error_response(
    status: int,
    message: str,
    upstream: str = "none",
    *,
    close: bool = True,
    headers: Iterable[tuple[bytes, bytes]] = (),
    head_only: bool = False,
) -> bytes:
    """A whole HTTP/1.1 JSON error response, ready to write."""
    body = json_error(message, upstream)
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    lines = b"Content-Type: application/json\r\nContent-Length: %d\r\n%s" % (len(body), extra)
    head = format_head(status, b"", lines, b"Connection: close\r\n" if close else b"")
    return head if head_only else head + body
