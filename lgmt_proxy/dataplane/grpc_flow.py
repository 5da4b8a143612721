"""Flow control of one OTLP/gRPC connection, both ways, kept by the bridge
itself for its calls' streams (h2 keeps the connection's own frames only).

`Inflow`: what each call and the connection may still send, and the
WINDOW_UPDATE frames that grant it again once the upstream side has taken
half a window. DATA on any other stream (unknown, closed, refused) goes to
h2, which keeps its windows for it.

`Outflow`: the answers, each waiting for the client's windows (the
stream's, kept here, and the connection's, h2's ``outbound_flow_control_window``
which its WINDOW_UPDATE frames raise), built as frames here
(`rules.h2frames`): h2 building them in Python was a third of the bridge's
CPU per call.
"""

from __future__ import annotations

from typing import Final

from h2.connection import H2Connection

from lgmt_proxy.rules import h2frames
from lgmt_proxy.rules.headers import RawHeaders

#: Each call's receive window (SETTINGS_INITIAL_WINDOW_SIZE): a 256 KiB
#: export needs no round trip for WINDOW_UPDATE (at 64 KiB it took four).
#: 1 MiB (no WINDOW_UPDATE for it at all) measured worse: docs/performance.md.
STREAM_WINDOW: Final = 256 * 1024
#: The connection's receive window: what all its calls together may have
#: sent that the upstream side has not taken yet (the memory bound).
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
#: The largest window HTTP/2 allows (RFC 9113, section 6.9.1).
MAX_WINDOW: Final = 2**31 - 1


_FLOW_CONTROL_ERROR: Final = 3
_PROTOCOL_ERROR: Final = 1


class Inflow:
    """What the client may still send, per taken stream and on the
    connection. A stream is taken from its request headers until the client
    ends or resets it (or we reset it), whether or not its call is still in
    progress, so that h2 never sees part of a stream's DATA and the
    ``content-length`` check is ours too. The connection's window is one for
    the client: DATA that goes to h2 counts against it as well (``h2_left``,
    what h2's own accounting still allows, is added)."""

    __slots__ = ("_left", "_taken", "_windows", "updates")

    def __init__(self) -> None:
        #: stream -> [bytes it may still send, bytes taken not yet granted,
        #: content-length bytes still to come (-1: none was sent)].
        self._windows: dict[int, list[int]] = {}
        self._left = CONNECTION_WINDOW
        self._taken = 0
        #: WINDOW_UPDATE frames to send (after h2's bytes of the same turn).
        self.updates: list[bytes] = []

    def add(self, stream_id: int, content_length: int | None) -> None:
        """A stream whose DATA the connection takes itself."""
        expected = -1 if content_length is None else content_length
        self._windows[stream_id] = [STREAM_WINDOW, 0, expected]

    def owns(self, stream_id: int) -> bool:
        """The client may still send on it (open, or half-closed on our side)."""
        return stream_id in self._windows

    def streams(self) -> set[int]:
        return set(self._windows)

    def drop(self, stream_id: int) -> None:
        """The client may send no more on it: nothing more is granted."""
        self._windows.pop(stream_id, None)

    def ended(self, stream_id: int) -> bool:
        """The client ended the stream: False when it sent fewer bytes than
        its ``content-length`` (RFC 9113, section 8.1.1)."""
        window = self._windows.pop(stream_id, None)
        return window is None or window[2] <= 0

    def fits(self, length: int, h2_left: int) -> bool:
        """Whether a DATA frame of ``length`` for h2 is within the
        connection's window (ours and h2's together)."""
        return self._left + h2_left - CONNECTION_WINDOW >= length

    def received(self, stream_id: int, length: int, size: int, end: bool, h2_left: int) -> int:
        """DATA frames of ``length`` (``size`` bytes of content) on a taken
        stream: 0, or the connection error they are. FLOW_CONTROL_ERROR for
        more than its or the connection's window allowed, PROTOCOL_ERROR for
        content beyond its ``content-length`` or short of it at ``end``."""
        window = self._windows[stream_id]
        window[0] -= length
        self._left -= length
        if window[0] < 0 or self._left + h2_left < CONNECTION_WINDOW:
            return _FLOW_CONTROL_ERROR
        if window[2] >= 0:
            window[2] -= size
            if window[2] < 0 or (end and window[2]):
                return _PROTOCOL_ERROR
        return 0

    def taken(self, stream_id: int, size: int) -> None:
        """``size`` bytes of ``stream_id`` were taken (or dropped): granted
        again once half a window is, the stream's if it still sends."""
        self._taken += size
        if self._taken >= CONNECTION_WINDOW // 2:
            self._left += self._taken
            self.updates.append(h2frames.window_update(0, self._taken))
            self._taken = 0
        window = self._windows.get(stream_id)
        if window is not None:
            window[1] += size
            if window[1] >= STREAM_WINDOW // 2:
                window[0] += window[1]
                self.updates.append(h2frames.window_update(stream_id, window[1]))
                window[1] = 0


#: A call's response head (the status and content type of every answer).
GRPC_HEAD: Final = [(b":status", b"200"), (b"content-type", b"application/grpc")]
#: The trailers of a call that succeeded.
OK_TRAILERS: Final = [(b"grpc-status", b"0")]
_NO_ERROR: Final = 0


