"""The OTLP/gRPC bridge takes a call's DATA frames past h2
(`rules.h2frames.FrameSplitter`, `GrpcConnection._data_frame`): here, raw frames
on loopback that h2 alone would refuse are refused the same way (the GOAWAY
or RST_STREAM code RFC 9113 asks for), and frames cut or spread in odd ways
still make a whole message. The h2 library is the client; frames it would
not send are written as bytes."""

from __future__ import annotations

import os
from typing import Any

from hyperframe.frame import (
    ContinuationFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane.grpc_server import MAX_FRAME, GrpcFactory
from lgmt_proxy.rules import grpc, h2frames
from tests.loopback.test_grpc import TRACES, Call, H2Client, _frames, h2_connect
from tests.support.helpers import ProxyFixture, Recorder, env_for, listen, sleep, upstream_site

_HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", TRACES),
    (b":authority", b"127.0.0.1"),
    (b"content-type", b"application/grpc"),
]
_PROTOCOL_ERROR = 1
_STREAM_CLOSED = 5
_FRAME_SIZE_ERROR = 6


def _data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    """A DATA frame on any stream (hyperframe refuses stream 0)."""
    head = len(payload).to_bytes(3, "big") + bytes([0, flags]) + stream_id.to_bytes(4, "big")
    return head + payload


class RawClient(protocol.Protocol):
    """Writes bytes as given; keeps what the proxy sends."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    def goaway(self) -> int | None:
        codes = [f.error_code for f in _frames(bytes(self.raw)) if isinstance(f, GoAwayFrame)]
        return codes[0] if codes else None


def serve_grpc(case: TestCase, upstream: Any) -> tuple[ProxyFixture, GrpcFactory, int]:
    """A proxy in front of ``upstream`` (a resource) with its gRPC listener
    on a loopback port, all closed when ``case`` ends: the proxy, the
    listener's factory, its port."""
    port = listen(upstream_site(upstream))
    case.addCleanup(port.stopListening)
    proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}"))
    case.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
    factory = GrpcFactory(proxy.factory)
    grpc_port = listen(factory)

    async def close() -> None:
        await grpc_port.stopListening()
        for connection in list(factory.connections):
            connection.close_now()

    case.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return proxy, factory, grpc_port.getHost().port


class BypassTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.up = Recorder()
        self.up.headers = [(b"Content-Type", b"application/x-protobuf")]
        self.up.body = b""
        _, self.grpc, self.port = serve_grpc(self, self.up)

    async def client(self) -> H2Client:
        client = await h2_connect(self.port)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        return client

    async def raw(self, *chunks: bytes) -> RawClient:
        """A connection sent ``chunks`` (a read each), then waited on until
        the proxy closes it."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        for chunk in chunks:
            client.transport.write(chunk)  # type: ignore[union-attr]
            await sleep(0.01)
        await client.closed
        return client

    async def refused(self, code: int, *frames: bytes) -> None:
        """After the preface and SETTINGS, ``frames`` end the connection
        with GOAWAY ``code``; nothing reached the upstream."""
        client = await self.raw(h2frames.PREFACE + SettingsFrame(0).serialize(), b"".join(frames))
        self.assertEqual(client.goaway(), code)
        self.assertEqual(self.up.seen, [])

    def head(self, stream_id: int, *, end_headers: bool = True, extra: bytes = b"") -> bytes:
        """A call's HEADERS (HPACK with literals only: no table state)."""
        block = b"".join(b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v for n, v in _HEADERS)
        frame = HeadersFrame(stream_id, data=block + extra)
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame.serialize()

    # -- what h2 alone would refuse ------------------------------------------------------

    async def test_data_on_stream_zero(self) -> None:
        await self.refused(_PROTOCOL_ERROR, _data(0, b"x"))

    async def test_data_on_an_idle_stream(self) -> None:
        """A stream never opened (odd, beyond any HEADERS)."""
        await self.refused(_PROTOCOL_ERROR, self.head(1), _data(5, b"x"))

    async def test_data_on_an_even_stream(self) -> None:
        await self.refused(_PROTOCOL_ERROR, self.head(1), _data(2, b"x"))

    async def test_data_inside_a_header_block(self) -> None:
        """A DATA frame, even on a call in progress, between a HEADERS
        without END_HEADERS and its CONTINUATION (RFC 9113, 6.10)."""
        cont = ContinuationFrame(3, data=b"", flags=["END_HEADERS"]).serialize()
        message = grpc.frame_message(b"m")
        await self.refused(
            _PROTOCOL_ERROR,
            self.head(1),
            _data(1, message[:3]),
            self.head(3, end_headers=False),
            _data(1, message[3:]),
            cont,
        )

    async def test_padding_as_long_as_the_frame(self) -> None:
        bad = _data(1, b"\x04abc", flags=0x8)  # pad length 4 of a 4-byte payload
        await self.refused(_PROTOCOL_ERROR, self.head(1), bad)

    async def test_padded_without_its_pad_length(self) -> None:
        await self.refused(_FRAME_SIZE_ERROR, self.head(1), _data(1, b"", flags=0x8))

    async def test_frame_over_the_maximum_size(self) -> None:
        """Until the client acknowledges our SETTINGS the maximum is 16 KiB."""
        await self.refused(_FRAME_SIZE_ERROR, self.head(1), _data(1, b"x" * 16385))

    async def test_frame_over_our_maximum_size(self) -> None:
        """Once acknowledged, ours (`MAX_FRAME`, 64 KiB)."""
        ack = SettingsFrame(0, flags=["ACK"]).serialize()
        await self.refused(_FRAME_SIZE_ERROR, ack, self.head(1), _data(1, b"x" * (MAX_FRAME + 1)))

    async def test_content_length_exceeded(self) -> None:
        """RFC 9113, 8.1.1 (h2 checks it on the DATA it sees; the bridge on
        the DATA it takes)."""
        length = b"\x00\x0econtent-length\x01" + b"6"
        message = grpc.frame_message(b"ab")  # 7 bytes
        await self.refused(_PROTOCOL_ERROR, self.head(1, extra=length), _data(1, message, 1))

    async def test_content_length_short_at_the_end(self) -> None:
        length = b"\x00\x0econtent-length\x01" + b"8"
        message = grpc.frame_message(b"ab")
        await self.refused(_PROTOCOL_ERROR, self.head(1, extra=length), _data(1, message, 1))

    async def test_content_length_short_at_trailers(self) -> None:
        length = b"\x00\x0econtent-length\x01" + b"8"
        trailers = HeadersFrame(1, data=b"", flags=["END_HEADERS", "END_STREAM"]).serialize()
        message = grpc.frame_message(b"ab")
        await self.refused(_PROTOCOL_ERROR, self.head(1, extra=length), _data(1, message), trailers)

    async def test_no_settings_after_the_preface(self) -> None:
        """RFC 9113, 3.4: the preface is the magic then SETTINGS."""
        client = await self.raw(h2frames.PREFACE + self.head(1) + _data(1, b"x", 1))
        self.assertEqual(client.goaway(), _PROTOCOL_ERROR)
        self.assertEqual(self.up.seen, [])

    async def test_data_before_the_preface(self) -> None:
        client = await self.raw(_data(1, grpc.frame_message(b"m"), 1))
        self.assertIn(client.goaway(), (None, _PROTOCOL_ERROR))
        self.assertEqual(self.up.seen, [])

    async def test_ping_flood_between_empty_data_frames(self) -> None:
        """PINGs between empty DATA frames of a call (or DATA of a closed
        stream) are still a PING flood: GOAWAY ENHANCE_YOUR_CALM."""
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"\x00" * 8
        flood = (ping + _data(1, b"") + _data(3, b"x")) * 1100
        client = await self.raw(
            h2frames.PREFACE + SettingsFrame(0).serialize() + self.head(1) + self.head(3),
            _data(3, grpc.frame_message(b""), 1),
            flood,
        )
        self.assertEqual(client.goaway(), 11)

    # -- stream errors: the connection goes on -------------------------------------------

    async def test_data_after_end_stream_or_reset(self) -> None:
        """DATA on a stream the client ended, or reset, is a stream error
        STREAM_CLOSED (h2's answer); the connection serves the next call."""
        client = await self.client()
        call = await client.unary(b"first")
        self.assertEqual(call.status, 0)
        sid = client.start()
        client.h2.reset_stream(sid, error_code=8)
        client.flush()
        # Past h2's state machine: it would not send these.
        client.transport.write(_data(1, b"late") + _data(sid, b"late"))  # type: ignore[union-attr]
        await sleep(0.05)
        resets = {
            f.stream_id: f.error_code
            for f in _frames(bytes(client.raw))
            if isinstance(f, RstStreamFrame)
        }
        self.assertEqual(resets.get(1), _STREAM_CLOSED)
        self.assertIsNone(client.goaway)
        self.assertEqual((await client.unary(b"next")).status, 0)
        self.assertEqual([s.body for s in self.up.seen], [b"first", b"next"])

    async def test_data_after_the_call_was_answered(self) -> None:
        """A call answered before its message (unknown method: the stream
        reset NO_ERROR) may still have DATA in flight: dropped, its window
        given back, the connection unharmed."""
        client = await self.client()
        sid = client.start(path=b"/no.Such/Method")
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].status, grpc.UNIMPLEMENTED)
        client.transport.write(_data(sid, b"x" * 16384) * 8)  # type: ignore[union-attr]
        message = os.urandom(300_000)  # more than a stream window: needs updates
        call = await client.unary(message)
        self.assertEqual(call.status, 0)
        self.assertEqual(self.up.seen[-1].body, message)
        self.assertIsNone(client.goaway)

    # -- odd but valid ---------------------------------------------------------------------

    async def test_one_byte_per_read(self) -> None:
        """Every frame header cut at every offset: the call is whole."""
        client = await self.client()
        client.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        await client.settings
        await sleep(0.01)  # its acknowledgement sent: the client writes nothing else
        sid = client.h2.get_next_available_stream_id()
        client.calls[sid] = Call()
        client.h2.send_headers(sid, _HEADERS)
        message = grpc.frame_message(b"one byte at a time")
        client.h2.send_data(sid, message[:9])
        client.h2.send_data(sid, message[9:], end_stream=True)
        wire = client.h2.data_to_send()
        for i in range(len(wire)):
            client.transport.write(wire[i : i + 1])  # type: ignore[union-attr]
            await sleep(0.001)
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].status, 0)
        self.assertEqual(self.up.seen[-1].body, b"one byte at a time")

    async def test_64_kib_frames_right_after_the_acknowledgement(self) -> None:
        """A client sending our maximum, 64 KiB DATA frames, in the same
        read as its acknowledgement of our SETTINGS: the message is whole."""
        message = os.urandom(150_000)
        body = grpc.frame_message(message)
        ack = SettingsFrame(0, flags=["ACK"]).serialize()
        frames = [
            _data(1, body[i : i + MAX_FRAME], 1 if i + MAX_FRAME >= len(body) else 0)
            for i in range(0, len(body), MAX_FRAME)
        ]
        self.assertEqual(len(frames[0]), 9 + MAX_FRAME)
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        client.transport.write(h2frames.PREFACE + SettingsFrame(0).serialize())  # type: ignore[union-attr]
        await sleep(0.01)
        client.transport.write(ack + self.head(1) + b"".join(frames))  # type: ignore[union-attr]
        for _ in range(500):
            if self.up.seen:
                break
            await sleep(0.01)
        self.assertEqual([s.body for s in self.up.seen], [message])
        self.assertIsNone(client.goaway())

    async def test_many_tiny_frames(self) -> None:
        """A message in 1-byte DATA frames (some padded): whole, and every
        frame's length given back to both windows, so the next calls on
        the connection still have all of them."""
        client = await self.client()
        await client.settings
        message = os.urandom(20_000)
        framed = grpc.frame_message(message)
        sid = client.start()
        for i in range(len(framed)):
            client.h2.send_data(sid, framed[i : i + 1], pad_length=1 if i % 7 == 0 else None)
        client.h2.end_stream(sid)
        client.flush()
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].status, 0)
        self.assertEqual(self.up.seen[-1].body, message)
        for _ in range(3):  # each call more than half of every window it uses
            big = os.urandom(900_000)
            self.assertEqual((await client.unary(big)).status, 0)
            self.assertEqual(self.up.seen[-1].body, big)
        self.assertIsNone(client.goaway)

    async def test_many_calls_share_the_connection_window(self) -> None:
        """Calls at once on one connection, each more than a stream window:
        the connection's window (4 MiB) is shared, granted back as the
        upstream takes, and nobody is refused."""
        client = await self.client()
        messages = [os.urandom(700_000) for _ in range(8)]
        calls = [self._unary(client, m) for m in messages]
        for d in calls:
            self.assertEqual((await d).status, 0)
        self.assertEqual(sorted(s.body for s in self.up.seen), sorted(messages))
        self.assertIsNone(client.goaway)

    def _unary(self, client: H2Client, message: bytes) -> Deferred[Any]:
        return Deferred.fromCoroutine(client.unary(message))
