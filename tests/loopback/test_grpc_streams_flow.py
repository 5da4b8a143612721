"""A call's HTTP/2 stream on the wire, continued from `test_grpc_streams`:
the answer's header blocks after the client changes its HPACK table size,
a request without a message, calls interleaved frame by frame, the client
resetting a call, flow control of the answer (WINDOW_UPDATE, the client's
SETTINGS_INITIAL_WINDOW_SIZE) and the client's GOAWAY. Raw frames over
loopback, as a client sees them whoever owns the streams (h2 today)."""

from __future__ import annotations

import os
from typing import Any

from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from lgmt_proxy.rules import grpc
from tests.loopback.test_grpc_frames import _data
from tests.loopback.test_grpc_streams import (
    ANSWER,
    CANCEL,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HOLD,
    PROTOCOL_ERROR,
    REQUEST,
    STREAM_CLOSED,
    StreamsCase,
    Wire,
    headers_frame,
    message,
    settings,
)
from tests.support.helpers import sleep

UNKNOWN = [(n, b"/no.Such/Method" if n == b":path" else v) for n, v in REQUEST]
MAX_WINDOW = 2**31 - 1


def window_update(sid: int, increment: int) -> bytes:
    return WindowUpdateFrame(sid, window_increment=increment).serialize()


class AnswerTests(StreamsCase):
    async def call(
        self, client: Wire, sid: int, headers: list[tuple[bytes, bytes]] = REQUEST
    ) -> None:
        client.send(
            headers_frame(sid, client.block(headers), "END_HEADERS"), message(sid, b"%d" % sid)
        )
        await client.call(sid).ended

    async def test_header_table_size_from_the_client(self) -> None:
        """The client shrinks its HPACK table (SETTINGS_HEADER_TABLE_SIZE
        256, then 0): when the proxy's table was larger, the first header
        block sent after begins with a dynamic table size update (RFC 7541,
        4.2) that brings it within (the client's decoder checks it at the
        end of the block); and the client's decoder reads every answer,
        trailers-only ones (UNIMPLEMENTED) too."""
        client = await self.wire()
        await self.call(client, 1, UNKNOWN)
        await self.call(client, 3)
        sid = 5
        for size in (256, 0):
            before = client.decoder.header_table.maxsize
            client.decoder.max_allowed_table_size = size
            await self.settle(client, settings(HEADER_TABLE_SIZE=size))
            seen = len(client.blocks)
            await self.call(client, sid)
            self.assertEqual(client.blocks[seen][0], sid)
            if before > size:
                self.assertEqual(client.blocks[seen][1][0] & 0xE0, 0x20, client.blocks[seen])
            self.assertLessEqual(client.decoder.header_table.maxsize, size)
            await self.answered(client, sid, b"%d" % sid)
            await self.call(client, sid + 2, UNKNOWN)
            self.assertEqual(client.call(sid + 2).status, grpc.UNIMPLEMENTED)
            await self.call(client, sid + 4)
            await self.answered(client, sid + 4, b"%d" % (sid + 4))
            sid += 6
        self.assertEqual(client.call(1).status, grpc.UNIMPLEMENTED)

    async def test_end_stream_without_a_message(self) -> None:
        """HEADERS with END_STREAM, no DATA: INTERNAL, nothing sent upstream;
        the connection serves the next call."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS", "END_STREAM"))
        call = client.call(1)
        await call.ended
        self.assertEqual(call.headers.get(b":status"), b"200")
        self.assertEqual(call.status, grpc.INTERNAL)
        self.assertEqual(call.headers[b"grpc-message"], b"the request message is incomplete")
        self.assertEqual(call.data, b"")  # trailers only
        self.assertEqual(self.up.seen, [])
        await self.serves(client, 3)

    async def test_interleaved_calls(self) -> None:
        """Three calls' frames mixed on one connection: each whole."""
        client = await self.wire()
        bodies = {sid: grpc.frame_message(b"call %d " % sid * 50) for sid in (1, 3, 5)}
        client.send(*(headers_frame(sid, client.block(), "END_HEADERS") for sid in (1, 3, 5)))
        order = [(1, 0), (3, 0), (5, 0), (3, 1), (1, 1), (5, 1), (3, 2), (5, 2), (1, 2)]
        for sid, part in order:
            body = bodies[sid]
            third = len(body) // 3
            piece = body[third * part : third * (part + 1) if part < 2 else None]
            client.send(_data(sid, piece, 1 if part == 2 else 0))
        for sid in (1, 3, 5):
            await self.answered(client, sid, b"call %d " % sid * 50)
        self.assertEqual(len(self.up.seen), 3)


