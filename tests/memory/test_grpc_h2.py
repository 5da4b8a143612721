"""The gRPC bridge's ways past h2 (`dataplane.grpc_h2`) against h2's own:
a call's END_STREAM and its answer, told to h2 without its framing, leave
h2 exactly where its own calls would, and a client (h2 as the client, in
memory) reads the same answer either way."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import RstStreamFrame
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane import grpc_h2, grpc_server
from lgmt_proxy.dataplane.grpc_flow import GRPC_HEAD, Outflow
from lgmt_proxy.rules import grpc
from tests.loopback.test_grpc import _frames

EXPORT = b"/opentelemetry.proto.collector.trace.v1.TraceService/Export"
REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1"),
    (b":path", EXPORT),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
MESSAGE = grpc.frame_message(b"\x0a\x02ok")


class Pair:
    """A client and the listener's h2 state machine, talking in memory."""

    def __init__(self, client_settings: dict[int, int] | None = None) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.server = h2.connection.H2Connection(grpc_server._CONFIG)
        grpc_server._initiate(self.server)
        self.to_server(self.client.data_to_send())
        self.to_client(self.server.data_to_send())
        self.to_server(self.client.data_to_send())
        self.to_client(self.server.data_to_send())

    def to_server(self, data: bytes) -> list[h2.events.Event]:
        return self.server.receive_data(data)

    def to_client(self, data: bytes) -> list[h2.events.Event]:
        return self.client.receive_data(data)

    def request(self, *, end: bool) -> int:
        """A call's HEADERS (and, with ``end``, its message and END_STREAM
        as h2 itself takes them)."""
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, REQUEST)
        self.to_server(self.client.data_to_send())
        if end:
            self.to_server(grpc.end_data_frame(sid))
        return sid

    def state(self, sid: int) -> tuple[Any, ...]:
        """What h2 knows of the call and the connection."""
        server = self.server
        stream = server.streams.get(sid)
        return (
            None if stream is None else stream.state_machine.state,
            None if stream is None else stream.closed_by,
            None if stream is None else stream.outbound_flow_control_window,
            server.outbound_flow_control_window,
            server.open_inbound_streams,
            server.state_machine.state,
        )


def _answer_by_h2(conn: h2.connection.H2Connection, sid: int, message: bytes) -> bytes:
    conn.send_headers(sid, GRPC_HEAD)
    conn.send_data(sid, message)
    conn.send_headers(sid, grpc.OK_TRAILERS, end_stream=True)
    return conn.data_to_send()


def _seen(events: list[h2.events.Event]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for e in events:
        if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived):
            out.append((type(e).__name__, list(e.headers or ())))
        elif isinstance(e, h2.events.DataReceived):
            out.append(("data", e.data))
        elif isinstance(e, h2.events.StreamEnded):
            out.append(("ended", e.stream_id))
    return out


