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
from typing import Final, NamedTuple

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


#: What a client sends first (RFC 9113, section 3.4), before any frame.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Frame types and flags the splitter reads.
DATA: Final = 0
HEADERS: Final = 1
SETTINGS: Final = 4
PUSH_PROMISE: Final = 5
CONTINUATION: Final = 9
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
#: The largest header block in more than one frame: h2 holds all of it
#: (up to 64 CONTINUATION frames) before decoding, so 64 frames of 16 KiB,
#: its bound before the frames could be 64 KiB.
MAX_BLOCK: Final = 64 * 16384
#: SETTINGS_MAX_FRAME_SIZE's initial value (RFC 9113, section 6.5.2).
MIN_MAX_FRAME: Final = 16384


class SplitError(Exception):
    """What the splitter refuses itself: a connection error, ``error_code``."""

    error_code: Final = 1  # PROTOCOL_ERROR


class HeaderBlockError(SplitError):
    """A header block over `MAX_BLOCK` (PROTOCOL_ERROR, as h2's own
    CONTINUATION backlog): its header list is far over the limit anyway."""


class PrefaceError(SplitError):
    """The client's connection preface does not go on with SETTINGS (RFC
    9113, section 3.4: a connection error PROTOCOL_ERROR; h2 does not check
    it)."""


class DataFrame(NamedTuple):
    """Whole DATA frames of one stream, received one after the other: the
    stream, the last one's flags (-1: its padding is invalid), the bytes
    they carry (padding stripped), the length that counts against the
    windows, and each frame as received (views of the reads, for h2 when
    the bridge does not take them itself: `raw`)."""

    stream_id: int
    flags: int
    payload: bytes
    length: int
    frames: list[bytes | memoryview]

    @property
    def raw(self) -> bytes:
        """The frames as received."""
        return b"".join(self.frames)