class ResetTests(StreamsCase):
    async def test_reset_while_the_upstream_holds_the_call(self) -> None:
        """The client resets a call the upstream holds: the upstream request
        is abandoned, nothing is sent on the stream, and the other calls of
        the connection (before and after) are answered."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        await self.serves(client, 3)
        client.send(RstStreamFrame(1, error_code=CANCEL).serialize())
        await self.up.lost
        await self.serves(client, 5)
        self.assertEqual([f for f in client.frames if f.stream_id == 1], [])
        await self.until(lambda: not self.proxy.sample("proxy_requests_in_flight", upstream="otlp"))

    async def test_reset_mid_message_then_data(self) -> None:
        """The client resets a call half-way through its message, then sends
        the rest: RST_STREAM STREAM_CLOSED for it (RFC 9113, 5.1), nothing of
        it reaches the upstream, the connection serves the next call."""
        client = await self.wire()
        body = grpc.frame_message(b"x" * 1000)
        client.send(headers_frame(1, client.block(), "END_HEADERS"), _data(1, body[:500]))
        await sleep(0.05)
        client.send(RstStreamFrame(1, error_code=CANCEL).serialize())
        await sleep(0.05)
        self.assertEqual(client.resets(), {})
        client.send(_data(1, body[500:], 1))
        await self.until(lambda: client.resets(), "RST_STREAM")
        self.assertEqual(client.resets(), {1: STREAM_CLOSED})
        await self.serves(client, 3)
        self.assertEqual([seen.body for seen in self.up.seen], [b"next"])


class WindowTests(StreamsCase):
    async def test_window_update_before_and_after_the_answer(self) -> None:
        """WINDOW_UPDATE on a call's stream while it sends, and once it is
        answered (closed): the call answered, nothing else happens."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), window_update(1, 1000))
        client.send(window_update(0, 1000), message(1))
        await self.answered(client, 1)
        client.send(window_update(1, 1000))
        await self.serves(client, 3)
        self.assertEqual(client.resets(), {})

    async def test_zero_window_opened_by_window_update(self) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE 0: the head comes, no DATA; each
        WINDOW_UPDATE on the stream lets that much of the answer go, the
        trailers after the last of it."""
        client = await self.wire(INITIAL_WINDOW_SIZE=0)
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1))
        call = client.call(1)
        await self.until(lambda: call.headers, "the answer's head")
        await sleep(0.1)
        self.assertEqual((bytes(call.data), call.trailers), (b"", {}))
        answer = grpc.frame_message(ANSWER)
        client.send(window_update(1, 4))
        await self.until(lambda: len(call.data) == 4, "4 bytes")
        await sleep(0.05)
        self.assertEqual((bytes(call.data), call.trailers), (answer[:4], {}))
        client.send(window_update(1, len(answer) - 4))
        await self.answered(client, 1)

    async def test_settings_change_opens_a_waiting_answer(self) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE 0, then raised while the answer
        waits: the change opens the stream's window (RFC 9113, 6.9.2) and
        the answer goes with no WINDOW_UPDATE."""
        client = await self.wire(INITIAL_WINDOW_SIZE=0)
        client.send(_open_1(client), message(1))
        await self.until(lambda: client.call(1).headers, "the answer's head")
        await sleep(0.1)
        self.assertEqual(client.call(1).data, b"")
        await self.settle(client, settings(INITIAL_WINDOW_SIZE=65535))
        await self.answered(client, 1)

    async def test_answers_within_the_client_windows(self) -> None:
        """Two 40 KB answers to a client with 20 KB stream windows and the
        default 64 KiB connection window, which it opens by hand: each
        window is used to its last byte and never past it, every DATA frame
        within the client's SETTINGS_MAX_FRAME_SIZE (16 KiB), the trailers
        after the whole message."""
        self.up.body = os.urandom(40_000)
        answer = grpc.frame_message(self.up.body)
        client = await self.wire(INITIAL_WINDOW_SIZE=20_000)
        one, three = client.call(1), client.call(3)

        async def have(n1: int, n3: int) -> None:
            await self.until(lambda: (len(one.data), len(three.data)) == (n1, n3), f"{n1}, {n3}")
            await sleep(0.05)  # and no more
            self.assertEqual((len(one.data), len(three.data)), (n1, n3))

        for sid in (1, 3):
            client.send(
                _open_1(client) if sid == 1 else headers_frame(3, client.block(), "END_HEADERS")
            )
            client.send(message(sid, b"%d" % sid))
        await have(20_000, 20_000)
        client.send(window_update(1, 40_000))
        await one.ended  # 20 005 more: the connection's window has 25 535
        client.send(window_update(3, 40_000))
        await have(len(answer), 25_530)
        self.assertEqual(three.trailers, {})
        client.send(window_update(0, 100_000))
        for sid in (1, 3):
            await self.answered(client, sid, b"%d" % sid)
        self.assertEqual((one.data, three.data), (answer, answer))
        sizes = [len(f.data) for f in client.frames if isinstance(f, DataFrame)]
        self.assertLessEqual(max(sizes), 16_384)

    async def test_overflowing_window(self) -> None:
        """An increment taking a window past 2^31-1 (RFC 9113, 6.9.1): on a
        call's stream RST_STREAM FLOW_CONTROL_ERROR, the call abandoned and
        the connection serving on; on the connection GOAWAY FLOW_CONTROL_ERROR."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        client.send(window_update(1, MAX_WINDOW))
        await self.until(lambda: client.resets(), "RST_STREAM")
        self.assertEqual(client.resets(), {1: FLOW_CONTROL_ERROR})
        await self.up.lost
        await self.serves(client, 3)
        await self.refused(client, FLOW_CONTROL_ERROR, window_update(0, MAX_WINDOW))

    async def test_zero_increment(self) -> None:
        """RFC 9113, 6.9: a connection error PROTOCOL_ERROR on stream 0, a
        stream error on a call's stream, which h2 makes a connection error
        (5.4.1 allows it)."""
        client = await self.wire()
        await self.refused(client, PROTOCOL_ERROR, window_update(0, 0))
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        client.send(window_update(1, 0))
        await client.closed
        self.assertEqual(client.goaway(), PROTOCOL_ERROR)
        await self.up.lost


class PingTests(StreamsCase):
    async def test_ping_acknowledged_in_order(self) -> None:
        """A PING is answered with the same 8 bytes, ACK set (RFC 9113,
        6.7), between a call's frames; an acknowledgement is not answered;
        the connection's WINDOW_UPDATE opens the window answers wait for."""
        client = await self.wire()
        client.send(PingFrame(0, opaque_data=b"abcdefgh").serialize())
        client.send(PingFrame(0, opaque_data=b"ijklmnop", flags=["ACK"]).serialize())
        await self.serves(client, 1)
        pings = [f for f in client.frames if isinstance(f, PingFrame)]
        self.assertEqual([(p.opaque_data, "ACK" in p.flags) for p in pings], [(b"abcdefgh", True)])
        client.send(window_update(0, 1000))
        await self.serves(client, 3)


