"""The calls' streams of one OTLP/gRPC connection, kept by the bridge
itself rather than by h2: each call's header blocks (read against h2's
HPACK decoder and checked as h2 checks them: `grpc_heads.HeadReader`), its
DATA, RST_STREAM and WINDOW_UPDATE frames, and every frame of its answer
(`grpc_flow`). h2 doing them in Python was most of the bridge's CPU.

h2 keeps the connection (`grpc_server.GrpcConnection`) and judges every
frame on a stream that is not an open call's, as it would any stream it
does not know: a closed one's DATA gets RST_STREAM STREAM_CLOSED, an idle
or even one a connection error. So that it can, it is told the highest
stream opened (``highest_inbound_stream_id``) and that the connection is
open (its state machine, at the first call).
"""

from __future__ import annotations

from typing import Final, Protocol

from h2.connection import ConnectionInputs, ConnectionState, H2Connection

from lgmt_proxy.dataplane.dispatcher import Shared
from lgmt_proxy.dataplane.grpc_flow import Inflow, Outflow
from lgmt_proxy.dataplane.grpc_heads import HeadReader
from lgmt_proxy.dataplane.grpc_stream import GrpcStream
from lgmt_proxy.rules import h2frames
from lgmt_proxy.rules.headers import RawHeaders

#: Calls open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
MAX_STREAMS: Final = 100
#: Streams the client may reset beyond the calls answered (CVE-2023-44487).
MAX_RESETS: Final = 100
#: Closed streams remembered (how they closed), as h2 remembers its own.
REMEMBERED: Final = 1000

_PROTOCOL_ERROR: Final = 1
_FLOW_CONTROL_ERROR: Final = 3
_STREAM_CLOSED: Final = 5
_REFUSED_STREAM: Final = 7
_ENHANCE_YOUR_CALM: Final = 11


class Connection(Protocol):
    """What the streams ask of their connection."""

    @property
    def h2(self) -> H2Connection:
        """The connection's h2 state machine."""

    @property
    def shared(self) -> Shared:
        """The main listener's route table, policy, clock."""

    @property
    def client_text(self) -> str:
        """The client's address, for the access log."""

    @property
    def last_stream(self) -> int | None:
        """The last stream taken once GOAWAY was sent (None: not sent)."""

    @property
    def h2_left(self) -> int:
        """What h2's own receive window still allows."""

    @property
    def closing(self) -> bool:
        """Closed, or closing: nothing more is done."""

    def to_h2(self, data: bytes) -> None:
        """Frames for h2 to judge."""

    def close_with(self, error_code: int) -> None:
        """A connection error: GOAWAY with ``error_code``, then close."""

    def progress(self) -> None:
        """A call began or carried bytes (not a PING or SETTINGS flood)."""

    def call_began(self) -> None:
        """A call was taken."""

    def calls_changed(self) -> None:
        """A call ended or an answer went: frames to send, maybe the end."""


