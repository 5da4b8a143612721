"""The one write owner of each connection: every byte written to a client or
upstream connection goes through its `Sender`, which a protocol installs as
its ``transport`` when connected (`SendQueue.install`), so nothing can write
around it. On plain TCP it sends straight to the socket, gathered per
reactor turn. An https upstream's connection runs TLS on the socket itself
(``io/tlswire.py``): a turn's plaintext is one ``SSL_write`` (`Sender.ssl`),
which encrypts and sends from OpenSSL's record buffer, all or nothing; when
the kernel is full, OpenSSL must be asked again with the same bytes, so the
whole plaintext waits in the backlog and is retried with what was added
since (partial writes off, moving write buffers accepted: `tls.ClientTLS`).
TLS over a `TLSCarrier` (``io/tls.py``: TLS inside TLS, the gRPC listener)
sends a turn's plaintext through the TLS layer in one write, and the records
it makes come back (`Sender.wire_write`) to be sent as plain bytes are. On
anything else (the in-memory transports of tests) it writes through. Its
`ReadGate` (``reading``) owns pausing the same connection's reading.

Twisted's ``transport.write`` buffers and registers the socket with epoll for
writing, sends on the next turn, then unregisters: two ``epoll_ctl`` calls per
response, a fifth of the proxy's CPU per small request (docs/performance.md).
Sending at once from inside each callback is worse on the 2-core bench: every
send wakes the peer on its own. A `Sender` keeps what a turn writes and
`SendQueue` sends it, for every connection written to, at the start of the
next turn (one ``callLater(0)``), so the sends of a turn go out together and a
socket is only registered for writing when the kernel took part of the bytes.

What the kernel does not take waits in the sender's backlog; a duplicate of
the socket's descriptor is watched for writability, because the transport
itself is registered for reading and a second registration of the same
descriptor would replace it. A producer registered with the sender (the other
side's transport) is paused while the backlog is over `HIGH_WATER`; the
backlog (``backed_up``) is how an exchange tells an upstream that stopped
reading (504) from a client that stopped sending (408), TLS or not.

Transports that are not a socket we can send on are written through: the
transport buffers and pauses the registered producer itself.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IReactorFDSet,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from lgmt_proxy.io.descriptor import duplicate
from lgmt_proxy.io.reading import Hold, ReadGate
from lgmt_proxy.io.tls import Encryptor, TLSCarrier

_log = Logger(namespace="lgmt_proxy.sending")

#: Backlog above which the registered producer is paused (Twisted's own
#: transport buffer size).
HIGH_WATER = 64 * 1024


class SendQueue:
    """The senders written to during this reactor turn, sent together at the
    start of the next one."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._waiting: list[Sender] = []
        self._call: IDelayedCall | None = None

    def sender(self, transport: Any) -> Sender:
        """A sender for ``transport``: direct for a plain TCP socket, and for
        TLS over a `TLSCarrier` on one (the records go out through the
        sender), else through the transport. A transport that made its own
        sender (TLS on the socket, ``io/tlswire.py``) gives that one."""
        own = getattr(transport, "sender", None)
        if isinstance(own, Sender):
            return own
        carrier = getattr(transport, "transport", None)
        if isinstance(carrier, TLSCarrier) and carrier.tls is transport:
            sock = self._socket(carrier.transport)
            if sock is None:
                return Sender(transport, self, None)
            sender = Sender(transport, self, sock, raw=carrier.transport, tls=True)
            carrier.sink = sender
            return sender
        return Sender(transport, self, self._socket(transport))

    def _socket(self, transport: Any) -> socket.socket | None:
        """The socket of a TCP transport we can send on directly, or None."""
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if not isinstance(sock, socket.socket) or not IReactorFDSet.providedBy(self.reactor):
            return None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Sends are gathered per turn here, so Nagle's algorithm only
            # delays (a body chunk after its head waits for a delayed ACK).
            transport.setTcpNoDelay(True)
        return sock

    def install(self, protocol: Any) -> Sender:
        """Put a sender between ``protocol`` and its transport (called from
        its ``connectionMade``): the protocol's ``transport`` is the sender
        from now on, so every write goes through it."""
        sender = self.sender(protocol.transport)
        protocol.transport = sender
        return sender

    def add(self, sender: Sender) -> None:
        self._waiting.append(sender)
        if self._call is None:
            self._call = self.reactor.callLater(0, self.send_all)

    def send_all(self) -> None:
        self._call = None
        waiting, self._waiting = self._waiting, []
        for sender in waiting:
            try:
                sender.flush()
            except Exception:
                # One connection's failure must not leave the others of this
                # turn unsent (they would never be queued again).
                _log.failure("sending on {sender}", Failure(), sender=sender)
                sender.abort()