class FrameSplitter:
    """Cuts what a client connection sends into runs of whole frames for h2
    and whole DATA frames apart, in order, so that the bridge can take a
    call's DATA itself: h2 parses every frame it is given in Python and
    formats each one for a debug log it never writes (the whole DATA payload
    hexlified), most of the gRPC path's CPU. Consecutive DATA frames of one
    stream come as one `DataFrame` (a read of 64 KiB is one call's data,
    not four), their payloads copied once (views of the read, joined). A
    partial frame waits for the rest and is completed apart, not joined to
    the whole next read; a frame declared over ``max_frame`` (and
    everything after it) goes to h2 at once, which refuses it, so no more
    than one frame is held.

    What h2 must judge stays h2's: between a HEADERS (or PUSH_PROMISE)
    without END_HEADERS and the CONTINUATION ending it, every frame goes to
    h2 (a DATA there is its connection error, RFC 9113 section 6.10). The
    first frame after the preface must be SETTINGS (`PrefaceError`).

    ``max_frame`` is ours (SETTINGS_MAX_FRAME_SIZE): in force from the
    client's first SETTINGS acknowledgement on, 16 KiB before it. The
    acknowledgement ends a run, so that h2 takes it (and raises its own
    limit) before the frames after it."""

    __slots__ = ("_acked", "_block", "_block_size", "_held", "_preface", "_settings")

    def __init__(self) -> None:
        #: The start of a frame not yet whole.
        self._held = b""
        self._preface = len(PREFACE)
        #: The client's SETTINGS is still to come (the preface's end).
        self._settings = True
        #: A header block is open: frames go to h2 until its END_HEADERS.
        self._block = False
        #: The open header block's bytes so far (`MAX_BLOCK`).
        self._block_size = 0
        #: The client has acknowledged our SETTINGS: ``max_frame`` holds.
        self._acked = False

    def split(self, data: bytes, max_frame: int) -> list[bytes | DataFrame]:
        """The runs (bytes) and DATA frames of ``data`` and what was held."""
        out: list[bytes | DataFrame] = []
        limit = max_frame if self._acked else min(max_frame, MIN_MAX_FRAME)
        if self._preface:
            n = min(self._preface, len(data))
            self._preface -= n
            out.append(data[:n])
            data = data[n:]
        # What is scanned: the held frame completed (``first``), then the read from ``skip``.
        first, skip = b"", 0
        held = self._held
        if held:
            head = held if len(held) >= 9 else held + data[: 9 - len(held)]
            whole = 9 + (head[0] << 16 | head[1] << 8 | head[2]) if len(head) >= 9 else 0
            if whole - 9 > limit:
                data = held + data  # h2 refuses it at its header: all of it goes to h2
            elif not whole or whole - len(held) > len(data):
                self._held = held + data  # still not whole (at most one frame held)
                return out
            else:
                skip = whole - len(held)
                first = held + data[:skip]
        # The DATA frames of one stream being gathered: its id (-1: none).
        run = -1
        run_flags = 0
        pieces: list[bytes | memoryview] = []
        frames: list[bytes | memoryview] = []
        run_length = 0
        for source, pos in ((first, 0), (data, skip)) if first else ((data, 0),):
            view = memoryview(source)
            size = len(source)
            start = pos
            while size - pos >= 9:
                kind = source[pos + 3]
                if self._settings:
                    if kind != SETTINGS or source[pos + 4] & ACK:
                        raise PrefaceError("the connection preface must end with SETTINGS")
                    self._settings = False
                length = source[pos] << 16 | source[pos + 1] << 8 | source[pos + 2]
                if length > limit:
                    pos = size  # h2 answers FRAME_SIZE_ERROR on its header
                    break
                end = pos + 9 + length
                if end > size:
                    break
                if self._block:
                    self._block = not (kind == CONTINUATION and source[pos + 4] & END_HEADERS)
                    self._block_size += length
                    if self._block_size > MAX_BLOCK:
                        raise HeaderBlockError("a header block over 1 MiB")
                elif kind == DATA:
                    flags = source[pos + 4]
                    sid = (source[pos + 5] & 0x7F) << 24 | source[pos + 6] << 16
                    sid |= source[pos + 7] << 8 | source[pos + 8]
                    payload = view[pos + 9 : end]
                    if flags & PADDED:
                        pad = source[pos + 9] if length else length + 1
                        if pad >= length:  # invalid: h2 refuses the frame (PROTOCOL_ERROR)
                            flags, payload = -1, view[0:0]
                        else:
                            payload = view[pos + 10 : end - pad]
                    # Joined to the run: the same stream, right after it, and
                    # neither ends it, is padded or is invalid (but for this one ending it).
                    if not (
                        sid == run and start == pos and run_flags == 0 and flags in (0, END_STREAM)
                    ):
                        if run >= 0:
                            out.append(_run(run, run_flags, pieces, run_length, frames))
                            pieces, frames, run_length = [], [], 0
                        if start < pos:
                            out.append(source[start:pos])
                        run = sid
                    run_flags = flags
                    pieces.append(payload)
                    frames.append(view[pos:end])
                    run_length += length
                    start = end
                elif kind in (HEADERS, PUSH_PROMISE):
                    self._block = not source[pos + 4] & END_HEADERS
                    self._block_size = length
                elif kind == SETTINGS and source[pos + 4] & ACK and not self._acked:
                    self._acked = True
                    limit = max_frame
                    if run >= 0:
                        out.append(_run(run, run_flags, pieces, run_length, frames))
                        pieces, frames, run_length, run = [], [], 0, -1
                    out.append(source[start:end])  # h2 raises its limit on it, then the rest
                    start = end
                pos = end
            if start < pos:  # h2's frames: the run before them goes first
                if run >= 0:
                    out.append(_run(run, run_flags, pieces, run_length, frames))
                    pieces, frames, run_length, run = [], [], 0, -1
                out.append(source[start:pos])
            self._held = source[pos:]
        if run >= 0:
            out.append(_run(run, run_flags, pieces, run_length, frames))
        return out


def _run(
    stream_id: int,
    flags: int,
    pieces: list[bytes | memoryview],
    length: int,
    frames: list[bytes | memoryview],
) -> DataFrame:
    payload = bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
    return DataFrame(stream_id, flags, payload, length, frames)


def end_stream_frame(stream_id: int) -> bytes:
    """An empty trailers block ending ``stream_id`` (HEADERS, END_STREAM and
    END_HEADERS, no field): what h2 is told of a DATA frame with END_STREAM
    the bridge took itself, so that its stream states stay right, when the
    request had a ``content-length`` (h2load and curl send one): h2 would
    check it against the DATA bytes it saw, none, on an empty DATA frame
    (`end_data_frame`); trailers reset that check, and an empty block
    leaves HPACK's table as it is."""
    return b"\x00\x00\x00\x01\x05" + stream_id.to_bytes(4, "big")


def end_data_frame(stream_id: int) -> bytes:
    """An empty DATA frame with END_STREAM: what h2 is told instead of
    `end_stream_frame` when the request had no ``content-length`` (gRPC
    clients send none), h2's cheapest way to end a stream (no HPACK, no
    header checks: about half the time)."""
    return b"\x00\x00\x00\x00\x01" + stream_id.to_bytes(4, "big")


#: The trailers of a call that succeeded, as `trailers` gives them.
OK_TRAILERS: Final = [(b"grpc-status", b"0")]


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (0: the connection's window)."""
    return b"\x00\x00\x04\x08\x00" + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")
