"""OTLP over gRPC (OTLP_GRPC_LISTEN) on loopback, with the `h2` library as a
raw HTTP/2 client: calls bridged to the otlp route of a recording upstream,
each upstream status as the gRPC status a sender sees, client auth, the
message size limit, HTTP/2 flow control as backpressure, rapid reset and
PING floods bounded, GOAWAY when draining. Real gRPC peers (grpcio, the
OpenTelemetry SDK) are in tests/e2e/test_grpc.py."""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from lgmt_proxy.config.clientauth import load_client_auth
from lgmt_proxy.config.watch import WatchedFile
from lgmt_proxy.dataplane.grpc_server import GrpcFactory
from lgmt_proxy.dataplane.grpc_streams import MAX_RESETS
from lgmt_proxy.rules import grpc
from tests.pure.test_clientauth import ALLOY, DOC, KUBECOST
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    env_for,
    listen,
    sleep,
    upstream_site,
)

TRACES = b"/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS = b"/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
LOGS = b"/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def request_headers(path: bytes = TRACES) -> list[tuple[bytes, bytes]]:
    """A gRPC call's request headers, as a client sends them."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"127.0.0.1"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


@attrs.define
class Call:
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    data: bytearray = attrs.Factory(bytearray)
    trailers: dict[bytes, bytes] = attrs.Factory(dict)
    reset: int | None = None
    ended: Deferred[None] = attrs.Factory(Deferred)

    @property
    def status(self) -> int:
        """grpc-status, from the trailers or a trailers-only response."""
        return int((self.trailers or self.headers).get(b"grpc-status", b"-1"))

    @property
    def message(self) -> bytes:
        """The response message, its 5-byte prefix checked and stripped."""
        data = bytes(self.data)
        assert data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5, data
        return data[5:]


class H2Client(protocol.Protocol):
    """A raw HTTP/2 client (prior knowledge) driven by the tests.
    ``window``: its initial stream window (0: the proxy may send no DATA);
    ``auto_ack``: open the window again for DATA received."""

    def __init__(self, window: int = 65535, auto_ack: bool = True) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._window = window
        self.auto_ack = auto_ack
        self.calls: dict[int, Call] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.got_goaway: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.settings: Deferred[None] = Deferred()
        #: Every byte received.
        self.raw = bytearray()

    def connectionMade(self) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._window},
        )
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.goaway is not None:
            return  # h2 takes nothing after a GOAWAY: see `raw`
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", None)
            call = self.calls.get(sid) if sid else None
            if isinstance(event, h2.events.ResponseReceived) and call is not None:
                call.headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived) and call is not None:
                call.data += event.data or b""
                if self.auto_ack and event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, sid)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.TrailersReceived) and call is not None:
                call.trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamEnded) and call is not None:
                if not call.ended.called:
                    call.ended.callback(None)
            elif isinstance(event, h2.events.StreamReset) and call is not None:
                call.reset = event.error_code
                if not call.ended.called:
                    call.ended.callback(None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
                if not self.got_goaway.called:
                    self.got_goaway.callback(None)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.settings.called:
                    self.settings.callback(None)
        self.flush()

    def connectionLost(self, reason: Any = None) -> None:
        for call in self.calls.values():
            if not call.ended.called:
                call.ended.callback(None)
        if not self.closed.called:
            self.closed.callback(None)

    def start(self, path: bytes = TRACES, extra: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.calls[sid] = Call()
        headers = [*request_headers(path), *(extra or [])]
        self.h2.send_headers(sid, headers)
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> int:
        """Send what the windows allow of ``data``; returns how much."""
        window = min(self.h2.local_flow_control_window(sid), len(data))
        sent = 0
        while sent < window:
            n = min(window - sent, self.h2.max_outbound_frame_size)
            self.h2.send_data(sid, data[sent : sent + n])
            sent += n
        if end and sent == len(data):
            self.h2.end_stream(sid)
        self.flush()
        return sent

    def send_filler(self, sid: int, left: int) -> int:
        """Send up to ``left`` bytes of filler, as the windows allow."""
        window = min(self.h2.local_flow_control_window(sid), left)
        size = self.h2.max_outbound_frame_size
        block = b"x" * size
        sent = 0
        while sent < window:
            n = min(window - sent, size)
            self.h2.send_data(sid, block if n == size else block[:n])
            sent += n
        self.flush()
        return sent

    async def unary(
        self,
        message: bytes,
        path: bytes = TRACES,
        extra: list[tuple[bytes, bytes]] | None = None,
        compressed: bool = False,
    ) -> Call:
        sid = self.start(path, extra)
        framed = bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message
        sent = 0
        while sent < len(framed):
            sent += self.send(sid, framed[sent:], end=True)
            if sent < len(framed):
                await sleep(0.01)
        if not framed:
            self.h2.end_stream(sid)
            self.flush()
        await self.calls[sid].ended
        return self.calls[sid]


async def h2_connect(port: int, **kw: Any) -> H2Client:
    client = H2Client(**kw)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


class GrpcBridgeTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.up = Recorder()
        self.up.headers = [(b"Content-Type", b"application/x-protobuf")]
        self.up.body = b"\x0a\x02\x08\x01"  # a partial_success, as bytes
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"
        self.start_proxy()

    def start_proxy(self, client_auth: Any = None, **env: str) -> None:
        proxy = self.proxy = ProxyFixture(
            env_for(self.upstream_url, **env), client_auth=client_auth
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        self.grpc = GrpcFactory(self.proxy.factory)
        port = listen(self.grpc)
        self.grpc_port = port.getHost().port
        self.addCleanup(self._close_grpc, port)

    async def _close_grpc(self, port: Any) -> None:
        await port.stopListening()
        for connection in list(self.grpc.connections):
            connection.close_now()

    async def client(self, **kw: Any) -> H2Client:
        client = await h2_connect(self.grpc_port, **kw)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        return client

    async def test_each_signal_posted_with_credentials(self) -> None:
        client = await self.client()
        message = os.urandom(200_000)  # past one window: flow control opens it again
        for path, signal_path in ((TRACES, b"traces"), (METRICS, b"metrics"), (LOGS, b"logs")):
            call = await client.unary(message, path, [(b"user-agent", b"grpc-test/1")])
            self.assertEqual(call.status, 0, call)
            self.assertEqual(call.headers[b":status"], b"200")
            self.assertEqual(call.headers[b"content-type"], b"application/grpc")
            self.assertEqual(call.message, self.up.body)
            seen = self.up.seen[-1]
            self.assertEqual((seen.method, seen.uri), (b"POST", b"/otlp/v1/" + signal_path))
            self.assertEqual(seen.body, message)
            self.assertEqual(seen.header(b"Authorization"), [basic(ORG["otlp"])])
            self.assertEqual(seen.header(b"X-Scope-OrgID"), [ORG["otlp"].encode()])
            self.assertEqual(seen.header(b"Content-Type"), [b"application/x-protobuf"])
            self.assertEqual(seen.header(b"Content-Length"), [b"200000"])
            self.assertEqual(seen.header(b"User-Agent"), [b"grpc-test/1"])
            self.assertIsNone(seen.header(b"Content-Encoding"))
            self.assertIsNone(seen.header(b"te"))
        labels = {"upstream": "otlp", "method": "POST", "status": "200"}
        self.assertEqual(self.proxy.sample("proxy_requests_total", **labels), 3)

    async def test_compressed_message_passes_as_gzip(self) -> None:
        import gzip

        client = await self.client()
        body = gzip.compress(b"spans" * 100)
        call = await client.unary(body, extra=[(b"grpc-encoding", b"gzip")], compressed=True)
        self.assertEqual(call.status, 0)
        self.assertEqual(self.up.seen[-1].body, body)
        self.assertEqual(self.up.seen[-1].header(b"Content-Encoding"), [b"gzip"])
        # The flag without the header is a broken call, never forwarded.
        call = await client.unary(body, compressed=True)
        self.assertEqual(call.status, grpc.INTERNAL)
        self.assertEqual(len(self.up.seen), 1)

    async def test_upstream_statuses_mapped(self) -> None:
        client = await self.client()
        expected = {
            400: grpc.INVALID_ARGUMENT,
            401: grpc.UNAUTHENTICATED,
            403: grpc.PERMISSION_DENIED,
            404: grpc.UNIMPLEMENTED,
            413: grpc.RESOURCE_EXHAUSTED,
            429: grpc.RESOURCE_EXHAUSTED,
            500: grpc.INTERNAL,
            502: grpc.UNAVAILABLE,
            503: grpc.UNAVAILABLE,
            504: grpc.UNAVAILABLE,
        }
        for status, code in expected.items():
            self.up.status = status
            self.up.headers = [(b"Retry-After", b"7")] if status == 429 else []
            call = await client.unary(b"\x0a\x00")
            self.assertEqual(call.status, code, status)
            self.assertEqual(call.data, b"")  # trailers only
            text = call.headers[b"grpc-message"]
            self.assertEqual(text, b"upstream answered %d" % status)
            if status == 429:
                retry = _unb64(call.headers[b"google.rpc.retryinfo-bin"])
                self.assertEqual(retry, b"\x0a\x02\x08\x07")  # RetryInfo{Duration{7s}}
                details = _unb64(call.headers[b"grpc-status-details-bin"])
                self.assertIn(b"type.googleapis.com/google.rpc.RetryInfo", details)
                self.assertTrue(details.startswith(b"\x08\x08"))  # code 8
            else:
                self.assertNotIn(b"grpc-status-details-bin", call.headers)

    async def test_upstream_down_is_unavailable(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
        sock.close()
        self.upstream_url = f"http://127.0.0.1:{dead}"
        self.start_proxy()
        client = await self.client()
        call = await client.unary(b"x")
        self.assertEqual(call.status, grpc.UNAVAILABLE)
        self.assertEqual(self.up.seen, [])

    async def test_unknown_method_unimplemented(self) -> None:
        client = await self.client()
        profiles = b"/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"
        for path in (
            b"/opentelemetry.proto.collector.trace.v1.TraceService/Other",
            b"/x/y",
            profiles,
        ):
            call = await client.unary(b"", path)
            self.assertEqual(call.status, grpc.UNIMPLEMENTED)
        self.assertEqual(self.up.seen, [])

    async def test_not_grpc_is_415(self) -> None:
        client = await self.client()
        sid = client.h2.get_next_available_stream_id()
        client.calls[sid] = Call()
        client.h2.send_headers(
            sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", TRACES),
                (b":authority", b"x"),
                (b"content-type", b"application/json"),
            ],
            end_stream=True,
        )
        client.flush()
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].headers[b":status"], b"415")

    async def test_message_over_limit_resource_exhausted(self) -> None:
        self.start_proxy(MAX_REQUEST_BODY_BYTES="1000")
        client = await self.client()
        call = await client.unary(b"x" * 1001)
        self.assertEqual(call.status, grpc.RESOURCE_EXHAUSTED)
        self.assertEqual(self.up.seen, [])
        call = await client.unary(b"x" * 1000)
        self.assertEqual(call.status, 0)
        self.assertEqual(len(self.up.seen), 1)

    async def test_bad_framing(self) -> None:
        client = await self.client()
        sid = client.start()
        client.send(sid, b"\x00\x00\x00\x00\x03ab", end=True)  # 2 of 3 bytes, then END_STREAM
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].status, grpc.INTERNAL)
        sid = client.start()
        client.send(sid, b"\x00\x00\x00\x00\x01abc", end=True)  # bytes after the message
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].status, grpc.INTERNAL)

    async def test_client_auth_from_metadata(self) -> None:
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write(DOC)
        auth, problem = load_client_auth(path)
        assert auth is not None, problem
        source = WatchedFile(auth, path, kind="client_auth", load=load_client_auth)
        self.start_proxy(client_auth=source)
        client = await self.client()
        call = await client.unary(b"m")
        self.assertEqual(call.status, grpc.UNAUTHENTICATED)
        wrong = await client.unary(b"m", extra=[(b"authorization", b"Bearer " + KUBECOST.encode())])
        self.assertEqual(wrong.status, grpc.PERMISSION_DENIED)  # kubecost may not post OTLP
        self.assertEqual(self.up.seen, [])
        right = await client.unary(b"m", extra=[(b"authorization", b"Bearer " + ALLOY.encode())])
        self.assertEqual(right.status, 0)
        seen = self.up.seen[-1]
        # The consumer's credentials never go upstream: the proxy's do.
        self.assertEqual(seen.header(b"Authorization"), [basic(ORG["otlp"])])
        labels = {"upstream": "otlp", "method": "POST", "status": "401"}
        self.assertEqual(self.proxy.sample("proxy_requests_total", consumer="none", **labels), 1)

    async def test_consumer_budgets_refuse_with_retry_info(self) -> None:
        """A consumer's budgets (rate_limit) hold for gRPC calls as for HTTP:
        past the request budget RESOURCE_EXHAUSTED with RetryInfo, nothing
        refused goes upstream (the messages' bytes are charged as they
        stream, well within this byte budget)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(DOC.replace("rate_limit: {requests_per_second: 1, burst: 2}",
                                "rate_limit: {requests_per_second: 1, burst: 2, bytes_per_second: 100}"))  # fmt: skip
        auth, problem = load_client_auth(path)
        assert auth is not None, problem
        self.start_proxy(
            client_auth=WatchedFile(auth, path, kind="client_auth", load=load_client_auth)
        )
        client = await self.client()
        alloy = [(b"authorization", b"Bearer " + ALLOY.encode())]
        calls = [await client.unary(b"m", extra=alloy) for _ in range(3)]
        self.assertEqual([c.status for c in calls], [0, 0, grpc.RESOURCE_EXHAUSTED])
        self.assertIn(b"google.rpc.retryinfo-bin", calls[2].headers)
        self.assertEqual(len(self.up.seen), 2)
        labels = {"upstream": "otlp", "method": "POST", "consumer": "alloy"}
        self.assertEqual(self.proxy.sample("proxy_requests_total", status="429", **labels), 1)

    async def test_window_never_opens_holds_nothing_more(self) -> None:
        """A client that never opens its window gets no DATA, and the
        proxy keeps the answer (bounded) until the idle timeout closes."""
        self.start_proxy(CLIENT_IDLE_TIMEOUT_SECONDS="0.5")
        client = await self.client(window=0)
        await client.settings
        sid = client.start()
        client.send(sid, grpc.frame_message(b"m"), end=True)
        await client.closed
        self.assertEqual(client.calls[sid].data, b"")  # no DATA within a zero window
        self.assertEqual(client.calls[sid].headers.get(b":status"), b"200")
        self.assertEqual(len(self.up.seen), 1)

    async def test_upstream_not_reading_stops_the_window(self) -> None:
        """The message is acknowledged only as the upstream takes it: an
        upstream that does not read leaves the client's window shut."""
        stalled = _StalledUpstream()
        port = reactor.listenTCP(0, stalled, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"
        self.start_proxy()
        client = await self.client()
        sid = client.start()
        total = 48 * 1024 * 1024  # under MAX_REQUEST_BODY_BYTES
        client.send(sid, b"\x00" + total.to_bytes(4, "big"))
        sent = 0
        for _ in range(100):
            sent += client.send_filler(sid, total - sent)
            await sleep(0.02)
        # Far less than the message: the window follows what the upstream
        # took (loopback socket buffers hold a few MiB).
        self.assertLess(sent, 24 * 1024 * 1024)
        before = sent
        for _ in range(10):
            sent += client.send_filler(sid, total - sent)
            await sleep(0.02)
        self.assertEqual(sent, before)
        self.assertEqual(client.h2.local_flow_control_window(sid), 0)
        stalled.resume()
        while sent < total:
            sent += client.send_filler(sid, total - sent)
            await sleep(0.002)
        client.h2.end_stream(sid)
        client.flush()
        await stalled.received(total)

    async def test_more_than_the_window_is_a_flow_control_error(self) -> None:
        """The windows the bridge keeps for the DATA it takes past h2 are
        enforced: a frame beyond them ends the connection (GOAWAY
        FLOW_CONTROL_ERROR), nothing of it forwarded."""
        stalled = _StalledUpstream()
        port = reactor.listenTCP(0, stalled, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"
        self.start_proxy()
        client = await self.client()
        sid = client.start()
        total = 48 * 1024 * 1024
        client.send(sid, b"\x00" + total.to_bytes(4, "big"))
        for _ in range(100):
            client.send_filler(sid, total)
            await sleep(0.02)
            if not client.h2.local_flow_control_window(sid):
                break
        self.assertEqual(client.h2.local_flow_control_window(sid), 0)
        # More than a whole stream window past what the client was granted: a
        # WINDOW_UPDATE still on its way (a loaded machine) cannot cover it.
        overrun = DataFrame(sid, data=b"x" * 16384).serialize()
        client.transport.write(overrun * 20)  # type: ignore[union-attr]
        await client.got_goaway
        assert client.goaway is not None
        self.assertEqual(client.goaway.error_code, 3)  # FLOW_CONTROL_ERROR

    async def test_content_length_and_padding(self) -> None:
        """A request with ``content-length`` (h2load and curl send one; h2
        checks it at END_STREAM) and a padded DATA frame both arrive whole."""
        client = await self.client()
        message = os.urandom(70_000)
        framed = grpc.frame_message(message)
        extra = [(b"content-length", b"%d" % len(framed))]
        call = await client.unary(message, extra=extra)
        self.assertEqual(call.status, 0, call)
        self.assertEqual(self.up.seen[-1].body, message)
        sid = client.start()
        padded = DataFrame(sid, data=grpc.frame_message(b"padded"), flags=["END_STREAM", "PADDED"])
        padded.pad_length = 17
        client.transport.write(padded.serialize())  # type: ignore[union-attr]
        await client.calls[sid].ended
        self.assertEqual(client.calls[sid].status, 0)
        self.assertEqual(self.up.seen[-1].body, b"padded")

    async def test_rapid_reset_goaway(self) -> None:
        client = await self.client()
        for _ in range(MAX_RESETS + 5):
            if client.goaway is not None or client.closed.called:
                break
            sid = client.start()
            client.h2.reset_stream(sid, error_code=8)
            client.flush()
            await sleep(0)
        await client.closed
        self.assertIsNotNone(client.goaway)
        assert client.goaway is not None
        self.assertEqual(client.goaway.error_code, 11)  # ENHANCE_YOUR_CALM
        # Another client is served as before.
        other = await self.client()
        self.assertEqual((await other.unary(b"m")).status, 0)

    async def test_ping_flood_closed(self) -> None:
        client = await self.client()
        for i in range(2000):
            client.h2.ping(i.to_bytes(8, "big"))
        client.flush()
        await client.closed
        assert client.goaway is not None
        self.assertEqual(client.goaway.error_code, 11)

    async def test_limits_advertised(self) -> None:
        client = await self.client()
        await client.settings
        self.assertEqual(client.h2.remote_settings.max_concurrent_streams, 100)
        self.assertEqual(client.h2.remote_settings.max_header_list_size, 16384)
        self.assertEqual(client.h2.remote_settings.max_frame_size, 65536)

    async def test_oversized_header_list_closes(self) -> None:
        """An HPACK-decoded header list over 16 KiB is a connection error
        (never decoded whole); other clients are served."""
        client = await self.client()
        await client.settings
        client.h2.remote_settings.max_header_list_size = 2**20  # lie, to send it
        client.start(extra=[(b"x-big", b"a" * 20_000)])
        await client.closed
        assert client.goaway is not None
        self.assertIn(client.goaway.error_code, (1, 11))  # PROTOCOL_ERROR, ENHANCE_YOUR_CALM
        self.assertEqual(self.up.seen, [])
        other = await self.client()
        self.assertEqual((await other.unary(b"m")).status, 0)

    async def test_stream_over_the_limit_is_a_connection_error(self) -> None:
        client = await self.client()
        await client.settings
        client.h2.remote_settings.max_concurrent_streams = 1000  # ignore what it said
        client.h2.remote_settings.acknowledge()
        for _ in range(101):
            client.start()
        await client.closed
        assert client.goaway is not None
        self.assertEqual(client.goaway.error_code, 1)  # PROTOCOL_ERROR
        self.assertEqual(self.grpc.connections, set())

    async def test_drain_goaway_finishes_calls(self) -> None:
        """Draining: GOAWAY names the call in progress, which is still
        answered; then the connection closes."""
        held = _Held()
        port = listen(upstream_site(held))
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"
        self.start_proxy()
        client = await self.client()
        sid = client.start()
        client.send(sid, grpc.frame_message(b"last"), end=True)
        while not held.waiting:
            await sleep(0.01)
        for connection in list(self.grpc.connections):
            connection.close_when_idle(0.0)
        await client.got_goaway
        assert client.goaway is not None
        self.assertEqual((client.goaway.last_stream_id, client.goaway.error_code), (sid, 0))
        held.answer(b"\x0a\x00")
        await client.closed
        # h2 as a client reads nothing after a GOAWAY; the frames tell.
        after = _frames(bytes(client.raw))
        goaway = next(i for i, f in enumerate(after) if isinstance(f, GoAwayFrame))
        ends = [f for f in after[goaway:] if f.stream_id == sid and "END_STREAM" in f.flags]
        self.assertEqual(len(ends), 1)
        data = b"".join(f.data for f in after[goaway:] if isinstance(f, DataFrame))
        self.assertEqual(data, grpc.frame_message(b"\x0a\x00"))
        self.assertEqual(held.bodies, [b"last"])


def _frames(raw: bytes) -> list[Any]:
    """Every HTTP/2 frame in what a server sent."""
    frames = []
    while len(raw) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(raw[:9]))
        frame.parse_body(memoryview(raw[9 : 9 + length]))
        frames.append(frame)
        raw = raw[9 + length :]
    return frames


class _Held(Resource):
    """An upstream that answers each request when told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.bodies.append(request.content.read())
        self.waiting.append(request)
        return NOT_DONE_YET

    def answer(self, body: bytes) -> None:
        for request in self.waiting:
            request.setHeader(b"content-type", b"application/x-protobuf")
            request.write(body)
            request.finish()
        self.waiting = []


def _unb64(value: bytes) -> bytes:
    return base64.b64decode(value + b"=" * (-len(value) % 4))


class _StalledConnection(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.conns.append(self)  # type: ignore[attr-defined]
        if self.factory.stalled:  # type: ignore[attr-defined]
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.factory.got += len(data)  # type: ignore[attr-defined]
        self.factory.check()  # type: ignore[attr-defined]


class _StalledUpstream(protocol.ServerFactory):
    """An upstream that reads nothing until `resume`, then counts bytes."""

    protocol = _StalledConnection

    def __init__(self) -> None:
        self.conns: list[_StalledConnection] = []
        self.stalled = True
        self.got = 0
        self._want: tuple[int, Deferred[None]] | None = None

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        p = super().buildProtocol(addr)
        return p

    def resume(self) -> None:
        self.stalled = False
        for conn in self.conns:
            conn.transport.resumeProducing()  # type: ignore[union-attr]

    def received(self, total: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._want = (total, d)
        self.check()
        return d

    def check(self) -> None:
        if self._want is not None and self.got >= self._want[0]:
            d = self._want[1]
            self._want = None
            d.callback(None)


class _Stalled(Resource):
    """Takes each request and never answers; ``lost`` fires when the proxy
    drops the upstream connection of one."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.lost: Deferred[None] = Deferred()

    def render(self, request: Any) -> Any:
        self.bodies.append(request.content.read())

        def gone(_: Any) -> None:
            if not self.lost.called:
                self.lost.callback(None)

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET


class GrpcDeadlineTests(TestCase):
    """grpc-timeout: the call's deadline bounds the wait for the upstream."""

    timeout = 30

    def setUp(self) -> None:
        self.up = _Stalled()
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"

    async def client(self, **env: str) -> H2Client:
        proxy = self.proxy = ProxyFixture(env_for(self.upstream_url, **env))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        grpc_factory = GrpcFactory(proxy.factory)
        port = listen(grpc_factory)

        async def close() -> None:
            await port.stopListening()
            for connection in list(grpc_factory.connections):
                connection.close_now()

        self.addCleanup(close)
        client = await h2_connect(port.getHost().port)
        self.addCleanup(lambda: client.transport.abortConnection())  # type: ignore[union-attr]
        return client

    async def test_deadline_before_the_upstream_answers(self) -> None:
        client = await self.client(UPSTREAM_TIMEOUT_SECONDS="30")
        call = await client.unary(b"spans", extra=[(b"grpc-timeout", b"300m")])
        self.assertEqual(call.status, grpc.DEADLINE_EXCEEDED)
        self.assertEqual(call.headers[b"grpc-message"], b"deadline exceeded")
        self.assertEqual(self.up.bodies, [b"spans"])  # it was sent, then abandoned:
        await self.up.lost  # the upstream connection is dropped, not left waiting
        labels = {"upstream": "otlp", "method": "POST", "status": "504"}
        self.assertEqual(self.proxy.sample("proxy_requests_total", **labels), 1)
        errors = {"upstream": "otlp", "reason": "timeout"}
        self.assertEqual(self.proxy.sample("proxy_upstream_errors_total", **errors), 1)
        self.assertEqual(self.proxy.sample("proxy_requests_in_flight", upstream="otlp"), 0)

    async def test_upstream_timeout_when_shorter(self) -> None:
        """The deadline is the smaller of the two: UPSTREAM_TIMEOUT_SECONDS
        first answers as an upstream timeout does (UNAVAILABLE: retried)."""
        client = await self.client(UPSTREAM_TIMEOUT_SECONDS="0.3")
        call = await client.unary(b"spans", extra=[(b"grpc-timeout", b"20S")])
        self.assertEqual(call.status, grpc.UNAVAILABLE)

    async def test_malformed_is_internal_and_not_sent(self) -> None:
        client = await self.client()
        for value in (b"10s", b"123456789S", b"soon"):
            call = await client.unary(b"spans", extra=[(b"grpc-timeout", value)])
            self.assertEqual(call.status, grpc.INTERNAL, value)
            self.assertEqual(call.headers[b"grpc-message"], b"malformed grpc-timeout")
        self.assertEqual(self.up.bodies, [])

    async def test_deadline_already_past(self) -> None:
        client = await self.client()
        call = await client.unary(b"spans", extra=[(b"grpc-timeout", b"0n")])
        self.assertEqual(call.status, grpc.DEADLINE_EXCEEDED)
        self.assertEqual(self.up.bodies, [])
        labels = {"upstream": "otlp", "method": "POST", "status": "408"}
        self.assertEqual(self.proxy.sample("proxy_requests_total", **labels), 1)
