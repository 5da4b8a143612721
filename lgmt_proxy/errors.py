"""Failures turned into answers, in one place: status, metric reason, message.

The message is short and fixed per kind: never the exception's text, which can
carry hostnames with credentials, certificate dumps or tracebacks.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web import _newclient


@attrs.frozen
class Outcome:
    """An answer for a failure; ``reason`` labels proxy_upstream_errors_total
    (connect, timeout, tls or reset here; client_abort and body_limit are set
    by the request itself)."""

    status: int
    reason: str
    message: str


TIMEOUT = Outcome(504, "timeout", "upstream did not answer in time")


def _is_tls(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("OpenSSL", "service_identity")) or "SSL" in type(exc).__name__


def _causes(failure: Failure) -> list[BaseException]:
    exc = failure.value
    found: list[BaseException] = [exc] if exc is not None else []
    reasons = getattr(exc, "reasons", None)
    if reasons:
        for reason in reasons:
            if isinstance(reason, Failure):
                found.extend(_causes(reason))
    return found


def classify(failure: Failure) -> Outcome:
    """Map a failure from the upstream client to what the client gets."""
    causes = _causes(failure)
    if any(_is_tls(c) for c in causes):
        return Outcome(502, "tls", "upstream TLS verification failed")
    for exc in causes:
        if isinstance(exc, ierror.TimeoutError | CancelledError | ierror.ConnectingCancelledError):
            return TIMEOUT
        if isinstance(exc, ierror.DNSLookupError):
            return Outcome(502, "connect", "upstream host name did not resolve")
        if isinstance(exc, ierror.ConnectionRefusedError | ierror.ConnectError):
            return Outcome(502, "connect", "upstream refused the connection")
    if isinstance(failure.value, _newclient.ResponseNeverReceived | _newclient.RequestNotSent):
        return Outcome(502, "reset", "upstream closed the connection without answering")
    return Outcome(502, "reset", "upstream connection failed")


def json_error(message: str, upstream: str) -> bytes:
    return json.dumps({"error": message, "upstream": upstream}).encode() + b"\n"
