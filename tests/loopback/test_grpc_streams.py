"""A call's HTTP/2 stream as a client sees it on the wire, frame by frame:
request header blocks (CONTINUATION, padding, priority), client trailers,
HPACK state on both sides across calls, malformed header lists and stream
ids. Raw frames over loopback (hyperframe builds them, the client's own
HPACK encoder and decoder keep the header blocks' state), so that these
hold whoever owns the streams in the listener (h2 today). Flow control,
resets and interleaving are in `test_grpc_streams_flow`."""

from __future__ import annotations

from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET

from lgmt_proxy.rules import grpc
from tests.loopback.test_grpc import TRACES, Call, _frames, request_headers
from tests.loopback.test_grpc_frames import RawClient, _data, serve_grpc
from tests.support.helpers import Recorder, sleep

#: RFC 9113, 3.4 (spelled out: the tests do not lean on where the listener keeps it).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR = 1
FLOW_CONTROL_ERROR = 3
STREAM_CLOSED = 5
FRAME_SIZE_ERROR = 6
CANCEL = 8
#: What the recording upstream answers (an ExportTraceServiceResponse).
ANSWER = b"\x0a\x02\x08\x01"
#: A message the upstream holds unanswered (`HoldingUpstream`).
HOLD = b"hold"
REQUEST = request_headers()


class HoldingUpstream(Recorder):
    """Records and answers every request, but holds one whose body is
    `HOLD`; ``lost`` fires when the proxy abandons a held one."""

    def __init__(self) -> None:
        super().__init__()
        self.headers = [(b"Content-Type", b"application/x-protobuf")]
        self.body = ANSWER
        self.held: list[Any] = []
        self.lost: Deferred[None] = Deferred()

    def render(self, request: Any) -> Any:
        answer = super().render(request)
        if self.seen[-1].body != HOLD:
            return answer
        self.held.append(request)
        request.notifyFinish().addErrback(lambda _: _fire(self.lost))
        return NOT_DONE_YET


class Wire(RawClient):
    """A client of raw frames. Its header blocks come from its own HPACK
    encoder (`block`); what the proxy sends is parsed as whole frames
    arrive, every header block decoded in order by its own HPACK decoder,
    per stream as a `Call` (first block the head, a later one the
    trailers). Acknowledges the proxy's SETTINGS, as clients do."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: list[Any] = []
        #: (stream id, header block as sent) in the order received.
        self.blocks: list[tuple[int, bytes]] = []
        self.calls: dict[int, Call] = {}
        self._parsed = 0
        self._block: tuple[int, bytearray, bool] | None = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        end = self._parsed
        while end + 9 <= len(self.raw):
            length = int.from_bytes(self.raw[end : end + 3], "big")
            if end + 9 + length > len(self.raw):
                break
            end += 9 + length
        frames = _frames(bytes(self.raw[self._parsed : end]))
        self._parsed = end
        for frame in frames:
            self.frames.append(frame)
            self._take(frame)

    def _take(self, frame: Frame) -> None:
        sid = frame.stream_id
        if self._block is not None:  # a header block's frames are contiguous (RFC 9113, 4.3)
            assert isinstance(frame, ContinuationFrame) and sid == self._block[0], frame
        call = self.calls.setdefault(sid, Call()) if sid else None
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.send(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, HeadersFrame):
            self._block = (sid, bytearray(frame.data), "END_STREAM" in frame.flags)
        elif isinstance(frame, ContinuationFrame):
            assert self._block is not None, frame
            self._block[1].extend(frame.data)
        elif isinstance(frame, RstStreamFrame) and call is not None:
            call.reset = frame.error_code
            _fire(call.ended)
        elif isinstance(frame, DataFrame) and call is not None:
            call.data += frame.data
            if "END_STREAM" in frame.flags:
                _fire(call.ended)
        if self._block is not None and "END_HEADERS" in frame.flags and call is not None:
            sid, block, end = self._block
            self._block = None
            self.blocks.append((sid, bytes(block)))
            headers = dict(self.decoder.decode(bytes(block), raw=True))
            if call.headers:
                call.trailers = headers
            else:
                call.headers = headers
            if end:
                _fire(call.ended)

    def connectionLost(self, reason: Any = None) -> None:
        for call in self.calls.values():
            _fire(call.ended)
        super().connectionLost(reason)

    def send(self, *frames: bytes) -> None:
        self.transport.write(b"".join(frames))  # type: ignore[union-attr]

    def block(self, headers: list[tuple[bytes, bytes]] = REQUEST) -> bytes:
        return self.encoder.encode(headers)

    def call(self, sid: int) -> Call:
        return self.calls.setdefault(sid, Call())

    def acks(self) -> int:
        """SETTINGS acknowledgements received."""
        return sum(1 for f in self.frames if isinstance(f, SettingsFrame) and "ACK" in f.flags)

    def resets(self) -> dict[int, int]:
        return {f.stream_id: f.error_code for f in self.frames if isinstance(f, RstStreamFrame)}

    def goaway(self) -> int | None:
        codes = [f.error_code for f in self.frames if isinstance(f, GoAwayFrame)]
        return codes[0] if codes else None


def _fire(d: Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


def headers_frame(sid: int, block: bytes, *flags: str, **kw: Any) -> bytes:
    return HeadersFrame(sid, data=block, flags=flags, **kw).serialize()


def continuation(sid: int, block: bytes, *flags: str) -> bytes:
    return ContinuationFrame(sid, data=block, flags=flags).serialize()


def settings(**values: int) -> bytes:
    """A SETTINGS frame, ``values`` by hyperframe's names (``INITIAL_WINDOW_SIZE``)."""
    return SettingsFrame(
        0, settings={getattr(SettingsFrame, k): v for k, v in values.items()}
    ).serialize()