class AnswerTests(TestCase):
    def test_same_state_and_same_answer_as_h2(self) -> None:
        ours, theirs = Pair(), Pair()
        for _ in range(3):  # later calls too: HPACK's tables stay in step
            sid = ours.request(end=True)
            self.assertEqual(theirs.request(end=True), sid)
            frames = grpc_h2.answered(ours.server, sid, MESSAGE)
            assert frames is not None
            self.assertEqual(ours.server.data_to_send(), b"")  # nothing built by h2
            by_h2 = _answer_by_h2(theirs.server, sid, MESSAGE)
            self.assertEqual(ours.state(sid), theirs.state(sid))
            seen = _seen(ours.to_client(frames))
            self.assertEqual(seen, _seen(theirs.to_client(by_h2)))
            self.assertEqual(
                seen,
                [
                    ("ResponseReceived", GRPC_HEAD),
                    ("data", MESSAGE),
                    ("TrailersReceived", grpc.OK_TRAILERS),
                    ("ended", sid),
                ],
            )
        # The client's HPACK table holds nothing of ours: literals, not indexed.
        self.assertEqual(len(ours.client.decoder.header_table.dynamic_entries), 0)

    def test_a_frame_on_the_answered_stream_is_judged_as_by_h2(self) -> None:
        """DATA after the call closed: the same answer either way (h2's
        RST_STREAM, STREAM_CLOSED)."""
        answers = []
        for fast in (True, False):
            pair = Pair()
            sid = pair.request(end=True)
            if fast:
                pair.to_client(grpc_h2.answered(pair.server, sid, MESSAGE) or b"")
            else:
                pair.to_client(_answer_by_h2(pair.server, sid, MESSAGE))
            late = len(MESSAGE).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + MESSAGE
            events = pair.to_server(late)
            answers.append((events, pair.server.data_to_send()))
        self.assertEqual(answers[0], answers[1])
        reset = [f for f in _frames(answers[0][1]) if isinstance(f, RstStreamFrame)]
        self.assertEqual([(f.stream_id, f.error_code) for f in reset], [(1, 5)])

    def test_left_to_h2_when_not_plain(self) -> None:
        """None and h2's state untouched: the request still open, a message
        over the client's window, a table size update owed."""
        pair = Pair()
        sid = pair.request(end=False)
        before = pair.state(sid)
        self.assertIsNone(grpc_h2.answered(pair.server, sid, MESSAGE))
        self.assertEqual(pair.state(sid), before)

        small = Pair({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4})
        sid = small.request(end=True)
        before = small.state(sid)
        self.assertIsNone(grpc_h2.answered(small.server, sid, MESSAGE))
        self.assertEqual(small.state(sid), before)

        self.assertIsNone(grpc_h2.answered(pair.server, 99, MESSAGE))  # no such stream

    def test_table_size_update_sent_by_h2_first(self) -> None:
        """The client shrinks HPACK's table: the next answer is h2's (its
        header block begins with the update, RFC 7541 section 4.2), the
        ones after are built past h2 again."""
        pair = Pair({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        out = Outflow(pair.server)
        first = pair.request(end=True)
        self.assertTrue(out.answer(first, MESSAGE, grpc.OK_TRAILERS, False))
        self.assertEqual(out.sent, [])  # h2's own frames
        block = pair.server.data_to_send()
        self.assertEqual(block[9], 0x20)  # the size update (0) opens the block
        self.assertEqual(len(_seen(pair.to_client(block))), 4)
        second = pair.request(end=True)
        self.assertTrue(out.answer(second, MESSAGE, grpc.OK_TRAILERS, False))
        self.assertEqual(len(out.sent), 2)
        self.assertEqual(len(_seen(pair.to_client(b"".join(out.sent)))), 4)

    def test_failures_and_early_answers_go_through_h2(self) -> None:
        pair = Pair()
        out = Outflow(pair.server)
        sid = pair.request(end=True)
        trailers = grpc.trailers(grpc.UNAVAILABLE, "upstream answered 503")
        self.assertTrue(out.answer(sid, None, trailers, False))
        self.assertEqual(out.sent, [])
        seen = _seen(pair.to_client(pair.server.data_to_send()))
        self.assertEqual(seen, [("ResponseReceived", [*GRPC_HEAD, *trailers]), ("ended", sid)])

    def test_what_h2_queued_before_goes_first(self) -> None:
        pair = Pair()
        out = Outflow(pair.server)
        sid = pair.request(end=True)
        pair.server.ping(b"12345678")
        self.assertTrue(out.answer(sid, MESSAGE, grpc.OK_TRAILERS, False))
        events = pair.to_client(b"".join(out.sent))
        self.assertIsInstance(events[0], h2.events.PingReceived)


class EndTests(TestCase):
    def test_same_state_as_h2_taking_an_empty_data_frame(self) -> None:
        ours, theirs = Pair(), Pair()
        sid = ours.request(end=False)
        theirs.request(end=False)
        self.assertTrue(grpc_h2.received_end(ours.server, sid))
        events = theirs.to_server(grpc.end_data_frame(sid))
        self.assertIn(sid, [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)])
        self.assertEqual(ours.state(sid), theirs.state(sid))
        # A second END_STREAM is h2's to judge: the stream is no longer open.
        self.assertFalse(grpc_h2.received_end(ours.server, sid))
        self.assertEqual(ours.state(sid), theirs.state(sid))
        self.assertFalse(grpc_h2.received_end(ours.server, 99))