class CallStreams:
    """The streams of one connection's calls, from the request's header
    block until both sides ended or one reset it: the `StreamOwner` of
    its `GrpcStream` calls."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.calls: dict[int, GrpcStream] = {}
        self.inflow = Inflow()
        self.outflow = Outflow(conn.h2)
        self._heads = HeadReader(conn.h2.decoder)
        self._resets = 0
        self._answered = 0
        #: Streams no longer open, the newest last: True if reset (by
        #: either side), False if the client ended it (`closed_block`).
        self._closed: dict[int, bool] = {}

    @property
    def idle(self) -> bool:
        """No call in progress and no answer waiting for a window."""
        return not self.calls and not self.outflow

    def close_all(self) -> None:
        """The connection is gone."""
        for call in list(self.calls.values()):
            call.reset()
        self.calls.clear()
        self.outflow.drop()

    # -- what the client sends -----------------------------------------------------------

    def data_frame(self, frame: h2frames.DataFrame) -> None:
        """DATA frames of one stream: an open call's (`Inflow`) to its call
        (or back at once: the call is over); any other to h2 as it came
        (stream 0, idle, closed, bad padding), which answers a closed
        stream's with RST_STREAM STREAM_CLOSED: a stream still being
        answered is then closed (RFC 9113, section 5.1, half-closed)."""
        conn = self._conn
        sid = frame.stream_id
        h2_left = conn.h2_left
        if frame.flags < 0 or not self.inflow.owns(sid):
            if frame.flags >= 0 and self.outflow.owns(sid):
                self._stream_closed(sid)
            if not self.inflow.fits(frame.length, h2_left):
                conn.close_with(_FLOW_CONTROL_ERROR)
                return
            conn.to_h2(frame.raw)
            return
        end = frame.flags & h2frames.END_STREAM
        error = self.inflow.received(sid, frame.length, len(frame.payload), bool(end), h2_left)
        if error:
            conn.close_with(error)
            return
        if frame.length:  # empty DATA is no progress: it does not excuse a PING flood
            conn.progress()
        call = self.calls.get(sid)
        if call is not None:
            call.data(frame.payload, frame.length)
        elif frame.length:  # its call is over: the bytes go back at once
            self.inflow.taken(sid, frame.length)
        if end and not conn.closing:
            self._ended(sid)

    def header_block(self, part: h2frames.HeaderBlock) -> None:
        """A header block: a call's request (a new odd stream above every
        one before it), an open call's trailers, or (any other stream) h2's
        to judge, which decodes it first as every block must be."""
        conn = self._conn
        sid = part.stream_id
        if self.inflow.owns(sid):
            self._trailers(part)
            return
        machine = conn.h2
        if not sid & 1:
            conn.to_h2(part.raw)  # h2 decodes it and refuses the stream
            return
        if sid <= machine.highest_inbound_stream_id:
            self._closed_block(part)
            return
        if len(self.inflow.streams() | self.outflow.streams()) >= MAX_STREAMS:
            conn.close_with(_PROTOCOL_ERROR)  # as h2: one more than advertised
            return
        machine.highest_inbound_stream_id = sid  # h2 judges later frames on it as closed
        if machine.state_machine.state is ConnectionState.IDLE:  # the first stream
            machine.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        head = self._heads.request(part.block)
        if isinstance(head, int):
            conn.close_with(head)
            return
        headers, length = head
        conn.progress()
        if conn.last_stream is not None and sid > conn.last_stream:
            self.outflow.reset(sid, _REFUSED_STREAM)  # after our GOAWAY: elsewhere
            self._note_closed(sid, True)
            return
        shared = conn.shared
        call = GrpcStream(self, sid, shared, conn.client_text, shared.clock.seconds())
        self.calls[sid] = call
        self.inflow.add(sid, length)
        self.outflow.open(sid)
        conn.call_began()
        call.begin(headers)
        if part.end_stream and not conn.closing:
            self._ended(sid)

    def _closed_block(self, part: h2frames.HeaderBlock) -> None:
        """A header block on a stream that is not open on the client's side,
        decoded (the table moves) and answered as h2 answers it: a stream
        error STREAM_CLOSED when still answering it or reset, a connection
        error STREAM_CLOSED when the client ended it, PROTOCOL_ERROR when it
        was never opened (RFC 9113, sections 5.1 and 5.1.1)."""
        conn = self._conn
        error = self._heads.skip(part.block)
        if error:
            conn.close_with(error)
            return
        sid = part.stream_id
        how = self._closed.get(sid)
        if self.outflow.owns(sid) or how:
            self.outflow.reset(sid, _STREAM_CLOSED)
            self._stream_closed(sid)
        else:
            conn.close_with(_PROTOCOL_ERROR if how is None else _STREAM_CLOSED)

    def _note_closed(self, stream_id: int, reset: bool) -> None:
        closed = self._closed
        closed.pop(stream_id, None)
        closed[stream_id] = reset
        if len(closed) > REMEMBERED:
            del closed[next(iter(closed))]

    def _trailers(self, part: h2frames.HeaderBlock) -> None:
        """An open call's trailers: they must end its request (as h2)."""
        error = self._heads.trailers(part.block)
        if error or not part.end_stream:
            self._conn.close_with(error or _PROTOCOL_ERROR)
            return
        self._ended(part.stream_id)

    def _ended(self, stream_id: int) -> None:
        self._note_closed(stream_id, False)
        if not self.inflow.ended(stream_id):
            self._conn.close_with(_PROTOCOL_ERROR)  # fewer bytes than its content-length
            return
        call = self.calls.get(stream_id)
        if call is not None:
            call.client_ended()

    def stream_frame(self, part: h2frames.StreamFrame) -> None:
        """RST_STREAM or WINDOW_UPDATE: an open call's are ours, any other
        h2's (a closed stream's ignored, an idle one's a connection error);
        an increment of 0 too (a PROTOCOL_ERROR h2 names)."""
        sid = part.stream_id
        if part.kind == h2frames.RST_STREAM:
            if self.inflow.owns(sid) or self.outflow.owns(sid):
                self._reset_by_client(sid)
            else:
                self._conn.to_h2(part.frame)
            return
        increment = part.value & 0x7FFFFFFF
        if not increment or not self.outflow.owns(sid):
            self._conn.to_h2(part.frame)
            return
        if not self.outflow.window_update(sid, increment):
            self.outflow.reset(sid, _FLOW_CONTROL_ERROR)  # a stream error, as h2
            self._stream_closed(sid)
        elif self.outflow.window_opened(sid):
            self._conn.calls_changed()

    def _reset_by_client(self, stream_id: int) -> None:
        self._note_closed(stream_id, True)
        self.outflow.close(stream_id)
        self.inflow.drop(stream_id)
        call = self.calls.get(stream_id)
        if call is not None and not call.over:
            self._resets += 1
            call.reset()
            if self._resets > MAX_RESETS + self._answered:
                self._conn.close_with(_ENHANCE_YOUR_CALM)
                return
        self._conn.calls_changed()

    def _stream_closed(self, stream_id: int) -> None:
        """A stream closed by a stream error (ours, or h2's answer to DATA
        on it): nothing more is sent or taken on it."""
        self._note_closed(stream_id, True)
        self.outflow.close(stream_id)
        self.inflow.drop(stream_id)
        call = self.calls.get(stream_id)
        if call is not None:
            call.reset()
        self._conn.calls_changed()

    def settings_changed(self, initial: int) -> None:
        """The client's initial window is now ``initial``: every open
        stream's send window moves with it (RFC 9113, section 6.9.2)."""
        delta = initial - self.outflow.initial_window
        self.outflow.initial_window = initial
        if not self.outflow.settings_changed(delta):
            self._conn.close_with(_FLOW_CONTROL_ERROR)
        elif delta > 0:
            self.window_opened()

    def window_opened(self) -> None:
        """The connection's send window opened (h2 keeps it)."""
        if self.outflow.window_opened(0):
            self._conn.calls_changed()

    # -- StreamOwner: what the calls ask -------------------------------------------------

    def answer(self, stream_id: int, message: bytes | None, trailers: RawHeaders) -> None:
        if self._conn.closing:
            return
        self._answered += 1
        call = self.calls.get(stream_id)
        early = call is not None and not call.client_done
        if self.outflow.answer(stream_id, message, trailers, early) and early:
            self.inflow.drop(stream_id)  # reset (NO_ERROR): what the client still sends is h2's
            self._note_closed(stream_id, True)
        self._conn.calls_changed()

    def reply_status(self, stream_id: int, status: int) -> None:
        if not self._conn.closing:
            self.outflow.reply_status(stream_id, status)
            self._conn.calls_changed()

    def open_window(self, stream_id: int, size: int) -> None:
        """``size`` bytes of ``stream_id`` are taken (or dropped): its window
        and the connection's are granted again once half of one is
        (`Inflow`), not per frame."""
        if self._conn.closing or not size:
            return
        self.inflow.taken(stream_id, size)
        self._conn.calls_changed()

    def call_over(self, call: GrpcStream) -> None:
        self.calls.pop(call.stream_id, None)
        self._conn.calls_changed()