def message(sid: int, payload: bytes = b"spans", end: bool = True) -> bytes:
    """The call's message in one DATA frame (END_STREAM with ``end``)."""
    return _data(sid, grpc.frame_message(payload), 1 if end else 0)


class StreamsCase(TestCase):
    """The gRPC listener in front of a `HoldingUpstream`, and `Wire` clients."""

    timeout = 30

    def setUp(self) -> None:
        self.up = HoldingUpstream()
        self.proxy, self.grpc, self.port = serve_grpc(self, self.up)

    async def wire(self, **values: int) -> Wire:
        """A connection past the preface, its SETTINGS (``values``, see
        `settings`) acknowledged."""
        client = Wire()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        client.send(PREFACE)
        await self.settle(client, settings(**values))
        return client

    async def settle(self, client: Wire, frame: bytes) -> None:
        """Send a SETTINGS ``frame``; back once the proxy acknowledged it."""
        acks = client.acks()
        client.send(frame)
        await self.until(lambda: client.acks() > acks, "SETTINGS acknowledged")

    async def until(self, condition: Any, what: str = "condition") -> None:
        for _ in range(1000):
            if condition():
                return
            await sleep(0.005)
        self.fail(f"{what}: not met in time")

    async def answered(self, client: Wire, sid: int, payload: bytes = b"spans") -> None:
        """Stream ``sid`` answered as a call that succeeded, ``payload``
        the message the upstream got."""
        call = client.call(sid)
        await call.ended
        self.assertIsNone(call.reset)
        self.assertEqual(call.headers.get(b":status"), b"200", call)
        self.assertEqual(call.headers.get(b"content-type"), b"application/grpc")
        self.assertEqual(call.message, self.up.body)
        self.assertEqual(call.status, 0)
        self.assertIn(payload, [seen.body for seen in self.up.seen])

    async def serves(self, client: Wire, sid: int) -> None:
        """The connection still serves a call, on stream ``sid``."""
        client.send(headers_frame(sid, client.block(), "END_HEADERS"), message(sid, b"next"))
        await self.answered(client, sid, b"next")
        self.assertIsNone(client.goaway())

    async def refused(self, client: Wire, code: int, *frames: bytes) -> None:
        """``frames`` end the connection with GOAWAY ``code``; no call of
        theirs reached the upstream."""
        seen = len(self.up.seen)
        client.send(*frames)
        await client.closed
        self.assertEqual(client.goaway(), code)
        self.assertEqual(len(self.up.seen), seen)


