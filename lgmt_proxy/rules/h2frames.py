"""HTTP/2 frames of the OTLP/gRPC listener (pure): what a client sends cut
into the parts the bridge handles itself and the runs of bytes `h2` judges
(`FrameSplitter`), and the frames the bridge sends of a call's stream
(HEADERS, DATA, RST_STREAM, WINDOW_UPDATE). `h2` keeps the connection's
own frames (SETTINGS, PING, GOAWAY, PRIORITY, the connection's window) and
every frame on a stream that is not a call's; `dataplane.grpc_server`
routes them.
"""

from __future__ import annotations

from typing import Final, NamedTuple

#: What a client sends first (RFC 9113, section 3.4), before any frame.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Frame types and flags the splitter reads.
DATA: Final = 0
HEADERS: Final = 1
RST_STREAM: Final = 3
SETTINGS: Final = 4
PUSH_PROMISE: Final = 5
PING: Final = 6
WINDOW_UPDATE: Final = 8
CONTINUATION: Final = 9
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY: Final = 0x20
#: The largest header block in more than one frame: h2's bound (64
#: CONTINUATION frames of 16 KiB) before our frames could be 64 KiB.
MAX_BLOCK: Final = 64 * 16384
#: CONTINUATION frames in one header block (h2's bound: a flood of empty
#: ones costs CPU and no memory, CVE-2024-27316).
MAX_CONTINUATIONS: Final = 64
#: SETTINGS_MAX_FRAME_SIZE's initial value (RFC 9113, section 6.5.2).
MIN_MAX_FRAME: Final = 16384


class SplitError(Exception):
    """What the splitter refuses itself: a connection error, ``error_code``."""

    error_code: Final = 1  # PROTOCOL_ERROR


class HeaderBlockError(SplitError):
    """A header block over `MAX_BLOCK` or `MAX_CONTINUATIONS` frames
    (PROTOCOL_ERROR, as h2's own CONTINUATION backlog)."""


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


class HeaderBlock(NamedTuple):
    """A whole header block: HEADERS and its CONTINUATION frames, padding
    and priority removed (a stream depending on itself is refused here,
    as h2 does), and the frames as received (for h2, when the stream is not
    one the bridge opens: `raw`)."""

    stream_id: int
    end_stream: bool
    block: bytes
    frames: list[bytes | memoryview]

    @property
    def raw(self) -> bytes:
        return b"".join(self.frames)


class StreamFrame(NamedTuple):
    """RST_STREAM or WINDOW_UPDATE (of a stream or of the connection), or
    PING: its type, stream, the value it carries (the error code or the
    increment, reserved bit included; a PING's flags), and the frame as
    received. Each of the right length; any other goes to h2, which
    refuses it."""

    kind: int
    stream_id: int
    value: int
    frame: bytes


Part = bytes | DataFrame | HeaderBlock | StreamFrame


class _Gathered:
    """The DATA frames of one stream being joined (one `DataFrame` per
    read, not one per frame)."""

    __slots__ = ("flags", "frames", "length", "pieces", "stream_id")

    def __init__(self) -> None:
        self.stream_id = -1
        self.flags = 0
        self.pieces: list[bytes | memoryview] = []
        self.frames: list[bytes | memoryview] = []
        self.length = 0

    def flush(self, out: list[Part]) -> None:
        if self.stream_id < 0:
            return
        pieces = self.pieces
        payload = bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
        out.append(DataFrame(self.stream_id, self.flags, payload, self.length, self.frames))
        self.stream_id, self.pieces, self.frames, self.length = -1, [], [], 0


