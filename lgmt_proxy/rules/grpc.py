"""OTLP over gRPC as OTLP over HTTP (pure): which HTTP path a gRPC method is,
the gRPC status an HTTP status becomes, the length-prefixed message framing
and the ``RetryInfo`` of a 429. No I/O; `dataplane.grpc_stream` applies it.

The request message of each OTLP ``Export`` method is byte for byte the body
OTLP/HTTP posts as ``application/x-protobuf``, and so is the response: the
bridge only reframes. Statuses follow the OTLP specification's table for
OTLP/HTTP failures, so that what OTLP/HTTP retries, gRPC retries too.
"""

from __future__ import annotations

import base64
import email.utils
import math
import time
from typing import Final

#: gRPC status codes used here (grpc/doc/statuscodes.md).
OK: Final = 0
UNKNOWN: Final = 2
INVALID_ARGUMENT: Final = 3
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
INTERNAL: Final = 13
UNIMPLEMENTED: Final = 12
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

#: The unary OTLP methods, by ``:path``, and the client path of OTLP/HTTP
#: they are routed as: exactly as a POST to ``/otlp/v1/...`` would be (the
#: otlp route, its upstream, its credentials and tenant). Not profiles'
#: ``ProfilesService/Export``: Grafana Cloud's OTLP gateway takes metrics,
#: logs and traces only (docs/configuration.md says where that is written).
METHODS: dict[bytes, bytes] = {
    b"/opentelemetry.proto.collector.trace.v1.TraceService/Export": b"/otlp/v1/traces",
    b"/opentelemetry.proto.collector.metrics.v1.MetricsService/Export": b"/otlp/v1/metrics",
    b"/opentelemetry.proto.collector.logs.v1.LogsService/Export": b"/otlp/v1/logs",
}

#: HTTP status (the upstream's, or a refusal's) to gRPC status. 408 is our own
#: refusal of a client that stopped sending its message.
_BY_HTTP = {
    400: INVALID_ARGUMENT,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    421: PERMISSION_DENIED,
    429: RESOURCE_EXHAUSTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

#: The 5-byte prefix of a gRPC message: compressed flag, 4-byte length.
PREFIX: Final = 5


#: The message encodings a call may use (grpc-encoding).
ENCODINGS: Final = (b"identity", b"gzip")


def call_problem(method: bytes, path: bytes, encoding: bytes) -> tuple[int, int, str] | None:
    """Why a gRPC call cannot be bridged (its HTTP status for the log, its
    gRPC status and message), or None: an unknown service or method, or a
    grpc-encoding we do not pass on."""
    if METHODS.get(path) is None or method != b"POST":
        return 404, UNIMPLEMENTED, "unknown service or method"
    if encoding and encoding not in ENCODINGS:
        return 415, UNIMPLEMENTED, "grpc-encoding not supported: identity, gzip"
    return None


#: grpc-timeout's units, in seconds (PROTOCOL-HTTP2.md: TimeoutUnit).
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_timeout(value: bytes) -> float | None:
    """A ``grpc-timeout`` value in seconds (PROTOCOL-HTTP2.md: at most 8
    ASCII digits, then one unit of ``HMSmun``), or None when it is malformed:
    the call then fails with INTERNAL before anything is sent, as grpc-go's
    server does (the specification itself says nothing of a bad value). A
    zero is accepted, as grpc-go does, and is a deadline already past."""
    digits = value[:-1]
    if not 1 <= len(digits) <= 8 or not digits.isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    if unit is None:
        return None
    return int(digits) * unit


def grpc_status(http_status: int) -> int:
    """The gRPC status for an HTTP answer. 2xx is OK; the OTLP table's
    statuses as listed; any other 5xx is INTERNAL (OTLP/HTTP does not retry
    it either), any other 4xx UNKNOWN (not retried)."""
    if 200 <= http_status < 300:
        return OK
    code = _BY_HTTP.get(http_status)
    if code is not None:
        return code
    return INTERNAL if http_status >= 500 else UNKNOWN


def retry_seconds(value: bytes | None, now: float | None = None) -> int | None:
    """Whole seconds from a ``Retry-After`` value (delta-seconds or an
    HTTP date), or None when it is absent or unreadable."""
    if not value:
        return None
    text = value.strip().decode("latin-1")
    if text.isdigit():
        return min(int(text), 86400)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0, min(math.ceil(when.timestamp() - now), 86400))


