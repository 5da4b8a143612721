"""A small Redis client on the reactor: RESP over a Twisted protocol,
``hiredis.Reader`` as the reply parser, commands pipelined on a few kept
connections that reconnect with backoff.

It does only what shared budgets need (a handshake, then scripts), and
never waits: `RedisPool.command` answers None at once when no connection is
up, and the caller (`lgmt_proxy.limits.shared`) puts its own deadline on
every reply. docs/architecture.md says why not txredisapi.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from lgmt_proxy.config.ratelimit import RedisSettings
from lgmt_proxy.io.sending import Sender, SendQueue
from lgmt_proxy.io.tls import ClientTLS

Arg = bytes | str | int | float


class RedisError(Exception):
    """Redis answered an error (``NOSCRIPT``, ``OOM``, ``READONLY``,
    ``NOAUTH``...): the first word is its kind."""

    @property
    def kind(self) -> str:
        return str(self).split(" ", 1)[0]


class NotConnected(Exception):
    """The connection closed before Redis answered."""


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()


def encode(*args: Arg) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespProtocol(Protocol):
    """One connection: commands written as they come (pipelined, and those
    of one reactor turn sent together by the connection's `Sender`), replies
    matched to them in order."""

    def __init__(self, sends: SendQueue) -> None:
        self._sends = sends
        self.sender: Sender | None = None
        self._reader = hiredis.Reader()
        self._replies: deque[Deferred[Any]] = deque()
        self.lost: Deferred[None] = Deferred()
        self.open = False

    @property
    def in_flight(self) -> int:
        return len(self._replies)

    def connectionMade(self) -> None:
        self.sender = self._sends.install(self)
        self.open = True

    def command(self, *args: Arg) -> Deferred[Any]:
        """Send one command; the Deferred fires with the reply, or fails with
        `RedisError` or `NotConnected`."""
        d: Deferred[Any] = Deferred()
        if not self.open or self.sender is None:
            d.errback(NotConnected())
            return d
        self._replies.append(d)
        self.sender.write(encode(*args))
        return d

    def abort(self) -> None:
        if self.sender is not None:
            self.sender.abort()

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:
                self.abort()
                return
            if reply is False:
                return
            if not self._replies:
                # A reply nobody asked for: the stream cannot be trusted.
                self.abort()
                return
            d = self._replies.popleft()
            if isinstance(reply, hiredis.ReplyError):
                d.errback(RedisError(str(reply)))
            else:
                d.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        if self.sender is not None:
            self.sender.connection_lost()
        waiting, self._replies = self._replies, deque()
        for d in waiting:
            d.errback(NotConnected())
        self.lost.callback(None)


class _Slot:
    """One kept connection of the pool."""

    def __init__(self) -> None:
        self.protocol: RespProtocol | None = None
        self.ready = False
        self.attempt: Deferred[Any] | None = None
        self.retry: IDelayedCall | None = None
        self.backoff = 0.0


class RedisPool:
    """``size`` connections to one Redis, each authenticated and on its
    database before use, each reconnecting with exponential backoff
    (``first_backoff`` doubling to ``max_backoff``) when it fails or drops.

    ``on_error(reason)`` is told ``connect`` or ``auth`` when an attempt
    fails, ``on_up()`` when a connection is ready. A command goes to the
    ready connection with the fewest replies outstanding, never to one with
    ``max_in_flight`` of them (a Redis that stopped answering)."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        settings: RedisSettings,
        *,
        on_error: Callable[[str], None],
        on_up: Callable[[], None],
        sends: SendQueue | None = None,
        size: int = 2,
        connect_timeout: float = 2.0,
        first_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_in_flight: int = 1000,
        trust: Sequence[X509] | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._sends = sends if sends is not None else SendQueue(clock)
        self._settings = settings
        self._on_error = on_error
        self._on_up = on_up
        self._slots = [_Slot() for _ in range(size)]
        self._connect_timeout = connect_timeout
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._max_in_flight = max_in_flight
        self._trust = trust
        self._running = False

    def _endpoint(self) -> Any:
        s = self._settings
        tcp = HostnameEndpoint(self._reactor, s.host, s.port, timeout=self._connect_timeout)
        if s.tls:
            # Verified as upstreams are: the platform's roots plus UPSTREAM_CA_FILE.
            return wrapClientTLS(ClientTLS(s.host, self._trust), tcp)
        return tcp

    @property
    def ready(self) -> bool:
        return any(slot.ready for slot in self._slots)

    def start(self) -> None:
        self._running = True
        for slot in self._slots:
            self._connect(slot)

    def stop(self) -> None:
        """Close every connection and stop reconnecting."""
        self._running = False
        for slot in self._slots:
            if slot.retry is not None and slot.retry.active():
                slot.retry.cancel()
            slot.retry = None
            if slot.attempt is not None:
                slot.attempt.cancel()
            if slot.protocol is not None and slot.protocol.sender is not None:
                slot.protocol.sender.close()
            slot.ready = False

    def command(self, *args: Arg) -> Deferred[Any] | None:
        """Send a command on a ready connection, or None when none is."""
        best: RespProtocol | None = None
        for slot in self._slots:
            p = slot.protocol
            if slot.ready and p is not None and p.in_flight < self._max_in_flight:
                if best is None or p.in_flight < best.in_flight:
                    best = p
        return None if best is None else best.command(*args)

    def _connect(self, slot: _Slot) -> None:
        slot.retry = None
        slot.protocol = None
        if not self._running:
            return
        attempt = Deferred.fromCoroutine(self._open(slot))
        slot.attempt = attempt

        def failed(failure: Failure) -> None:
            slot.attempt = None
            slot.ready = False
            if slot.protocol is not None:
                slot.protocol.abort()
            if not self._running:
                return
            reason = "connect"
            if isinstance(failure.value, RedisError):
                reason = "auth" if _auth_refused(failure.value) else "error"
            self._on_error(reason)
            self._again(slot)

        attempt.addErrback(failed)

    async def _open(self, slot: _Slot) -> None:
        sends = self._sends
        factory = Factory.forProtocol(lambda: RespProtocol(sends))
        protocol: RespProtocol = await self._endpoint().connect(factory)
        slot.protocol = protocol
        protocol.lost.addCallback(lambda _: self._lost(slot, protocol))
        s = self._settings
        handshake = []
        # Pipelined: both written at once, one round trip.
        if s.password is not None:
            user = [s.username] if s.username else []
            handshake.append(protocol.command("AUTH", *user, s.password.reveal()))
        if s.db:
            handshake.append(protocol.command("SELECT", s.db))
        handshake.append(protocol.command("PING"))
        timer = self._clock.callLater(self._connect_timeout, protocol.abort)
        refused: BaseException | None = None
        try:
            for step in handshake:  # every reply awaited: none is left unhandled
                try:
                    await step
                except (RedisError, NotConnected) as e:
                    refused = refused or e
        finally:
            # Also when the pool stops meanwhile (the attempt cancelled): no
            # timer left behind, and the replies not awaited any more are
            # not errors nobody handled.
            if timer.active():
                timer.cancel()
            for step in handshake:
                step.addErrback(_ignored)
        if refused is not None:
            raise refused
        slot.attempt = None
        slot.ready = True
        slot.backoff = 0.0
        self._on_up()

    def _lost(self, slot: _Slot, protocol: RespProtocol) -> None:
        if slot.protocol is not protocol:
            return
        was_ready, slot.ready, slot.protocol = slot.ready, False, None
        if was_ready and self._running:
            self._on_error("connect")
            self._again(slot)

    def _again(self, slot: _Slot) -> None:
        if not self._running or slot.retry is not None:
            return
        slot.backoff = min(self._max_backoff, max(self._first_backoff, slot.backoff * 2))
        slot.retry = self._clock.callLater(slot.backoff, self._connect, slot)


def _ignored(failure: Failure) -> None:
    """A reply nobody waits for any more."""


def _auth_refused(error: RedisError) -> bool:
    """NOAUTH, WRONGPASS, or ERR about AUTH (a password Redis does not want)."""
    return error.kind in ("NOAUTH", "WRONGPASS") or "AUTH" in str(error)
