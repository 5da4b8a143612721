"""What the OTLP/gRPC bridge tells h2 of a call's ordinary end without h2
parsing or building its frames: the client's END_STREAM (an empty DATA
frame) and an answer that succeeded (HEADERS, one DATA frame, trailers).
h2 did each in Python, per call, about a third of the bridge's own CPU
(framing, HPACK, its state machines and a debug line formatted for every
frame); here its state moves as its own calls would move it, through its
public state machines and windows, and the frames are built once
(`ok_answer_frames`). h2 stays the judge of everything else: the
client's HEADERS (HPACK, header checks, stream limits), every stream that
is not in the expected state, every answer that is not a plain success.
"""

from __future__ import annotations

from typing import Final

from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.stream import StreamInputs, StreamState


def received_end(conn: H2Connection, stream_id: int) -> bool:
    """The client ended ``stream_id`` with an empty DATA frame, told to h2
    as ``receive_data`` would tell it (its connection and stream state
    machines; no window moves for an empty frame), when the stream is open
    in h2: True. False: the frame must go to h2 itself, which judges it.
    The ``content-length`` check h2 would make is the bridge's own
    (`grpc_flow.Inflow.ended`)."""
    stream = conn.streams.get(stream_id)
    if (
        stream is None
        or stream.state_machine.state is not StreamState.OPEN
        or conn.state_machine.state is not ConnectionState.SERVER_OPEN
    ):
        return False
    conn.state_machine.process_input(ConnectionInputs.RECV_DATA)
    machine = stream.state_machine
    machine.process_input(StreamInputs.RECV_DATA)
    machine.process_input(StreamInputs.RECV_END_STREAM)
    return True


def answered(conn: H2Connection, stream_id: int, message: bytes) -> bytes | None:
    """The frames answering ``stream_id`` with ``message`` and ``grpc-status:
    0``, h2's state moved as its ``send_headers``, ``send_data`` and
    ``send_headers(end_stream=True)`` would move it (state machines, both
    windows); or None, and nothing changed, unless all of it can go at once
    the plain way: the client has ended its request (the stream is
    half-closed on its side), the message fits one frame and the windows,
    and h2's encoder owes no table size update (RFC 7541, section 4.2: it
    must begin the next header block, so h2 sends that one)."""
    stream = conn.streams.get(stream_id)
    size = len(message)
    if (
        stream is None
        or stream.state_machine.state is not StreamState.HALF_CLOSED_REMOTE
        or conn.state_machine.state is not ConnectionState.SERVER_OPEN
        or conn.encoder.table_size_changes
        or size > conn.max_outbound_frame_size
        or size > conn.outbound_flow_control_window
        or size > stream.outbound_flow_control_window
    ):
        return None
    machine, connection = stream.state_machine, conn.state_machine
    connection.process_input(ConnectionInputs.SEND_HEADERS)
    machine.process_input(StreamInputs.SEND_HEADERS)
    connection.process_input(ConnectionInputs.SEND_DATA)
    machine.process_input(StreamInputs.SEND_DATA)
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    connection.process_input(ConnectionInputs.SEND_HEADERS)
    machine.process_input(StreamInputs.SEND_HEADERS)
    machine.process_input(StreamInputs.SEND_END_STREAM)
    return ok_answer_frames(stream_id, message)


#: The header blocks of an answer that succeeded, HPACK-encoded once: the
#: response head (``:status: 200`` from the static table, ``content-type:
#: application/grpc`` a literal without indexing) and the trailers
#: (``grpc-status: 0``, a literal without indexing). Neither reads nor adds
#: to the dynamic table, so h2's encoder and the client's decoder stay in
#: step whatever h2 sends between them (a table size update aside: see
#: `answered`).
OK_HEAD_BLOCK: Final = b"\x88\x0f\x10\x10application/grpc"
OK_TRAILERS_BLOCK: Final = b"\x00\x0bgrpc-status\x010"


def ok_answer_frames(stream_id: int, message: bytes) -> bytes:
    """The three frames answering a call that succeeded: HEADERS (the
    response head), DATA (``message``, prefix included: it must fit the
    peer's frame size and windows) and HEADERS with END_STREAM (the
    trailers)."""
    sid = stream_id.to_bytes(4, "big")
    return b"".join(
        [
            len(OK_HEAD_BLOCK).to_bytes(3, "big"),
            b"\x01\x04",
            sid,
            OK_HEAD_BLOCK,
            len(message).to_bytes(3, "big"),
            b"\x00\x00",
            sid,
            message,
            len(OK_TRAILERS_BLOCK).to_bytes(3, "big"),
            b"\x01\x05",
            sid,
            OK_TRAILERS_BLOCK,
        ]
    )
