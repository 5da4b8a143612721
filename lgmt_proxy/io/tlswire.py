"""TLS to an upstream on the socket itself, as nginx does it: `WireTLS` runs
an OpenSSL connection whose BIO is a duplicate of the TCP connection's
descriptor (pyOpenSSL's socket BIO, ``SSL.Connection(context, socket)``), so
``SSL_write`` encrypts into its record buffer and sends from there, and
``SSL_read`` receives straight from the kernel. Twisted's TLS layer
(``TLSMemoryBIOProtocol``, `io/tls.py`) makes four more passes over every
byte (the memory BIO's write, its zeroing and read, pyOpenSSL's copy into
``bytes``) and one Python-level ``send`` per turn: a fifth of an HTTPS
upload's CPU (docs/performance.md).

The TCP connection's transport stays Twisted's (connecting, closing, the
reason it closed), but its reading is paused (its public ``pauseProducing``)
for good: the duplicate descriptor (`descriptor.Duplicate`) is watched with the reactor's
public ``addReader``/``addWriter`` instead, for the handshake, ``SSL_read``
and the sender's backlog. The application protocol's transport is this
object; its writes go through its `Sender`, made here and handed out by
``SendQueue.install``, which encrypts and sends a turn's plaintext in one
``SSL_write`` (the sender's backlog keeps the plaintext OpenSSL asked to be
retried with, `Sender.ssl`).

TLS inside TLS (an ``https://`` forward proxy) has no socket under the
upstream's TLS and keeps Twisted's layer (`tls.TLSEndpoint`).
"""

from __future__ import annotations

import socket
from typing import Any, Final

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorFDSet,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import classImplements, implementer

from lgmt_proxy.io.descriptor import Duplicate, duplicate
from lgmt_proxy.io.sending import Sender, SendQueue
from lgmt_proxy.io.tls import ClientTLS

#: Plaintext asked of one ``SSL_read`` (a record holds at most 16 KiB), and
#: the most read in one readiness event before other connections get a turn.
READ_SIZE: Final = 65536
READ_BUDGET: Final = 262144


def lost_reason(error: SSL.Error) -> Failure:
    """What the application is told for an OpenSSL error on the wire: the
    peer going away without ``close_notify`` (EOF, reset) is a lost
    connection, as Twisted's TLS layer reports it; anything else (a bad
    record, a refused handshake) is the TLS error itself."""
    if isinstance(error, SSL.SysCallError):
        return Failure(ConnectionLost(str(error.args[1])))
    queue = error.args[0] if error.args else None
    if not queue or (
        isinstance(queue, list) and str(queue[-1][-1]).casefold().startswith("unexpected eof")
    ):
        return Failure(ConnectionLost("unexpected EOF"))
    return Failure(error)