class HeaderBlockTests(StreamsCase):
    async def test_continuation_frames(self) -> None:
        """A request's header block cut into HEADERS and one CONTINUATION,
        then into HEADERS and three: both calls answered."""
        client = await self.wire()
        block = client.block()
        client.send(
            headers_frame(1, block[:7]), continuation(1, block[7:], "END_HEADERS"), message(1)
        )
        await self.answered(client, 1)
        block = client.block()
        cut = [block[:3], block[3:5], block[5:9], block[9:]]
        client.send(
            headers_frame(3, cut[0]),
            continuation(3, cut[1]),
            continuation(3, cut[2]),
            continuation(3, cut[3], "END_HEADERS"),
            message(3, b"three"),
        )
        await self.answered(client, 3, b"three")
        await self.serves(client, 5)

    async def test_continuation_out_of_place(self) -> None:
        """RFC 9113, 6.10: a CONTINUATION with no header block open, or of
        another stream than the open block's, and HEADERS inside a block
        are connection errors PROTOCOL_ERROR."""
        cases = [
            lambda c: [continuation(1, c.block(), "END_HEADERS")],
            lambda c: [headers_frame(1, c.block()[:3]), continuation(3, b"", "END_HEADERS")],
            lambda c: [headers_frame(1, c.block()[:3]), headers_frame(3, b"", "END_HEADERS")],
        ]
        for frames in cases:
            client = await self.wire()
            await self.refused(client, PROTOCOL_ERROR, *frames(client))

    async def test_padded_headers(self) -> None:
        client = await self.wire()
        client.send(
            headers_frame(1, client.block(), "END_HEADERS", "PADDED", pad_length=40), message(1)
        )
        await self.answered(client, 1)
        await self.serves(client, 3)

    async def test_priority(self) -> None:
        """HEADERS with the PRIORITY flag, depending on stream 0 and on
        another stream (exclusive, weighted), and PRIORITY frames on a
        call's stream and on an idle one (RFC 9113, 5.1: it stays idle):
        every call answered as any other."""
        client = await self.wire()
        priority: dict[str, Any] = {"depends_on": 0, "stream_weight": 200}
        client.send(headers_frame(1, client.block(), "END_HEADERS", "PRIORITY", **priority))
        client.send(PriorityFrame(1, depends_on=0, stream_weight=3).serialize(), message(1))
        await self.answered(client, 1)
        priority = {"depends_on": 1, "stream_weight": 15, "exclusive": True}
        client.send(headers_frame(3, client.block(), "END_HEADERS", "PRIORITY", **priority))
        client.send(PriorityFrame(9, depends_on=3).serialize(), message(3, b"three"))
        await self.answered(client, 3, b"three")
        await self.serves(client, 5)  # below 9: PRIORITY opened no stream

    async def test_stream_depending_on_itself(self) -> None:
        """RFC 9113, 5.3.1: a stream error PROTOCOL_ERROR, which h2 makes a
        connection error (5.4.1 allows it), in HEADERS or in PRIORITY."""
        client = await self.wire()
        frame = headers_frame(1, client.block(), "END_HEADERS", "PRIORITY", depends_on=1)
        await self.refused(client, PROTOCOL_ERROR, frame, message(1))
        client = await self.wire()
        await self.serves(client, 1)
        await self.refused(client, PROTOCOL_ERROR, PriorityFrame(3, depends_on=3).serialize())

    # -- client trailers -------------------------------------------------------------------

    async def test_trailers_end_the_request(self) -> None:
        """DATA, then trailers (HEADERS with END_STREAM), once in one frame
        and once in HEADERS and a CONTINUATION: both calls answered."""
        client = await self.wire()  # blocks encoded in the order they are sent
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1, end=False))
        trailers = client.block([(b"x-checksum", b"abc")])
        client.send(headers_frame(1, trailers, "END_HEADERS", "END_STREAM"))
        await self.answered(client, 1)
        client.send(headers_frame(3, client.block(), "END_HEADERS"))
        trailers = client.block([(b"x-checksum", b"def"), (b"x-more", b"ghi")])
        client.send(
            message(3, b"three", end=False),
            headers_frame(3, trailers[:4], "END_STREAM"),
            continuation(3, trailers[4:], "END_HEADERS"),
        )
        await self.answered(client, 3, b"three")
        await self.serves(client, 5)

    async def test_trailers_without_end_stream(self) -> None:
        """RFC 9113, 8.1: a malformed request; h2 makes it a connection error."""
        client = await self.wire()
        opening = headers_frame(1, client.block(), "END_HEADERS")
        trailers = client.block([(b"x-checksum", b"abc")])
        frames = opening, message(1, end=False), headers_frame(1, trailers, "END_HEADERS")
        await self.refused(client, PROTOCOL_ERROR, *frames)

    async def test_trailers_with_a_pseudo_header(self) -> None:
        """RFC 9113, 8.1: trailers carry no pseudo-header (malformed)."""
        client = await self.wire()
        opening = headers_frame(1, client.block(), "END_HEADERS")
        trailers = client.block([(b":path", TRACES)])
        last = headers_frame(1, trailers, "END_HEADERS", "END_STREAM")
        await self.refused(client, PROTOCOL_ERROR, opening, message(1, end=False), last)

    # -- HPACK state across calls ----------------------------------------------------------

    async def test_indexed_headers_across_calls(self) -> None:
        """The client's encoder indexes the request's headers on call 1 and
        sends calls 2 and 3 as references only: the proxy's decoder kept
        them, every call is whole (the metadata it forwards with them)."""
        client = await self.wire()
        request = [*REQUEST, (b"user-agent", b"grpc-test/1"), (b"x-request-id", b"abc")]
        for sid in (1, 3, 5):
            block = client.block(request)
            if sid > 1:  # one byte a field, each an index into the dynamic table
                self.assertEqual(len(block), len(request))
                self.assertTrue(all(b & 0x80 for b in block), block)
            client.send(headers_frame(sid, block, "END_HEADERS"), message(sid, b"%d" % sid))
            await self.answered(client, sid, b"%d" % sid)
            self.assertEqual(self.up.seen[-1].header(b"User-Agent"), [b"grpc-test/1"])
            self.assertEqual(self.up.seen[-1].header(b"X-Request-Id"), [b"abc"])

    async def test_table_size_updates_from_the_client(self) -> None:
        """Dynamic table size updates at the start of a request's block
        (RFC 7541, 6.3): to 256, to 0 (every entry evicted), back to 4096,
        each block then indexing or referring as it may; every call whole."""
        client = await self.wire()
        request = [*REQUEST, (b"user-agent", b"grpc-test/1")]
        client.send(headers_frame(1, client.block(request), "END_HEADERS"), message(1))
        await self.answered(client, 1)
        for sid, size, start in (
            (3, 256, b"\x3f\xe1\x01"),
            (5, 0, b"\x20"),
            (7, 4096, b"\x3f\xe1\x1f"),
        ):
            client.encoder.header_table_size = size
            block = client.block(request)
            self.assertTrue(block.startswith(start), block)
            client.send(headers_frame(sid, block, "END_HEADERS"), message(sid, b"%d" % sid))
            await self.answered(client, sid, b"%d" % sid)
            self.assertEqual(self.up.seen[-1].header(b"User-Agent"), [b"grpc-test/1"])
        await self.serves(client, 9)

    async def test_undecodable_header_blocks(self) -> None:
        """A block that does not decode ends the connection with GOAWAY,
        nothing sent upstream; other clients are served. (Its code is not
        asserted: RFC 9113, 4.3 says COMPRESSION_ERROR, h2 sends
        PROTOCOL_ERROR.)"""
        bad = [
            b"\xff\x7f",  # an index far past both tables
            b"\x00\x05x-abc\x7f\x01",  # a literal's value longer than the block
            b"\x3f\xe2\x1f",  # a table size update over SETTINGS_HEADER_TABLE_SIZE (4096)
            b"\x82\x3f\xe1\x01",  # a table size update after a field (RFC 7541, 4.2)
        ]
        for block in bad:
            client = await self.wire()
            client.send(headers_frame(1, block, "END_HEADERS"), message(1))
            await client.closed
            self.assertIsNotNone(client.goaway(), block)
        self.assertEqual(self.up.seen, [])
        await self.serves(await self.wire(), 1)

    async def test_invalid_header_lists(self) -> None:
        """Malformed requests (RFC 9113, 8.2 and 8.3): h2 makes each a
        connection error PROTOCOL_ERROR (5.4.1 allows it)."""
        path = REQUEST[2]
        bad = {
            "uppercase name": [*REQUEST, (b"X-Upper", b"1")],
            "connection header": [*REQUEST, (b"connection", b"keep-alive")],
            "te other than trailers": [*REQUEST[:-1], (b"te", b"gzip")],
            "no :path": [h for h in REQUEST if h != path],
            "two :path": [*REQUEST[:3], path, *REQUEST[3:]],
            "pseudo-header after a field": [*REQUEST[:2], *REQUEST[3:], path],
        }
        for what, headers in bad.items():
            client = await self.wire()
            client.send(headers_frame(1, client.block(headers), "END_HEADERS"), message(1))
            await client.closed
            self.assertEqual(client.goaway(), PROTOCOL_ERROR, what)
        self.assertEqual(self.up.seen, [])

    # -- stream ids ------------------------------------------------------------------------

    async def test_even_stream_id(self) -> None:
        """RFC 9113, 5.1.1: a connection error PROTOCOL_ERROR."""
        client = await self.wire()
        await self.refused(client, PROTOCOL_ERROR, headers_frame(2, client.block(), "END_HEADERS"))

    async def test_stream_id_lower_than_a_previous_one(self) -> None:
        """RFC 9113, 5.1.1: a new stream's id above every earlier one."""
        client = await self.wire()
        client.send(headers_frame(5, client.block(), "END_HEADERS"), message(5))
        await self.answered(client, 5)
        await self.refused(client, PROTOCOL_ERROR, headers_frame(3, client.block(), "END_HEADERS"))

    async def test_headers_on_a_stream_that_ended(self) -> None:
        """HEADERS on a stream closed by both END_STREAMs: RFC 9113, 5.1
        lets it be a connection error STREAM_CLOSED, h2's answer."""
        client = await self.wire()
        client.send(headers_frame(1, client.block(), "END_HEADERS"), message(1))
        await self.answered(client, 1)
        again = headers_frame(1, client.block(), "END_HEADERS", "END_STREAM")
        await self.refused(client, STREAM_CLOSED, again)

    async def test_headers_on_a_stream_the_client_reset(self) -> None:
        """Stream error STREAM_CLOSED (RFC 9113, 5.1: reset streams), the
        block still decoded (4.3): a later call refers to what it indexed."""
        client = await self.wire()
        client.send(
            headers_frame(1, client.block(), "END_HEADERS"),
            RstStreamFrame(1, error_code=CANCEL).serialize(),
        )
        again = [*REQUEST, (b"x-request-id", b"on a reset stream")]
        client.send(headers_frame(1, client.block(again), "END_HEADERS", "END_STREAM"))
        block = client.block(again)
        self.assertEqual(len(block), len(again))  # references only
        client.send(headers_frame(3, block, "END_HEADERS"), message(3, b"three"))
        await self.answered(client, 3, b"three")
        self.assertEqual(client.resets(), {1: STREAM_CLOSED})
        self.assertEqual(self.up.seen[-1].header(b"X-Request-Id"), [b"on a reset stream"])
        self.assertIsNone(client.goaway())