class Outflow:
    """What the bridge sends on its calls' streams: each answer as the
    client's windows allow (a response message waits here, at most
    `grpc_stream.MAX_ANSWER`, then the trailers end the call). A client
    that never opens its window holds its answers here until the
    connection closes (idle timeout): bounded, never sent around flow
    control. A stream is ours to send on from its request until we end
    or reset it, or the client resets it."""

    __slots__ = ("_h2", "_unsent", "_windows", "frames", "initial_window")

    def __init__(self, conn: H2Connection) -> None:
        #: h2: the connection's send window, the peer's frame size and
        #: SETTINGS, the HPACK encoder (its table size updates) and what it
        #: has queued itself.
        self._h2 = conn
        #: stream -> what it may still be sent.
        self._windows: dict[int, int] = {}
        #: stream -> [what is left of the message, the trailers].
        self._unsent: dict[int, tuple[bytearray, RawHeaders]] = {}
        #: Frames to send, in order (h2's queued before ours went in first).
        self.frames: list[bytes] = []
        #: The client's SETTINGS_INITIAL_WINDOW_SIZE (h2 reads it in Python).
        self.initial_window = conn.remote_settings.initial_window_size

    def __bool__(self) -> bool:
        return bool(self._unsent)

    def open(self, stream_id: int) -> None:
        self._windows[stream_id] = self.initial_window

    def owns(self, stream_id: int) -> bool:
        return stream_id in self._windows

    def streams(self) -> set[int]:
        return set(self._windows)

    def _emit(self, data: bytes) -> None:
        """Our frames, after what h2 queued (its frames go in `frames` as
        it makes them: `GrpcConnection.to_h2`)."""
        self.frames.append(data)

    def _owed(self) -> bytes:
        """The table size update h2's encoder owes, if any (RFC 7541,
        section 4.2: the next header block must begin with it)."""
        encoder = self._h2.encoder
        return encoder.encode([]) if encoder.header_table.resized else b""

    def _headers(self, stream_id: int, fields: RawHeaders, end_stream: bool) -> None:
        """``fields`` as a header block in HEADERS (and CONTINUATION) frames."""
        block = self._owed() + h2frames.header_block(fields)
        max_frame = self._h2.max_outbound_frame_size
        self._emit(h2frames.headers_frames(stream_id, block, end_stream, max_frame))

    def answer(
        self, stream_id: int, message: bytes | None, trailers: RawHeaders, early: bool
    ) -> bool:
        """Send the answer as the windows allow; True when it went whole.
        ``early``: the client is still sending, and the rest of its request
        is not wanted (RST_STREAM NO_ERROR once the answer is out)."""
        window = self._windows.get(stream_id)
        if window is None:
            return True  # reset already: nothing may be sent on it
        conn = self._h2
        if message is not None and not early and trailers == OK_TRAILERS:
            size = len(message)
            if size <= min(window, conn.outbound_flow_control_window, conn.max_outbound_frame_size):
                conn.outbound_flow_control_window -= size
                del self._windows[stream_id]
                self._emit(h2frames.ok_answer_frames(stream_id, message, self._owed()))
                return True
        if message is None:
            self._headers(stream_id, [*GRPC_HEAD, *trailers], True)
            del self._windows[stream_id]
        else:
            self._headers(stream_id, GRPC_HEAD, False)
            self._unsent[stream_id] = (bytearray(message), trailers)
            self.send(stream_id)
        if early and stream_id not in self._unsent:
            self._emit(h2frames.rst_stream(stream_id, _NO_ERROR))
        return stream_id not in self._unsent

    def reply_status(self, stream_id: int, status: int) -> None:
        """An HTTP status alone, ending the stream (not a gRPC request)."""
        if self._windows.pop(stream_id, None) is not None:
            self._headers(stream_id, [(b":status", b"%d" % status)], True)

    def send(self, stream_id: int) -> bool:
        """What the windows allow of a waiting answer; True when one ended."""
        unsent = self._unsent.get(stream_id)
        if unsent is None:
            return False
        data, trailers = unsent
        conn = self._h2
        while data:
            size = min(
                self._windows[stream_id],
                conn.outbound_flow_control_window,
                conn.max_outbound_frame_size,
                len(data),
            )
            if size <= 0:
                return False
            chunk = bytes(data[:size])
            del data[:size]
            self._windows[stream_id] -= size
            conn.outbound_flow_control_window -= size
            self._emit(h2frames.data_frame(stream_id, chunk))
        del self._unsent[stream_id]
        del self._windows[stream_id]
        self._headers(stream_id, trailers, True)
        return True

    def window_update(self, stream_id: int, increment: int) -> bool:
        """The client opened the stream's window: False when it is now over
        the largest window (a stream error FLOW_CONTROL_ERROR, the caller's)."""
        window = self._windows[stream_id] + increment
        if window > MAX_WINDOW:
            return False
        self._windows[stream_id] = window
        return True

    def settings_changed(self, delta: int) -> bool:
        """The client's SETTINGS_INITIAL_WINDOW_SIZE moved by ``delta``:
        every stream's window moves with it (RFC 9113, section 6.9.2).
        False when one goes over the largest window (a connection error
        FLOW_CONTROL_ERROR)."""
        windows = self._windows
        for stream_id in windows:
            windows[stream_id] += delta
            if windows[stream_id] > MAX_WINDOW:
                return False
        return True

    def window_opened(self, stream_id: int) -> bool:
        """A window opened (0: the connection's): send what it allows; True
        when an answer ended."""
        streams = [stream_id] if stream_id else list(self._unsent)
        ended = [self.send(s) for s in streams]
        return any(ended)

    def reset(self, stream_id: int, error_code: int) -> None:
        """Reset a stream of ours (a stream error, or a refused one)."""
        self.close(stream_id)
        self._emit(h2frames.rst_stream(stream_id, error_code))

    def close(self, stream_id: int) -> None:
        """Nothing more is sent on it (reset, by either side)."""
        self._windows.pop(stream_id, None)
        self._unsent.pop(stream_id, None)

    def drop(self) -> None:
        """The connection is gone."""
        self._windows.clear()
        self._unsent.clear()
