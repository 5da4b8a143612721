"""TLS through Twisted's layer on our own write path, where there is no
socket under TLS for `tlswire.WireTLS` (TLS inside TLS to an ``https://``
forward proxy), and for the gRPC listener: `TLSEndpoint` runs Twisted's
`TLSMemoryBIOProtocol` over a `TLSCarrier`, the protocol of the TCP
connection (or of a forward proxy's CONNECT tunnel), instead of over
Twisted's TCP transport as ``wrapClientTLS`` does. `ClientTLS`, the
client context and verification, serves both.

The carrier is the TLS layer's transport. Once the application protocol
installs its `Sender` (``SendQueue.install``, from its ``connectionMade``,
before the first handshake byte), the sender finds the carrier under the TLS
layer and takes its ciphertext (``carrier.sink``): a turn's plaintext is
encrypted in one go (`Encryptor`, once the handshake is done) and the
records go out in one ``send`` on the socket, with no epoll registration
unless the kernel takes only part, and a peer that stops reading shows as
the sender's backlog (``backed_up``).
Until then, or with no socket underneath (TLS inside TLS to an ``https://``
forward proxy), the carrier writes to the connection's transport.

The connection creator is `ClientTLS`: ``optionsForClientTLS``'s policy and
verification (service_identity against the host name, from the same
callback), on a context of its own with pyOpenSSL's partial writes turned
off, so that one ``SSL_write`` takes a whole turn's plaintext rather than one
16 KiB record a call. The endpoint's Deferred fires with the application
protocol once TCP (or the tunnel) is up; the handshake ends with
``IHandshakeListener.handshakeCompleted``, so a connect deadline that waits
for it covers both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from typing import Protocol as TypingProtocol

import idna
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, ServiceID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger(namespace="lgmt_proxy.tls")

#: Most plaintext in one TLS record, and the most a record adds to it
#: (header, explicit IV, MAC or tag, padding), with room to spare.
TLS_RECORD = 16 * 1024
TLS_OVERHEAD = 512

#: OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
#: and SSL_OP_NO_RENEGOTIATION (openssl/ssl.h; part of its ABI), which
#: pyOpenSSL has no names for.
PARTIAL_WRITE: Final = 0x1
ACCEPT_MOVING_WRITE_BUFFER: Final = 0x2
NO_RENEGOTIATION: Final = 0x40000000

#: Twisted's default TLS 1.2 cipher list (``_sslverify.defaultCiphers``):
#: forward secrecy first, AEAD before CBC; TLS 1.3 suites are OpenSSL's.
CIPHERS: Final = (
    b"ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
    b"ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS"
)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """The client side of TLS to ``host``, as ``optionsForClientTLS(host,
    trustRoot)`` makes it (TLS 1.2 or later, Twisted's ciphers, no
    compression or session cache, the peer's chain verified against
    ``trust``, else the platform's roots, and its leaf against the host name
    or IP address by service_identity; SNI for a name), plus renegotiation
    refused, on a context made here: pyOpenSSL turns partial writes on for
    every context, so each ``SSL_write`` would take one 16 KiB record, and a
    context can only be changed before its first connection, which
    ``optionsForClientTLS``'s has had by the time it is returned. A turn's
    plaintext is one call (`Encryptor`): a quarter of the calls, each costly
    in pyOpenSSL's Python."""

    def __init__(self, host: str, trust: Sequence[crypto.X509] | None) -> None:
        self._host = host
        ip = isIPAddress(host) or isIPv6Address(host)
        #: SNI for a name, never for an address (RFC 6066).
        self._server_name = None if ip else idna.encode(host)
        self._identity: ServiceID = (
            IPAddress_ID(host) if ip else DNS_ID(idna.encode(host).decode("ascii"))
        )
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.clear_mode(PARTIAL_WRITE)
        # Moving write buffers: TLS on the socket retries an SSL_write the
        # kernel had no room for with its backlog, the same bytes first.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | ACCEPT_MOVING_WRITE_BUFFER)
        ctx.set_options(SSL.OP_NO_COMPRESSION | NO_RENEGOTIATION)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        ctx.set_verify_depth(9)
        if trust is None:
            ctx.set_default_verify_paths()
        else:
            store = ctx.get_cert_store()
            assert store is not None
            for cert in trust:
                store.add_cert(cert)
        ctx.set_cipher_list(CIPHERS)  # the last change: this one uses the context
        self._context = ctx

    def __repr__(self) -> str:
        return f"<ClientTLS {self._host}>"

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        if self._server_name is not None:
            conn.set_tlsext_host_name(self._server_name)
        verify = _Verifier(tlsProtocol, self._identity)
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return conn

    def wire_connection(self, wire: Any, tls: Verifiable) -> SSL.Connection:
        """A client connection whose BIO is ``wire``'s descriptor (TLS on the
        socket, ``io/tlswire.py``); a certificate not for the host name is
        reported to ``tls.failVerification``."""
        conn = SSL.Connection(self._context, wire)
        conn.set_connect_state()
        if self._server_name is not None:
            conn.set_tlsext_host_name(self._server_name)
        verify = _Verifier(tls, self._identity)
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return conn


class Verifiable(TypingProtocol):
    """What a failed host name check is reported to (a TLS layer)."""

    def failVerification(self, reason: Failure) -> None: ...