def retry_after(headers: list[tuple[bytes, bytes]]) -> int | None:
    """`retry_seconds` of an answer's ``Retry-After`` header, if any."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            return retry_seconds(value)
    return None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def retry_info(seconds: int) -> bytes:
    """``google.rpc.RetryInfo{retry_delay: Duration{seconds}}``, encoded."""
    duration = b"\x08" + _varint(seconds) if seconds else b""
    return _field(1, duration)


def status_details(code: int, message: str, retry: int | None) -> bytes:
    """``google.rpc.Status`` with a ``RetryInfo`` detail when ``retry`` is
    set: the value of ``grpc-status-details-bin`` (before base64)."""
    out = b"\x08" + _varint(code) if code else b""
    if message:
        out += _field(2, message.encode())
    if retry is not None:
        detail = _field(1, b"type.googleapis.com/google.rpc.RetryInfo") + _field(
            2, retry_info(retry)
        )
        out += _field(3, detail)
    return out


def binary_header(value: bytes) -> bytes:
    """A ``-bin`` metadata value: base64 without padding (gRPC's wire form)."""
    return base64.b64encode(value).rstrip(b"=")


def trailers(code: int, message: str, retry: int | None = None) -> list[tuple[bytes, bytes]]:
    """The trailers ending a call with ``code``: ``grpc-message``
    percent-encoded; for a retry delay both ``grpc-status-details-bin``
    (read by Go's collector) and ``google.rpc.retryinfo-bin`` (read by
    the OpenTelemetry Python and Java exporters)."""
    out = [(b"grpc-status", b"%d" % code)]
    if message:
        out.append((b"grpc-message", percent_encode(message)))
    if retry is not None:
        out.append(
            (b"grpc-status-details-bin", binary_header(status_details(code, message, retry)))
        )
        out.append((b"google.rpc.retryinfo-bin", binary_header(retry_info(retry))))
    return out


def percent_encode(text: str) -> bytes:
    """``grpc-message``'s encoding: UTF-8, every byte outside printable
    ASCII, and ``%`` itself, as ``%XX``."""
    return b"".join(
        bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode()
    )


def frame_message(payload: bytes) -> bytes:
    """One uncompressed gRPC message: the prefix and ``payload``."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class FramingError(Exception):
    """The request is not one well-framed unary message."""


class MessageReader:
    """Reads the one message of a unary call as it arrives: the prefix
    (`prefix`: whether it is compressed and its length, once the five bytes
    are in), then the message's bytes passed through, never gathered."""

    __slots__ = ("_head", "compressed", "left", "length")

    def __init__(self) -> None:
        self._head = b""
        self.compressed = False
        #: The declared length (None until the prefix is read).
        self.length: int | None = None
        #: Message bytes still to come.
        self.left = 0

    @property
    def done(self) -> bool:
        return self.length is not None and not self.left

    def feed(self, data: bytes) -> bytes:
        """The message bytes in ``data`` (after the prefix). Raises
        `FramingError` on a bad flag or bytes after the message."""
        if self.length is None:
            need = PREFIX - len(self._head)
            self._head += data[:need]
            data = data[need:]
            if len(self._head) < PREFIX:
                return b""
            flag = self._head[0]
            if flag > 1:
                raise FramingError("invalid message flag")
            self.compressed = flag == 1
            self.length = self.left = int.from_bytes(self._head[1:], "big")
        if len(data) > self.left:
            raise FramingError("more than one request message in a unary call")
        self.left -= len(data)
        return data
