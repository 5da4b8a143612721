"""The OTLP/gRPC listener (``OTLP_GRPC_LISTEN``): HTTP/2 with prior
knowledge (h2c), or under TLS with ALPN ``h2`` (`GrpcTLSFactory`), one
`GrpcConnection` per client connection, one `GrpcStream` per call.

The calls' streams are the bridge's own: their header blocks (decoded by
h2's HPACK decoder, checked as h2 checks them: `grpc_heads.HeadReader`),
DATA, RST_STREAM and WINDOW_UPDATE frames, and every frame of an answer
(`grpc_flow`). The `h2` state machine (sans-IO) keeps the connection: the
preface, SETTINGS, PING, GOAWAY, PRIORITY, the connection's send window,
and every frame on a stream that is not an open call's, which it judges as
it would any stream it does not know (closed: RST_STREAM STREAM_CLOSED for
DATA; idle or even: a connection error). h2 doing a call's frames in
Python was most of the bridge's CPU.

Every byte goes out through the connection's `Sender` (`SendQueue.install`);
the connection's own `ReadGate` is registered with it, so a client that does
not read what it is sent (answers, PING and SETTINGS acknowledgements) stops
being read. Bounds: ``SETTINGS_MAX_CONCURRENT_STREAMS`` (`MAX_STREAMS`; one
more is a connection error), the header list (`MAX_HEADER_LIST`), the
frame size (`MAX_FRAME`: the splitter holds up to one frame), the
windows (`STREAM_WINDOW` a call, `CONNECTION_WINDOW` all of them: what may
be sent before the upstream takes it), `MAX_RESETS` client resets beyond
the calls answered (rapid reset), `MAX_CONTROL` PING and SETTINGS frames
between two calls, and
``CLIENT_IDLE_TIMEOUT_SECONDS`` without a call in progress. Draining sends
GOAWAY naming the last stream taken; those calls finish, later ones are
refused (``REFUSED_STREAM``: the client may retry them elsewhere).
"""

from __future__ import annotations

from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lgmt_proxy.dataplane.grpc_flow import CONNECTION_WINDOW, MAX_WINDOW, STREAM_WINDOW
from lgmt_proxy.dataplane.grpc_streams import MAX_STREAMS, CallStreams
from lgmt_proxy.dataplane.server import ProxyFactory
from lgmt_proxy.io.sending import Sender
from lgmt_proxy.io.timers import IdleTimer
from lgmt_proxy.io.tls import TLSCarrier
from lgmt_proxy.rules import h2frames

#: The largest header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE), as the
#: HTTP/1.1 side's head limit.
MAX_HEADER_LIST: Final = 16 * 1024
#: The largest frame a client may send (SETTINGS_MAX_FRAME_SIZE): a 256 KiB
#: export in four DATA frames, not sixteen. The frame splitter holds up to
#: one; a header block is bounded apart (`grpc.MAX_BLOCK`).
MAX_FRAME: Final = 64 * 1024
#: PING and SETTINGS frames accepted between two calls.
MAX_CONTROL: Final = 1000
_DEFAULT_WINDOW: Final = 65535
#: Our own headers are fixed and valid: h2 checking them per call is CPU
#: for nothing. What clients send is checked as ever.
_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)

_NO_ERROR: Final = 0
_FLOW_CONTROL_ERROR: Final = 3
_ENHANCE_YOUR_CALM: Final = 11
#: `_close_with`: h2 has queued its GOAWAY already.
_ALREADY: Final = -1


class GrpcFactory(Factory):
    """The gRPC listener's factory: shares the main listener's route table,
    policy, client auth, limits and recorder (`ProxyFactory`)."""

    noisy = False

    def __init__(self, shared: ProxyFactory) -> None:
        self.shared = shared
        self.connections: set[GrpcConnection] = set()

    @property
    def draining(self) -> bool:
        return self.shared.draining

    def buildProtocol(self, addr: Any) -> GrpcConnection | None:
        if len(self.shared.connections) + len(self.connections) >= self.shared.max_connections:
            return None  # closed at once: gRPC clients back off and reconnect
        return GrpcConnection(self)


class GrpcTLSFactory(Factory):
    """TLS under each connection of ``grpc`` (``OTLP_GRPC_TLS_*``): Twisted's
    `TLSMemoryBIOProtocol` over a `TLSCarrier`, as for TLS inside an https
    forward proxy's tunnel (an https upstream takes `io.tlswire`), so
    the records go out through the connection's `Sender`. ``creator`` offers
    ALPN ``h2`` only (`config.servertls`): a client offering other protocols
    fails the handshake, and one offering none is closed once it completes
    (`GrpcConnection.handshakeCompleted`)."""

    noisy = False

    def __init__(
        self, grpc: GrpcFactory, creator: IOpenSSLServerConnectionCreator, clock: IReactorTime
    ) -> None:
        self.grpc = grpc
        self._tls = TLSMemoryBIOFactory(creator, False, grpc, clock)

    def buildProtocol(self, addr: Any) -> TLSCarrier | None:
        connection = self.grpc.buildProtocol(addr)
        if connection is None:
            return None  # over MAX_CONNECTIONS: closed before any handshake
        return TLSCarrier(TLSMemoryBIOProtocol(self._tls, connection))

    def doStart(self) -> None:
        self._tls.doStart()

    def doStop(self) -> None:
        self._tls.doStop()