class _Verifier:
    """OpenSSL's verify callback for one connection: the chain's verdict,
    and the leaf checked against the upstream's identity (what Twisted's
    ``ClientTLSOptions`` does): a mismatch fails the handshake with
    service_identity's error, which the proxy reports as a TLS failure."""

    __slots__ = ("_identity", "_tls")

    def __init__(self, tls: Verifiable, identity: ServiceID) -> None:
        self._tls: Verifiable | None = tls
        self._identity = identity

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, err: int, depth: int, ok: int
    ) -> bool:
        if depth != 0:
            return bool(ok)
        result = bool(ok)
        tls, self._tls = self._tls, None  # no cycle once the leaf is seen
        try:
            verify_service_identity(extract_patterns(cert), [self._identity], [])
        except VerificationError:
            result = False
            if tls is not None:
                tls.failVerification(Failure())
        except Exception:
            # Raised out of an OpenSSL callback it would be lost: log it.
            result = False
            _log.failure("verifying the upstream's certificate")
        return result


class CipherSink(TypingProtocol):
    """What takes a TLS connection's records (the connection's `Sender`)."""

    def wire_write(self, data: bytes) -> None: ...

    def wire_close(self) -> None: ...

    def wire_abort(self) -> None: ...


@implementer(ITransport, IPushProducer)
class TLSCarrier(Protocol):
    """The protocol of the connection under the TLS layer, and the TLS
    layer's transport: records out through ``sink`` once a sender takes
    them, bytes in handed to the TLS layer."""

    def __init__(self, tls: TLSMemoryBIOProtocol) -> None:
        self.tls = tls
        #: The sender that takes the records (None: the transport does).
        self.sink: CipherSink | None = None

    # -- the connection's protocol ---------------------------------------------------

    def connectionMade(self) -> None:
        self.tls.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self.tls.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.sink = None
        self.tls.connectionLost(reason)

    # -- the TLS layer's transport -----------------------------------------------------

    def write(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.wire_write(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        sink = self.sink
        if sink is not None:
            sink.wire_close()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def abortConnection(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.wire_abort()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        return self.transport.getHost()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()  # type: ignore[union-attr]


class Encryptor:
    """Encrypts a sender's plaintext on the TLS layer's OpenSSL connection
    (the layer's public ``getHandle``) in one ``SSL_write`` and takes the
    records in one read of its memory BIO, rather than through the layer's
    ``write``: a copied slice, a 32 KiB BIO read and a write to the carrier
    per 16 KiB record, most of a TLS upload's CPU. Only once the handshake
    is done; after anything else (written while handshaking, an error, the
    close) the layer writes everything for good, so nothing it buffers is
    ever overtaken."""

    __slots__ = ("_ready", "_ssl")

    def __init__(self, tls: Any) -> None:
        handle = tls.getHandle()
        self._ssl: SSL.Connection | None = handle if isinstance(handle, SSL.Connection) else None
        self._ready = False

    def stop(self) -> None:
        """From now on the TLS layer writes everything."""
        self._ssl = None

    def encrypt(self, data: bytes, records: list[bytes]) -> int:
        """Encrypt what the connection takes of ``data``, its records
        appended to ``records``; the bytes taken (the layer writes the rest)."""
        ssl_conn = self._ssl
        if ssl_conn is None:
            return 0
        if not self._ready:
            if ssl_conn.get_finished() is None:
                self._ssl = None  # still handshaking: the layer buffers
                return 0
            self._ready = True
        # One SSL_write takes it all on a `ClientTLS` context; with partial
        # writes on (another creator) it takes one record a call, and the
        # rest goes as slices of a memoryview, copied by nothing but the cipher.
        total = len(data)
        sent = 0
        try:
            sent = ssl_conn.send(data)
            if sent < total:
                view = memoryview(data)
                while sent < total:
                    sent += ssl_conn.send(view[sent:])
        except SSL.Error:
            # The layer meets the error again, and reports it. (Renegotiation
            # is refused, so a write never waits for the peer half-way.)
            self._ssl = None
        if not sent:
            return 0
        size = sent + TLS_OVERHEAD * (sent // TLS_RECORD + 1)
        out = ssl_conn.bio_read(size)  # not empty: ``sent`` bytes went in
        records.append(out)
        while len(out) == size:  # more than expected waits: take it all
            try:
                out = ssl_conn.bio_read(size)
            except SSL.WantReadError:
                break
            records.append(out)
        return sent


class _CarrierFactory(Factory):
    """A carrier, with its TLS layer, per connection the endpoint makes."""

    noisy = False

    def __init__(self, tls: TLSMemoryBIOFactory) -> None:
        self._tls = tls

    def buildProtocol(self, addr: IAddress | None) -> TLSCarrier | None:
        tls = self._tls.buildProtocol(addr)
        if tls is None:
            return None
        return TLSCarrier(tls)

    def doStart(self) -> None:
        self._tls.doStart()

    def doStop(self) -> None:
        self._tls.doStop()


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """TLS over ``endpoint``'s connections, verified by ``creator``
    (``optionsForClientTLS``): ``wrapClientTLS`` with the records going out
    through the connection's sender."""

    def __init__(
        self,
        clock: IReactorTime,
        creator: IOpenSSLClientConnectionCreator,
        endpoint: IStreamClientEndpoint,
    ) -> None:
        self._clock = clock
        self._creator = creator
        self._endpoint = endpoint

    def __repr__(self) -> str:
        return f"<TLSEndpoint over {self._endpoint!r}>"

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        tls = TLSMemoryBIOFactory(self._creator, True, factory, self._clock)
        # Not the default BufferingTLSTransport: the sender gathers a turn's
        # writes already, and its extra turn and copy would be the only ones.
        tls.protocol = TLSMemoryBIOProtocol
        connecting = self._endpoint.connect(_CarrierFactory(tls))
        return connecting.addCallback(_application)


def _application(carrier: IProtocol) -> IProtocol:
    assert isinstance(carrier, TLSCarrier)
    return carrier.tls.wrappedProtocol  # type: ignore[no-any-return]


__all__ = ["CipherSink", "ClientTLS", "Encryptor", "TLSCarrier", "TLSEndpoint"]
