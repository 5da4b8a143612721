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

from h2.connection import H2Connection
from h2.exceptions import StreamClosedError

from lgmt_proxy.rules import grpc
from lgmt_proxy.rules.headers import RawHeaders

#: Each call's receive window (SETTINGS_INITIAL_WINDOW_SIZE): a 256 KiB
#: export needs no round trip for WINDOW_UPDATE (at 64 KiB it took four).
STREAM_WINDOW = 256 * 1024
#: The connection's receive window: what all its calls together may have
#: sent that the upstream side has not taken yet (the memory bound).
CONNECTION_WINDOW = 4 * 1024 * 1024


class Inflow:
    """What the client may still send, per taken call and on the connection
    (only the taken calls' DATA counts here: h2 keeps the rest)."""

    __slots__ = ("_left", "_taken", "_windows", "updates")

    def __init__(self) -> None:
        #: stream -> [bytes it may still send, bytes taken not yet granted].
        self._windows: dict[int, list[int]] = {}
        self._left = CONNECTION_WINDOW
        self._taken = 0
        #: WINDOW_UPDATE frames to send (after h2's bytes of the same turn).
        self.updates: list[bytes] = []

    def add(self, stream_id: int) -> None:
        """A call whose DATA the connection takes itself."""
        self._windows[stream_id] = [STREAM_WINDOW, 0]

    def owns(self, stream_id: int) -> bool:
        return stream_id in self._windows

    def drop(self, stream_id: int) -> None:
        """The call is over: nothing more is granted to its stream."""
        self._windows.pop(stream_id, None)

    def received(self, stream_id: int, length: int) -> bool:
        """A DATA frame of ``length`` on a taken call; False when it is more
        than the call's or the connection's window allowed."""
        window = self._windows[stream_id]
        window[0] -= length
        self._left -= length
        return window[0] >= 0 and self._left >= 0

    def taken(self, stream_id: int, size: int) -> None:
        """``size`` bytes of ``stream_id`` were taken (or dropped): granted
        again once half a window is, the call's if it still sends."""
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
_NO_ERROR = 0


class Outflow:
    """The answers of one connection's calls, on its h2 state machine: a
    response message waits here for the client's windows (it is at most
    `grpc_stream.MAX_ANSWER`), then the trailers end the call. A client that
    never opens its window holds its answers here until the connection
    closes (idle timeout): bounded, never sent around flow control."""

    __slots__ = ("_h2", "_unsent")

    def __init__(self, conn: H2Connection) -> None:
        self._h2 = conn
        #: stream -> [what is left of the message, the trailers].
        self._unsent: dict[int, tuple[bytearray, RawHeaders]] = {}

    def __bool__(self) -> bool:
        return bool(self._unsent)

    def answer(
        self, stream_id: int, message: bytes | None, trailers: RawHeaders, early: bool
    ) -> bool:
        """Send the answer as the windows allow; True when it went whole.
        ``early``: the client is still sending, and the rest of its request
        is not wanted (RST_STREAM NO_ERROR once the answer is out)."""
        conn = self._h2
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