class GoawayTests(StreamsCase):
    async def test_client_goaway_when_idle(self) -> None:
        """A client going away (GOAWAY NO_ERROR) with no call in progress:
        the connection closes."""
        client = await self.wire()
        await self.serves(client, 1)
        client.send(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
        await client.closed
        self.assertEqual(len(self.up.seen), 1)

    async def test_client_goaway_during_a_call(self) -> None:
        """GOAWAY NO_ERROR from the client with a call in progress (RFC 9113,
        6.8: it covers the streams the client would open, not its own): the
        call is answered (the proxy's GOAWAY, naming it, may come first),
        then the connection closes."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        client.send(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
        await sleep(0.05)
        held = self.up.held[0]
        held.write(self.up.body)
        held.finish()
        call = client.call(1)
        await call.ended
        self.assertEqual(call.status, 0)
        await client.closed
        self.assertEqual(client.goaway(), 0)

    async def test_client_goaway_with_an_error(self) -> None:
        """GOAWAY INTERNAL_ERROR from the client (RFC 9113, 5.4.1: it closes
        the connection next): the connection closes, and the call in
        progress is abandoned upstream."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        client.send(GoAwayFrame(0, last_stream_id=0, error_code=2).serialize())
        await client.closed
        await self.up.lost
        await self.until(lambda: not self.proxy.sample("proxy_requests_in_flight", upstream="otlp"))


def _frame(kind: int, sid: int, payload: bytes, flags: int = 0) -> bytes:
    """Any frame as bytes (hyperframe refuses to build the wrong ones)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def _open_1(client: Wire) -> bytes:
    """The HEADERS opening stream 1."""
    return headers_frame(1, client.block(), "END_HEADERS")


class StreamStateTests(StreamsCase):
    async def test_connection_errors(self) -> None:
        """Frames no stream state allows: RST_STREAM or WINDOW_UPDATE on an
        idle stream (RFC 9113, 5.1), HEADERS or RST_STREAM on stream 0 (6.2,
        6.4), HEADERS padded past its end (6.2): PROTOCOL_ERROR; RST_STREAM,
        WINDOW_UPDATE or PRIORITY of the wrong length (6.3, 6.4, 6.9):
        FRAME_SIZE_ERROR (a stream error for PRIORITY, which h2 makes a
        connection error: 5.4.1 allows it)."""
        cases: list[tuple[int, list[Any]]] = [
            (PROTOCOL_ERROR, [RstStreamFrame(1, error_code=CANCEL).serialize()]),
            (PROTOCOL_ERROR, [window_update(1, 8)]),
            (PROTOCOL_ERROR, [lambda c: _frame(1, 0, c.block(), 0x4)]),
            (PROTOCOL_ERROR, [_frame(3, 0, b"\0\0\0\x08")]),
            (PROTOCOL_ERROR, [_frame(1, 1, b"\x09abc", 0xC)]),  # PADDED, END_HEADERS
            (FRAME_SIZE_ERROR, [_open_1, _frame(3, 1, b"\0\0\0\x08\0")]),
            (FRAME_SIZE_ERROR, [_open_1, _frame(8, 1, b"\0\0\0\x01\0")]),
            (FRAME_SIZE_ERROR, [_frame(2, 1, b"\0\0\0\0")]),
        ]
        for code, frames in cases:
            client = await self.wire()
            sent = [f if isinstance(f, bytes) else f(client) for f in frames]
            await self.refused(client, code, *sent)

    async def test_data_on_a_stream_the_client_ended(self) -> None:
        """DATA after END_STREAM while the call waits for the upstream (RFC
        9113, 5.1, half-closed (remote)): RST_STREAM STREAM_CLOSED, the call
        abandoned upstream, the connection serving on."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        client.send(_data(1, b"late"))
        await self.until(lambda: client.resets(), "RST_STREAM")
        self.assertEqual(client.resets(), {1: STREAM_CLOSED})
        await self.up.lost
        await self.serves(client, 3)

    async def test_trailers_on_a_stream_the_client_ended(self) -> None:
        """HEADERS after END_STREAM while the call waits: RST_STREAM
        STREAM_CLOSED, the call abandoned; the block was decoded (RFC 9113,
        4.3): a later call refers to what it indexed."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        indexed = [*REQUEST, (b"x-request-id", b"late")]
        client.send(headers_frame(1, client.block(indexed), "END_HEADERS", "END_STREAM"))
        await self.until(lambda: client.resets(), "RST_STREAM")
        self.assertEqual(client.resets(), {1: STREAM_CLOSED})
        await self.up.lost
        block = client.block(indexed)
        self.assertEqual(len(block), len(indexed))  # references only
        client.send(headers_frame(3, block, "END_HEADERS"), message(3, b"three"))
        await self.answered(client, 3, b"three")
        self.assertEqual(self.up.seen[-1].header(b"X-Request-Id"), [b"late"])

    async def test_window_update_and_reset_after_the_client_reset(self) -> None:
        """WINDOW_UPDATE and RST_STREAM on a stream the client reset: no
        RST_STREAM in answer (RFC 9113, 5.4.2), the connection serving on."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, HOLD))
        await self.until(lambda: self.up.held, "upstream holds the call")
        reset = RstStreamFrame(1, error_code=CANCEL).serialize()
        client.send(reset, window_update(1, 100), reset)
        await self.up.lost
        await self.serves(client, 3)
        self.assertEqual(client.resets(), {})
        self.assertEqual([f for f in client.frames if f.stream_id == 1], [])