@implementer(IHandshakeListener)
class GrpcConnection(Protocol):
    """One HTTP/2 client connection carrying unary OTLP calls. Under TLS,
    HTTP/2 starts once the handshake has selected ``h2``."""

    def __init__(self, factory: GrpcFactory) -> None:
        self.factory = factory
        self.shared = factory.shared
        self.client_text = "unknown"
        self.out: Sender | None = None
        self.h2 = h2.connection.H2Connection(_CONFIG)
        self._idle: IdleTimer | None = None
        self._control = 0
        #: The last stream taken once GOAWAY was sent (None: not sent).
        self.last_stream: int | None = None
        self._closing = False
        #: The TLS layer under this connection (None: h2c).
        self._tls: Any = None
        #: HTTP/2 has begun (under TLS, not before the handshake).
        self._started = False
        #: Handling what the client sent: frames to send go out at its end.
        self._reading = False
        self._frames = h2frames.FrameSplitter()
        #: What h2's own receive window still allows (it moves only when h2
        #: is given DATA: `to_h2`).
        self.h2_left = CONNECTION_WINDOW
        self.streams = CallStreams(self)

    # -- the connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.client_text = getattr(peer, "host", "unknown")
        if ISSLTransport.providedBy(self.transport):
            self._tls = self.transport
        out = self.out = self.shared.sends.install(self)
        out.register_producer(out.reading)
        if self._tls is None:
            self._start_h2()
        else:  # the handshake within the time a client has for its request head
            self._arm_idle(self.shared.client_header_timeout)

    def handshakeCompleted(self) -> None:
        """TLS is up: HTTP/2 if ALPN selected ``h2``, else close (a client
        that offered no ALPN; one that offered only others failed the
        handshake already). Nothing of HTTP/2 was sent to it."""
        if self._closing:
            return
        if getattr(self._tls, "negotiatedProtocol", None) != b"h2":
            self.shut()
            return
        self._start_h2()

    def _start_h2(self) -> None:
        self._started = True
        _initiate(self.h2)
        self._flush(h2_queued=True)
        self._arm_idle(self.shared.client_idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._reading = True  # what the frames make is sent once, at the end
        try:
            try:
                parts = self._frames.split(data, MAX_FRAME)
            except h2frames.SplitError as e:
                self.close_with(e.error_code)
                return
            streams = self.streams
            for part in parts:
                if isinstance(part, h2frames.DataFrame):
                    streams.data_frame(part)
                elif isinstance(part, h2frames.HeaderBlock):
                    streams.header_block(part)
                elif isinstance(part, h2frames.StreamFrame):
                    if part.stream_id:
                        streams.stream_frame(part)
                    else:
                        self._connection_frame(part)
                else:
                    self.to_h2(part)
                if self._closing:
                    return
        finally:
            self._reading = False
        self._flush()

    def to_h2(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
            self.h2_left = self.h2.inbound_flow_control_window
            queued = self.h2.data_to_send()  # before any frame of ours it caused
            if queued:
                self.streams.outflow.frames.append(queued)
        except h2.exceptions.ProtocolError as e:
            # Its GOAWAY (the error's own code) is queued, unless the preface was bad.
            closed = self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED
            self.close_with(_ALREADY if closed else int(e.error_code))
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
            if self._closing:
                return

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        self.factory.connections.discard(self)
        self._stop_idle()
        self.streams.close_all()

    def _flush(self, h2_queued: bool = False) -> None:
        """What is to send, in order: our frames (with what h2 queued while
        given frames, `to_h2`), then ``h2_queued``: what h2 queued since
        (its SETTINGS at the start, its GOAWAY), then window updates."""
        data = self.h2.data_to_send() if h2_queued else b""
        sent = self.streams.outflow.frames
        if sent:  # our frames: after what h2 had queued before each
            data = b"".join([*sent, data])
            sent.clear()
        updates = self.streams.inflow.updates
        if updates:  # after h2's: our SETTINGS always come first
            data += b"".join(updates)
            updates.clear()
        if data and self.out is not None:
            self.out.write(data)

    def close_with(self, error_code: int) -> None:
        """A connection error: GOAWAY with ``error_code``, then close."""
        if self._started and error_code != _ALREADY:
            self.h2.close_connection(error_code=error_code)
        self._flush(h2_queued=True)
        self.shut()

    def shut(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_idle()
        if self.out is not None:
            self.out.close()

    def close_now(self) -> None:
        """Cut the connection (the drain's grace is over)."""
        self._closing = True
        self._stop_idle()
        if self.out is not None:
            self.out.abort()

    def close_when_idle(self, quiet: float) -> None:
        """Draining: GOAWAY once, naming the last stream taken; close when
        no call is left (``quiet``: not used, calls say when they end)."""
        if not self._started:  # still in the TLS handshake: no HTTP/2 yet
            self.shut()
            return
        if self.last_stream is None:
            self.last_stream = self.h2.highest_inbound_stream_id
            self._flush()
            goaway = GoAwayFrame(0, last_stream_id=self.last_stream, error_code=_NO_ERROR)
            if self.out is not None:
                self.out.write(goaway.serialize())
        if self.streams.idle:
            self.shut()

    def _stop_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.cancel()

    def _arm_idle(self, seconds: float) -> None:
        """Close once ``seconds`` pass with no call begun or ended (`touch`:
        a time stamp, no timer moved per call)."""
        self._stop_idle()
        if not self._closing:
            self._idle = IdleTimer(self.shared.clock, seconds, self._idle_over)

    def _idle_over(self) -> None:
        if self.streams.calls and self._idle is not None:
            self._idle.start(self._idle_over)  # each call has its upstream timeout
            return
        # Nothing in progress (or answers the client never let us send).
        self.close_with(_NO_ERROR)

    def _connection_frame(self, part: h2frames.StreamFrame) -> None:
        """The connection's WINDOW_UPDATE and PING, past h2 (a gRPC client
        sends a few a call, h2 took some 13 µs each): its send window is
        h2's attribute, moved as h2 moves it; a PING is acknowledged and
        counted (`on_control`). An increment of 0 is h2's to refuse."""
        if part.kind == h2frames.PING:
            if not part.value & h2frames.ACK:
                self.streams.outflow.frames.append(h2frames.ping_ack(part.frame))
                self.on_control(None)
            return
        increment = part.value & 0x7FFFFFFF
        window = self.h2.outbound_flow_control_window + increment
        if not increment:
            self.to_h2(part.frame)
        elif window > MAX_WINDOW:
            self.close_with(_FLOW_CONTROL_ERROR)
        else:
            self.h2.outbound_flow_control_window = window
            self.streams.window_opened()

    # -- h2 events: the connection's own frames ------------------------------------------

    def on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        """The client's SETTINGS: a new initial window moves the streams'."""
        changed = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
        if changed is not None:
            self.streams.settings_changed(changed.new_value)
        if not self._closing:
            self.on_control(event)

    def on_control(self, event: h2.events.Event | None) -> None:
        self._control += 1
        if self._control > MAX_CONTROL:
            self.close_with(_ENHANCE_YOUR_CALM)

    # -- Connection: what the streams ask ------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def progress(self) -> None:
        self._control = 0

    def call_began(self) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self.factory.draining and self.last_stream is None:
            # As ``Connection: close`` on HTTP/1.1: this call, then GOAWAY.
            self.close_when_idle(0.0)

    def calls_changed(self) -> None:
        if self._idle is not None:
            self._idle.touch()
        if self.last_stream is not None and self.streams.idle:
            self.shut()
        elif not self._reading:
            self._flush()


def _initiate(conn: h2.connection.H2Connection) -> None:
    """Our SETTINGS (the bounds) and the connection's window, first sent."""
    conn.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
        },
    )
    conn.decoder.max_header_list_size = MAX_HEADER_LIST
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)


def _terminated(conn: GrpcConnection, event: h2.events.ConnectionTerminated) -> None:
    """The client's GOAWAY. NO_ERROR covers only the streams it would open
    (RFC 9113, section 6.8): its calls in progress are answered, then our
    GOAWAY and the close. Any other code: closed now."""
    if event.error_code == _NO_ERROR and conn.streams.calls:
        conn.close_when_idle(0.0)
    else:
        conn.shut()


def _settings_acked(conn: GrpcConnection, event: h2.events.SettingsAcknowledged) -> None:
    """The client has our SETTINGS: frames up to `MAX_FRAME` from now on
    (h2 takes the values given at its start as in force already, so it
    would not raise its own limit)."""
    conn.h2.max_inbound_frame_size = MAX_FRAME


#: The events h2 has of the frames it keeps (it knows no stream; the
#: connection's WINDOW_UPDATE and PING are `_connection_frame`'s).
_HANDLERS: dict[type[h2.events.Event], Any] = {
    h2.events.RemoteSettingsChanged: GrpcConnection.on_settings,
    h2.events.ConnectionTerminated: _terminated,
    h2.events.SettingsAcknowledged: _settings_acked,
}