class Sender:
    """The write owner of one connection (see the module docstring); a
    transport to the protocol that installed it."""

    def __init__(
        self,
        transport: Any,
        queue: SendQueue,
        sock: socket.socket | None,
        *,
        raw: Any = None,
        tls: bool = False,
        ssl: SSL.Connection | None = None,
        watch: Any = None,
    ) -> None:
        #: What the protocol writes to (for TLS, the `TLSMemoryBIOProtocol`).
        self.transport = transport
        #: The TCP connection's transport (under the TLS layer, if any).
        self.raw = transport if raw is None else raw
        #: The one owner of pausing this connection's reading.
        self.reading = ReadGate(self.raw)
        self.queue = queue
        self.sock = sock
        #: TLS over a layer (`wire_write`), or on the socket (`_put`, `tls_ready`).
        self.tls = tls or ssl is not None
        self._encryptor = Encryptor(transport) if tls else None
        self._records: list[bytes] = []
        self.ssl = ssl
        self._held = ssl is not None
        self._pending: list[bytes] | None = None
        self._backlog = bytearray()
        #: Watched for room: our own duplicate, or the TLS transport's.
        self._watch: Any = watch
        self._own_watch = watch is None
        self._producer: Any = None
        self._paused = False
        self._close_when_sent = False
        self.done = False
        #: When the peer last took bytes (closing one that stopped taking them).
        self.last_sent = 0.0

    @property
    def direct(self) -> bool:
        return self.sock is not None

    @property
    def backed_up(self) -> bool:
        """Bytes the peer has not taken yet (direct sockets only)."""
        return bool(self._backlog)

    def write(self, data: bytes) -> None:
        if self.done:
            return
        if self.sock is None:
            self.transport.write(data)
            return
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self.queue.add(self)
        else:
            pending.append(data)

    def flush(self) -> None:
        """Send what this turn wrote (called by the queue; early before a close)."""
        if self._encryptor is not None:
            self._flush_tls()
            return
        if self._held:
            return  # still handshaking: sent by `tls_ready`
        pending, self._pending = self._pending, None
        if not pending or self.done:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._queue_bytes(data)

    def _flush_tls(self) -> None:
        """Encrypt this turn's plaintext in one go, send the records made since."""
        pending = self._pending
        if pending and not self.done:
            self._pending = []  # still queued: records written meanwhile wait here
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            taken = self._encryptor.encrypt(data, self._records) if self._encryptor else 0
            if taken < len(data):
                self.transport.write(data[taken:] if taken else data)
        self._pending = None
        self._send_records()

    def _send_records(self) -> None:
        records, self._records = self._records, []
        if records and not self.done:
            self._queue_bytes(records[0] if len(records) == 1 else b"".join(records))

    def _queue_bytes(self, data: bytes) -> None:
        if self._backlog:
            self._backlog += data
            self._over_high_water()
            return
        self._send(data)

    def _send(self, data: bytes | memoryview) -> bool:
        """Send what the kernel takes, keep the rest; False if the connection broke."""
        try:
            sent = self._put(data)
        except (OSError, SSL.Error):
            self.abort()
            return False
        if sent:
            self.last_sent = self.queue.reactor.seconds()
        if sent < len(data):
            self._backlog += data[sent:]
            if not self._watch_writable():
                return False
            self._over_high_water()
        return True

    def _put(self, data: bytes | memoryview) -> int:
        """What the kernel took of ``data`` (TLS on the socket: all or none)."""
        try:
            ssl = self.ssl
            if ssl is None:
                return self.sock.send(data)  # type: ignore[union-attr]
            ssl.send(data)
            return len(data)
        except (BlockingIOError, SSL.WantWriteError, SSL.WantReadError):
            return 0

    def _over_high_water(self) -> None:
        if len(self._backlog) > HIGH_WATER and self._producer is not None and not self._paused:
            self._paused = True
            self._producer.pauseProducing()

    def _watch_writable(self) -> bool:
        """Watch for room in the kernel; False (and the connection cut) if
        no descriptor is left for the watch (EMFILE)."""
        watch = self._watch
        if watch is None:
            watch = self._watch = duplicate(self.sock, write=self.writable, lost=self.abort)
            if watch is None:
                self.abort()
                return False
        if not watch.watching:
            watch.watching = True
            self.queue.reactor.addWriter(watch)  # type: ignore[attr-defined]
        return True

    def writable(self) -> None:
        """The kernel has room again: send the backlog."""
        backlog = self._backlog
        if not backlog or self.done:
            self._unwatch()
            return
        with memoryview(backlog) as view:
            try:
                sent = self._put(view)
            except (OSError, SSL.Error):
                sent = -1  # aborted once the view is released
        if sent < 0:
            self.abort()
            return
        if sent:
            self.last_sent = self.queue.reactor.seconds()
        del backlog[:sent]
        if backlog:
            return
        self._unwatch()
        if self._close_when_sent:
            self.raw.loseConnection()
            return
        if self._paused:
            self._paused = False
            self._producer.resumeProducing()

    def _unwatch(self) -> None:
        watch = self._watch
        if watch is not None and watch.watching:
            watch.watching = False
            self.queue.reactor.removeWriter(watch)  # type: ignore[attr-defined]

    def register_producer(self, producer: Any) -> None:
        """Pause ``producer`` (the other side's `ReadGate`) while this
        connection is not taking what it writes."""
        self._producer = producer
        if self.sock is None:
            self.transport.registerProducer(producer, True)
            return
        self._paused = False
        self._over_high_water()

    def unregister_producer(self) -> None:
        """The producer is done here: resumed if this backlog paused it (or none would)."""
        producer, self._producer = self._producer, None
        if self.sock is None:
            self.transport.unregisterProducer()
            if isinstance(producer, ReadGate):
                producer.release(Hold.BACKLOG)  # the transport does not resume it
            return
        if self._paused:
            self._paused = False
            if producer is not None:
                producer.resumeProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.close()

    def abortConnection(self) -> None:
        self.abort()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.register_producer(producer)

    def unregisterProducer(self) -> None:
        self.unregister_producer()

    def close(self) -> None:
        """Close once everything written so far is sent (or through the TLS layer)."""
        if self.done:
            return
        self.flush()
        if self._encryptor is not None:
            self._encryptor.stop()  # the TLS layer decides what is written now
        if self.sock is None or self._encryptor is not None:
            self.transport.loseConnection()
        else:
            self._close_raw()

    def _close_raw(self) -> None:
        if self._backlog:
            self._close_when_sent = True
            self.reading.hold(Hold.CLOSING)  # nothing more is read
        elif not self.done:
            self.raw.loseConnection()

    def abort(self) -> None:
        """Cut the connection; nothing unsent goes out."""
        if self.done:
            return
        self.connection_lost()
        self.transport.abortConnection()

    def tls_ready(self) -> None:
        """TLS on the socket finished its handshake: send what waited."""
        self._held = False
        if self._pending and not self.done:
            self.queue.add(self)

    def wire_write(self, data: bytes) -> None:
        """Records from the TLS layer: sent with this turn's, or the next."""
        if self.done:
            return
        self._records.append(data)
        if self._pending is None:
            self._pending = []
            self.queue.add(self)

    def wire_close(self) -> None:
        """The TLS layer is done: close the socket once its records are sent."""
        if self.done:
            return
        self._send_records()
        self._close_raw()

    def wire_abort(self) -> None:
        """The TLS layer aborts the connection (its carrier cuts the socket)."""
        self.connection_lost()

    def connection_lost(self) -> None:
        """The connection is gone: drop what is unsent, close the duplicate."""
        self.done = True
        self.discard_unsent()

    def discard_unsent(self) -> None:
        self._pending = None
        self._records = []
        self._backlog.clear()
        producer, self._producer = self._producer, None
        if self._paused:
            # Paused by this backlog, which is gone: nothing else would resume it.
            self._paused = False
            if producer is not None:
                producer.resumeProducing()
        self._unwatch()
        if self._own_watch and self._watch is not None:
            self._watch.close()
            self._watch = None

    def __repr__(self) -> str:
        mode = "through the transport" if self.sock is None else "direct"
        if self.tls:
            mode += ", TLS"
        return f"<Sender {mode}, {len(self._backlog)} bytes waiting>"


# Not ``@implementer``: a class decorator keeps mypyc from compiling the class
# as a native class (attributes in a dict, methods called as Python objects).
classImplements(Sender, ITransport, IConsumer)