class WireTLS(Protocol):
    """The protocol of one TCP connection and the transport of the
    application protocol over it: TLS on the connection's socket (see the
    module docstring)."""

    def __init__(
        self, reactor: IReactorFDSet, creator: ClientTLS, sends: SendQueue, app: IProtocol
    ) -> None:
        self.reactor = reactor
        self.creator = creator
        self.sends = sends
        self.app = app
        #: The connection's write owner (None until connected).
        self.sender: Sender | None = None
        self.ssl: SSL.Connection | None = None
        self._wire: Duplicate | None = None
        self._handshaking = True
        self._paused = False
        #: The first failure seen (a verification error, a TLS alert),
        #: reported to the application rather than the TCP close's reason.
        self._reason: Failure | None = None
        self._ending = False
        #: An ``SSL_read`` asked for room to write (`readable` again then).
        self._read_waits = False

    # -- the TCP connection's protocol -------------------------------------------------

    def connectionMade(self) -> None:
        tcp = self.transport
        assert tcp is not None
        handle = getattr(tcp, "getHandle", None)
        sock = handle() if handle is not None else None
        wire = None
        if isinstance(sock, socket.socket):
            wire = duplicate(
                sock, read=self.readable, write=self.writable, lost=self.wire_lost, name="TLS"
            )
        if wire is None or sock is None:
            # Not a socket (a test's transport), or no descriptor left (EMFILE).
            self._reason = Failure(ConnectError(string="no socket descriptor for TLS"))
            tcp.loseConnection()
            return
        self._wire = wire
        tcp.pauseProducing()  # type: ignore[attr-defined]  # for good: the wire reads
        self.ssl = self.creator.wire_connection(wire, self)
        self.sender = Sender(self, self.sends, sock, raw=self, ssl=self.ssl, watch=wire)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            tcp.setTcpNoDelay(True)  # type: ignore[attr-defined]
        self._want_read()
        self.app.makeConnection(self)
        self._handshake()

    def dataReceived(self, data: bytes) -> None:
        # Only bytes read before this protocol paused the transport (a
        # forward proxy's answer followed by more): not TLS we asked for.
        self.fail(Failure(SSL.Error("bytes before the TLS handshake")))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_wire()
        failure, self._reason = self._reason, None
        self.app.connectionLost(failure or reason)

    # -- the wire ------------------------------------------------------------------------

    def _handshake(self) -> None:
        ssl = self.ssl
        if ssl is None:
            return
        try:
            ssl.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.WantWriteError:
            self._want_write()
            return
        except SSL.Error as e:
            self.fail(lost_reason(e))
            return
        self._handshaking = False
        if self._paused:
            self._unwant_read()
        if IHandshakeListener.providedBy(self.app):
            self.app.handshakeCompleted()  # type: ignore[attr-defined]
        if self.sender is not None:
            self.sender.tls_ready()

    def readable(self) -> None:
        if self._handshaking:
            self._handshake()
            return
        ssl = self.ssl
        budget = READ_BUDGET
        while ssl is not None and not self._paused and (budget > 0 or ssl.pending()):
            try:
                data = ssl.recv(READ_SIZE)
            except SSL.WantReadError:
                return
            except SSL.WantWriteError:
                self._read_waits = True  # a key update's answer waits for room
                self._want_write()
                return
            except SSL.ZeroReturnError:
                self._closed_by_peer()
                return
            except SSL.Error as e:
                self.fail(lost_reason(e))
                return
            budget -= len(data)
            self.app.dataReceived(data)
            ssl = self.ssl

    def writable(self) -> None:
        if self._handshaking:
            self._unwant_write()
            self._handshake()
            return
        if self._read_waits:
            self._read_waits = False
            self.readable()
        if self.sender is not None:
            self.sender.writable()
        else:
            self._unwant_write()

    def wire_lost(self) -> None:
        """The reactor saw the descriptor fail: report the connection lost."""
        self.fail(Failure(ConnectionLost("the connection failed")))

    def _closed_by_peer(self) -> None:
        """``close_notify``: answer it and close; the application hears the
        TCP close's reason (a clean close), as with Twisted's TLS layer."""
        self._shutdown()
        self._end(abort=False)

    def fail(self, reason: Failure) -> None:
        """The TLS connection cannot go on: close it with ``reason``."""
        if self._reason is None:
            self._reason = reason
        self._end(abort=False)

    def failVerification(self, reason: Failure) -> None:
        """The upstream's certificate is not for its name (`tls._Verifier`):
        what the handshake's failure is reported as."""
        if self._reason is None:
            self._reason = reason

    def _shutdown(self) -> None:
        ssl = self.ssl
        if ssl is not None and not self._handshaking:
            try:
                ssl.shutdown()  # close_notify, straight to the socket
            except SSL.Error:
                pass

    def _end(self, *, abort: bool) -> None:
        if self._ending:
            return
        self._ending = True
        self._stop_wire()
        tcp = self.transport
        if tcp is not None:
            if abort:
                tcp.abortConnection()  # type: ignore[attr-defined]
            else:
                tcp.loseConnection()

    def _stop_wire(self) -> None:
        """Unregister and close the duplicate, after the sender is done and
        with the OpenSSL connection that wrote to it forgotten: its number
        may be reused at once."""
        if self.sender is not None:
            self.sender.connection_lost()
        wire, self._wire = self._wire, None
        self.ssl = None
        if wire is None:
            return
        if wire.reading:
            self.reactor.removeReader(wire)
        if wire.watching:
            self.reactor.removeWriter(wire)
        wire.close()

    def _want_read(self) -> None:
        wire = self._wire
        if wire is not None and not wire.reading:
            wire.reading = True
            self.reactor.addReader(wire)

    def _unwant_read(self) -> None:
        wire = self._wire
        if wire is not None and wire.reading:
            wire.reading = False
            self.reactor.removeReader(wire)

    def _want_write(self) -> None:
        wire = self._wire
        if wire is not None and not wire.watching:
            wire.watching = True
            self.reactor.addWriter(wire)

    def _unwant_write(self) -> None:
        wire = self._wire
        if wire is not None and wire.watching:
            wire.watching = False
            self.reactor.removeWriter(wire)

    # -- the application's transport ----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.sender is not None:
            self.sender.write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close once the sender sent everything (it calls this again then):
        ``close_notify``, then the TCP close."""
        sender = self.sender
        if sender is not None and not sender.done and sender.backed_up:
            sender.close()
            return
        self._shutdown()
        self._end(abort=False)

    def abortConnection(self) -> None:
        self._end(abort=True)

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        return self.transport.getHost()  # type: ignore[union-attr]

    def getHandle(self) -> SSL.Connection | None:
        return self.ssl

    def pauseProducing(self) -> None:
        self._paused = True
        if not self._handshaking:
            self._unwant_read()

    def resumeProducing(self) -> None:
        self._paused = False
        self._want_read()
        ssl = self.ssl
        if ssl is not None and not self._handshaking and ssl.pending():
            # Plaintext OpenSSL holds already: no readiness event will come.
            self.reactor.callLater(0, self.readable)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.sender is not None:
            self.sender.register_producer(producer)

    def unregisterProducer(self) -> None:
        if self.sender is not None:
            self.sender.unregister_producer()

    def __repr__(self) -> str:
        return f"<WireTLS {self.creator!r}>"


# Not ``@implementer``: a class decorator keeps mypyc from compiling the class
# as a native class (attributes in a dict, methods called as Python objects).
classImplements(WireTLS, ITransport, IPushProducer)


class _WireFactory(Factory):
    """A `WireTLS`, with the application protocol over it, per connection."""

    noisy = False

    def __init__(
        self, reactor: IReactorFDSet, creator: ClientTLS, sends: SendQueue, app: IProtocolFactory
    ) -> None:
        self._reactor = reactor
        self._creator = creator
        self._sends = sends
        self._app = app

    def buildProtocol(self, addr: IAddress | None) -> WireTLS | None:
        app = self._app.buildProtocol(addr)  # type: ignore[arg-type]
        if app is None:
            return None
        return WireTLS(self._reactor, self._creator, self._sends, app)

    def doStart(self) -> None:
        self._app.doStart()

    def doStop(self) -> None:
        self._app.doStop()


@implementer(IStreamClientEndpoint)
class WireTLSEndpoint:
    """TLS on the sockets of ``endpoint``'s connections (TCP, or a plain
    forward proxy's CONNECT tunnel), verified by ``creator``; its Deferred
    fires with the application protocol once TCP is up, and the handshake
    ends with its ``handshakeCompleted``."""

    def __init__(
        self,
        reactor: IReactorFDSet,
        creator: ClientTLS,
        endpoint: IStreamClientEndpoint,
        sends: SendQueue,
    ) -> None:
        self._reactor = reactor
        self._creator = creator
        self._endpoint = endpoint
        self._sends = sends

    def __repr__(self) -> str:
        return f"<WireTLSEndpoint over {self._endpoint!r}>"

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        wires = _WireFactory(self._reactor, self._creator, self._sends, factory)
        return self._endpoint.connect(wires).addCallback(_application)


def _application(wire: IProtocol) -> IProtocol:
    assert isinstance(wire, WireTLS)
    return wire.app


__all__ = ["WireTLS", "WireTLSEndpoint", "lost_reason"]
