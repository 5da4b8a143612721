"""Flow control of one OTLP/gRPC connection, both ways. `Inflow`: the receive windows for the calls whose DATA
frames it takes itself (`GrpcConnection._data_frame`), past h2: h2 parses
every frame in Python and formats each for a debug log it never writes (the
whole payload hexlified), most of the bridge's CPU. The windows are then
ours to keep: what each call and the connection may still send, and the
WINDOW_UPDATE frames that grant it again once the upstream side has taken
half a window. DATA on any other stream (unknown, closed, refused) goes to
h2, which keeps its windows for it.
"""

from __future__ import annotations

from typing import Final

from h2.connection import H2Connection
from h2.exceptions import StreamClosedError

from lgmt_proxy.dataplane import grpc_h2
from lgmt_proxy.rules import grpc
from lgmt_proxy.rules.headers import RawHeaders

#: Each call's receive window (SETTINGS_INITIAL_WINDOW_SIZE): a 256 KiB
#: export needs no round trip for WINDOW_UPDATE (at 64 KiB it took four).
#: 1 MiB (no WINDOW_UPDATE for it at all) measured worse: docs/performance.md.
STREAM_WINDOW: Final = 256 * 1024
#: The connection's receive window: what all its calls together may have
#: sent that the upstream side has not taken yet (the memory bound).
CONNECTION_WINDOW: Final = 4 * 1024 * 1024


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
        return stream_id in self._windows

    def end_frame(self, stream_id: int) -> bytes:
        """What h2 is told of the END_STREAM of a taken stream: an empty
        DATA frame (h2's cheapest), or empty trailers if the request had a
        ``content-length`` (h2 would check it against the bytes it saw)."""
        window = self._windows.get(stream_id)
        if window is not None and window[2] >= 0:
            return grpc.end_stream_frame(stream_id)
        return grpc.end_data_frame(stream_id)

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
            self.updates.append(grpc.window_update(0, self._taken))
            self._taken = 0
        window = self._windows.get(stream_id)
        if window is not None:
            window[1] += size
            if window[1] >= STREAM_WINDOW // 2:
                window[0] += window[1]
                self.updates.append(grpc.window_update(stream_id, window[1]))
                window[1] = 0


#: A call's response head (the status and content type of every answer).
GRPC_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_NO_ERROR: Final = 0


class Outflow:
    """The answers of one connection's calls, on its h2 state machine: a
    response message waits here for the client's windows (it is at most
    `grpc_stream.MAX_ANSWER`), then the trailers end the call. A client that
    never opens its window holds its answers here until the connection
    closes (idle timeout): bounded, never sent around flow control."""

    __slots__ = ("_h2", "_unsent", "sent")

    def __init__(self, conn: H2Connection) -> None:
        self._h2 = conn
        #: stream -> [what is left of the message, the trailers].
        self._unsent: dict[int, tuple[bytearray, RawHeaders]] = {}
        #: Bytes to send, in order, before what h2 has queued since: answers
        #: built past h2 (`grpc_h2.answered`) and what h2 had queued before them.
        self.sent: list[bytes] = []

    def __bool__(self) -> bool:
        return bool(self._unsent)

    def answer(
        self, stream_id: int, message: bytes | None, trailers: RawHeaders, early: bool
    ) -> bool:
        """Send the answer as the windows allow; True when it went whole.
        ``early``: the client is still sending, and the rest of its request
        is not wanted (RST_STREAM NO_ERROR once the answer is out)."""
        conn = self._h2
        if message is not None and not early and trailers == grpc.OK_TRAILERS:
            frames = grpc_h2.answered(conn, stream_id, message)
            if frames is not None:  # h2's state moved, its frames not built
                self.sent += (conn.data_to_send(), frames)
                return True
        try:
            if message is None:
                conn.send_headers(stream_id, [*GRPC_HEAD, *trailers], end_stream=True)
            else:
                conn.send_headers(stream_id, GRPC_HEAD)
                self._unsent[stream_id] = (bytearray(message), trailers)
                self.send(stream_id)
            if early and stream_id not in self._unsent:
                conn.reset_stream(stream_id, error_code=_NO_ERROR)
        except StreamClosedError:
            self._unsent.pop(stream_id, None)
        return stream_id not in self._unsent

    def send(self, stream_id: int) -> bool:
        """What the windows allow of a waiting answer; True when one ended."""
        unsent = self._unsent.get(stream_id)
        if unsent is None:
            return False
        data, trailers = unsent
        conn = self._h2
        try:
            while data:
                size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if size <= 0:
                    return False
                chunk = bytes(data[:size])
                del data[:size]
                conn.send_data(stream_id, chunk)
            del self._unsent[stream_id]
            conn.send_headers(stream_id, trailers, end_stream=True)
            return True
        except StreamClosedError:
            self._unsent.pop(stream_id, None)
            return False

    def window_opened(self, stream_id: int) -> bool:
        """The client opened a window (0: the connection's): send what it
        allows; True when an answer ended."""
        streams = [stream_id] if stream_id else list(self._unsent)
        ended = [self.send(s) for s in streams]
        return any(ended)

    def drop(self, stream_id: int | None = None) -> None:
        """Forget a stream's answer (reset by the client), or every one."""
        if stream_id is None:
            self._unsent.clear()
        else:
            self._unsent.pop(stream_id, None)