class FrameSplitter:
    """Cuts what a client connection sends into parts, in order: whole DATA
    frames (consecutive ones of a stream joined, their payloads copied
    once), whole header blocks, RST_STREAM and WINDOW_UPDATE of a stream,
    and runs of every other frame for h2, which parses each in Python and
    formats it for a debug log it never writes (a DATA payload hexlified).
    A partial frame waits for the rest and is completed apart, not joined
    to the whole next read; a frame declared over ``max_frame`` (and
    everything after it) goes to h2 at once, which refuses it, so no more
    than one frame is held, and one header block (`MAX_BLOCK`).

    Between a HEADERS without END_HEADERS and the CONTINUATION ending it,
    any other frame is a connection error (RFC 9113, section 6.10), and so
    is a PUSH_PROMISE from a client (section 8.4). The first frame after
    the preface must be SETTINGS (`PrefaceError`).

    ``max_frame`` is ours (SETTINGS_MAX_FRAME_SIZE): in force from the
    client's first SETTINGS acknowledgement on, 16 KiB before it. The
    acknowledgement ends a run, so that h2 takes it (and raises its own
    limit) before the frames after it."""

    __slots__ = (
        "_acked",
        "_block",
        "_block_end",
        "_block_frames",
        "_block_raw",
        "_block_sid",
        "_block_size",
        "_held",
        "_preface",
        "_settings",
    )

    def __init__(self) -> None:
        #: The start of a frame not yet whole.
        self._held = b""
        self._preface = len(PREFACE)
        #: The client's SETTINGS is still to come (the preface's end).
        self._settings = True
        #: The open header block's stream (-1: none open), its fragments so
        #: far, their frames as received, its END_STREAM, size and frames.
        self._block_sid = -1
        self._block: list[bytes | memoryview] = []
        self._block_raw: list[bytes | memoryview] = []
        self._block_end = False
        self._block_size = 0
        self._block_frames = 0
        #: The client has acknowledged our SETTINGS: ``max_frame`` holds.
        self._acked = False

    def split(self, data: bytes, max_frame: int) -> list[Part]:
        """The parts of ``data`` and what was held."""
        out: list[Part] = []
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
        run = _Gathered()
        for source, pos in ((first, 0), (data, skip)) if first else ((data, 0),):
            view = memoryview(source)
            size = len(source)
            start = pos  # h2's bytes not yet out
            while size - pos >= 9:
                kind = source[pos + 3]
                flags = source[pos + 4]
                if self._settings:
                    if kind != SETTINGS or flags & ACK:
                        raise PrefaceError("the connection preface must end with SETTINGS")
                    self._settings = False
                length = source[pos] << 16 | source[pos + 1] << 8 | source[pos + 2]
                if length > limit:
                    pos = size  # h2 answers FRAME_SIZE_ERROR on its header
                    break
                end = pos + 9 + length
                if end > size:
                    break
                sid = (source[pos + 5] & 0x7F) << 24 | source[pos + 6] << 16
                sid |= source[pos + 7] << 8 | source[pos + 8]
                if self._block_sid >= 0:
                    if kind != CONTINUATION or sid != self._block_sid:
                        raise SplitError("a header block interrupted")
                    block = self._continued(view, pos, end, flags)
                    if block is not None:
                        run.flush(out)
                        if start < pos:
                            out.append(source[start:pos])
                        out.append(block)
                    start = end
                elif kind == DATA:
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
                        sid == run.stream_id
                        and start == pos
                        and run.flags == 0
                        and flags in (0, END_STREAM)
                    ):
                        run.flush(out)
                        if start < pos:
                            out.append(source[start:pos])
                        run.stream_id = sid
                    run.flags = flags
                    run.pieces.append(payload)
                    run.frames.append(view[pos:end])
                    run.length += length
                    start = end
                elif kind == HEADERS:
                    block = self._headers(view, pos, end, flags, sid)
                    run.flush(out)
                    if start < pos:
                        out.append(source[start:pos])
                    if block is not None:
                        out.append(block)
                    start = end
                elif (
                    (kind == RST_STREAM and sid and length == 4)
                    or (kind == WINDOW_UPDATE and length == 4)
                    or (kind == PING and not sid and length == 8)
                ):
                    run.flush(out)
                    if start < pos:
                        out.append(source[start:pos])
                    value = flags if kind == PING else int.from_bytes(source[pos + 9 : end], "big")
                    out.append(StreamFrame(kind, sid, value, source[pos:end]))
                    start = end
                elif kind == PUSH_PROMISE:
                    raise SplitError("a client may not push")
                elif kind == SETTINGS and flags & ACK and not self._acked:
                    self._acked = True
                    limit = max_frame
                    run.flush(out)
                    out.append(source[start:end])  # h2 raises its limit on it, then the rest
                    start = end
                pos = end
            if start < pos:  # h2's frames: the run before them goes first
                run.flush(out)
                out.append(source[start:pos])
            self._held = source[pos:]
        run.flush(out)
        return out

    def _headers(
        self, view: memoryview, pos: int, end: int, flags: int, sid: int
    ) -> HeaderBlock | None:
        """A HEADERS frame: its whole block, or None while CONTINUATION
        frames are to come."""
        if not sid:
            raise SplitError("HEADERS on stream 0")
        begin = pos + 9
        pad = 0
        if flags & PADDED:
            if end <= begin:
                raise SplitError("HEADERS too short for its padding")
            pad = view[begin]
            begin += 1
        if flags & PRIORITY:
            if end - begin < 5:
                raise SplitError("HEADERS too short for its priority")
            depends = int.from_bytes(view[begin : begin + 4], "big") & 0x7FFFFFFF
            if depends == sid:
                raise SplitError("a stream may not depend on itself")
            begin += 5
        if end - pad < begin:
            raise SplitError("HEADERS padding longer than the frame")
        fragment = view[begin : end - pad]
        if flags & END_HEADERS:
            return HeaderBlock(sid, bool(flags & END_STREAM), bytes(fragment), [view[pos:end]])
        self._block_sid = sid
        self._block = [fragment]
        self._block_raw = [view[pos:end]]
        self._block_end = bool(flags & END_STREAM)
        self._block_size = end - pos - 9
        self._block_frames = 0
        return None

    def _continued(self, view: memoryview, pos: int, end: int, flags: int) -> HeaderBlock | None:
        """A CONTINUATION of the open block: the whole block at its end."""
        self._block_size += end - pos - 9
        self._block_frames += 1
        if self._block_size > MAX_BLOCK or self._block_frames > MAX_CONTINUATIONS:
            raise HeaderBlockError("a header block over 1 MiB or 64 frames")
        self._block.append(view[pos + 9 : end])
        self._block_raw.append(view[pos:end])
        if not flags & END_HEADERS:
            return None
        block = HeaderBlock(
            self._block_sid, self._block_end, b"".join(self._block), self._block_raw
        )
        self._block_sid, self._block, self._block_raw = -1, [], []
        return block


# -- what the bridge sends on a call's stream ------------------------------------------------


def _frame_head(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return (length << 48 | kind << 40 | flags << 32 | stream_id).to_bytes(9, "big")


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (0: the connection's window)."""
    return _frame_head(4, WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


def ping_ack(ping: bytes) -> bytes:
    """The acknowledgement of a PING frame (``ping`` as received)."""
    return _frame_head(8, PING, ACK, 0) + ping[9:17]


def rst_stream(stream_id: int, error_code: int) -> bytes:
    """A RST_STREAM frame."""
    return _frame_head(4, RST_STREAM, 0, stream_id) + error_code.to_bytes(4, "big")


def data_frame(stream_id: int, payload: bytes) -> bytes:
    """A DATA frame (never the end of the stream: trailers end an answer)."""
    return _frame_head(len(payload), DATA, 0, stream_id) + payload


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS, and CONTINUATION frames past the peer's
    ``max_frame``."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return _frame_head(len(block), HEADERS, flags | END_HEADERS, stream_id) + block
    parts = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [_frame_head(len(parts[0]), HEADERS, flags, stream_id), parts[0]]
    for i, part in enumerate(parts[1:], 2):
        last = END_HEADERS if i == len(parts) else 0
        out += (_frame_head(len(part), CONTINUATION, last, stream_id), part)
    return b"".join(out)


def _hpack_length(n: int) -> bytes:
    """An HPACK string length (7-bit prefix, no Huffman: RFC 7541, 5.1)."""
    if n < 127:
        return bytes([n])
    out = bytearray([127])
    n -= 127
    while n >= 128:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def header_block(fields: list[tuple[bytes, bytes]]) -> bytes:
    """``fields`` HPACK-encoded so that neither side's dynamic table moves:
    ``:status`` by the static table's name (200 fully indexed), every other
    field a literal without indexing (RFC 7541, 6.2.2). What h2's encoder
    may owe first (a table size update) is the caller's to put before it."""
    out = []
    for name, value in fields:
        if name == b":status":
            out.append(b"\x88" if value == b"200" else b"\x08" + _hpack_length(len(value)) + value)
        else:
            out += (b"\x00", _hpack_length(len(name)), name, _hpack_length(len(value)), value)
    return b"".join(out)


#: The header blocks of an answer that succeeded: the response head
#: (``:status: 200`` indexed, ``content-type: application/grpc`` a literal
#: without indexing of the static table's name) and ``grpc-status: 0``.
OK_HEAD_BLOCK: Final = b"\x88\x0f\x10\x10application/grpc"
OK_TRAILERS_BLOCK: Final = b"\x00\x0bgrpc-status\x010"


def ok_answer_frames(stream_id: int, message: bytes, prefix: bytes = b"") -> bytes:
    """The three frames answering a call that succeeded: HEADERS (the
    response head, after ``prefix``: a table size update h2's encoder
    owes), DATA (``message``, prefix included: it must fit the peer's frame
    size and windows) and HEADERS with END_STREAM (the trailers)."""
    head = prefix + OK_HEAD_BLOCK
    return b"".join(
        [
            _frame_head(len(head), HEADERS, END_HEADERS, stream_id),
            head,
            _frame_head(len(message), DATA, 0, stream_id),
            message,
            _frame_head(len(OK_TRAILERS_BLOCK), HEADERS, END_HEADERS | END_STREAM, stream_id),
            OK_TRAILERS_BLOCK,
        ]
    )
