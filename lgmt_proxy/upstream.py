"""One upstream per signal: its Agent, connection pool, TLS policy and the
credentials it injects.

The bare `twisted.web.client.Agent` is used rather than `treq.HTTPClient`:
treq's client keeps a cookie jar shared by every caller, follows redirects and
always wraps `ContentDecoderAgent` (adds ``Accept-Encoding: gzip`` and
decompresses), each of which breaks a transparent proxy; see
docs/architecture.md.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import alsoProvides, implementer

from .config import Config, Secret, SignalConfig
from .headers import forward_request_headers

#: Idle upstream connections kept per upstream host. The pool does not cap
#: concurrency, only reuse: Twisted's default of 2 reconnects under any load.
MAX_PERSISTENT_PER_HOST = 128
#: Idle upstream connections are closed after this many seconds (below the
#: 350 s idle limit of common cloud load balancers).
POOL_IDLE_SECONDS = 90


@implementer(IOpenSSLTrustRoot)
class SystemPlusBundle:
    """Trust the platform's roots plus every certificate of a PEM bundle.

    ``Certificate.loadPEM`` and ``trustRootFromCertificates`` alone would drop
    the system roots or keep only the first certificate of the file.
    """

    def __init__(self, certificates: list[crypto.X509]) -> None:
        self._certificates = certificates

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for cert in self._certificates:
            store.add_cert(cert)


def load_pem_bundle(data: bytes) -> list[crypto.X509]:
    """Every certificate in a PEM bundle (raises ValueError if there is none)."""
    from cryptography import x509

    certs = x509.load_pem_x509_certificates(data)
    return [crypto.X509.from_cryptography(c) for c in certs]


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """Every request of an upstream goes to one cached endpoint: building a
    `HostnameEndpoint` and IDNA-encoding the host per request costs ~8%."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        return self._endpoint


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's factory logs two lines per new connection; we count instead."""

    noisy = False


class _QuietPool(HTTPConnectionPool):
    """Twisted's pool, quiet, and handing out the most recently used idle
    connection first: Twisted takes the oldest (``pop(0)``), so after a burst
    one client cycled through every connection the burst opened and none ever
    aged out; LIFO keeps one hot connection and lets the surplus close."""

    _factory = _QuietClientFactory

    def getConnection(self, key: Any, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop()
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                if self.retryAutomatically:
                    connection = _RetryingHTTP11ClientProtocol(
                        connection, lambda: self._newConnection(key, endpoint)
                    )
                return succeed(connection)
        return self._newConnection(key, endpoint)  # type: ignore[no-any-return]


@implementer(IStreamClientEndpoint)
class HandshakeDeadline:
    """A TLS endpoint whose connect fires once the handshake is done, all of
    it (TCP and TLS) within ``timeout``: `wrapClientTLS` alone fires at the
    TCP connect, leaving a stalled handshake to the much longer response
    timeout."""

    def __init__(self, tls: IStreamClientEndpoint, clock: IReactorTime, timeout: float) -> None:
        self._tls = tls
        self._clock = clock
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        handshake: Deferred[Any] = Deferred()
        outer = _HandshakeFactory(factory, handshake)
        connecting = self._tls.connect(outer)  # type: ignore[arg-type]
        state: dict[str, Any] = {"proto": None}

        def connected(proto: Any) -> Deferred[Any]:
            state["proto"] = proto
            return handshake

        result = connecting.addCallback(connected)

        def expire() -> None:
            proto = state["proto"]
            if proto is None:
                connecting.cancel()
            elif not handshake.called:
                handshake.errback(TimeoutError("TLS handshake not done in time"))
                proto.transport.abortConnection()

        timer = self._clock.callLater(self._timeout, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return result.addBoth(done)


class _HandshakeFactory:
    """Wraps the pool's factory: each protocol also listens for the handshake."""

    def __init__(self, factory: Any, handshake: Deferred[Any]) -> None:
        self._factory = factory
        self._handshake = handshake

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)

    def buildProtocol(self, addr: Any) -> Any:
        proto = self._factory.buildProtocol(addr)
        handshake = self._handshake
        alsoProvides(proto, IHandshakeListener)

        def completed() -> None:
            if not handshake.called:
                handshake.callback(proto)

        lost = proto.connectionLost

        def connection_lost(reason: Any) -> None:
            if not handshake.called:
                handshake.errback(reason)
            lost(reason)

        proto.handshakeCompleted = completed
        proto.connectionLost = connection_lost
        return proto


def make_endpoint(
    reactor: object,
    signal: SignalConfig,
    *,
    connect_timeout: float,
    trust: IOpenSSLTrustRoot | None,
) -> IStreamClientEndpoint:
    host = signal.host
    if isIPAddress(host):
        tcp: IStreamClientEndpoint = TCP4ClientEndpoint(
            reactor, host, signal.port, timeout=connect_timeout
        )
    elif isIPv6Address(host):
        tcp = TCP6ClientEndpoint(reactor, host, signal.port, timeout=connect_timeout)
    else:
        tcp = HostnameEndpoint(reactor, host.encode("idna"), signal.port, timeout=connect_timeout)
    if signal.scheme != "https":
        return tcp
    policy = BrowserLikePolicyForHTTPS(trustRoot=trust) if trust else BrowserLikePolicyForHTTPS()
    creator = policy.creatorForNetloc(host.encode("idna"), signal.port)
    return HandshakeDeadline(wrapClientTLS(creator, tcp), reactor, connect_timeout)  # type: ignore[arg-type]


def basic_authorization(org_id: str, token: Secret) -> bytes:
    raw = f"{org_id}:{token.reveal()}".encode()
    return b"Basic " + base64.b64encode(raw)


@attrs.define(repr=False)
class Upstream:
    """A signal's upstream: where to send and what to inject.

    ``token`` is a callable so a rotated token file takes effect for the next
    request; the encoded header is cached per token value.
    """

    signal: SignalConfig
    agent: IAgent
    pool: HTTPConnectionPool
    endpoint: IStreamClientEndpoint
    token: Callable[[], Secret] | None
    host_header: bytes
    base_url: bytes
    base_path: bytes
    tenant: bytes | None
    _cached: tuple[Secret, bytes] | None = None
    _key: tuple[bytes, bytes, int] = attrs.field(init=False)
    _uri: URI = attrs.field(init=False)

    def authorization(self) -> bytes | None:
        """The ``Authorization`` value to inject (None: send none)."""
        if self.token is None:
            return None
        token = self.token()
        cached = self._cached
        if cached is not None and cached[0] is token:
            return cached[1]
        if self.signal.auth == "bearer":
            value = b"Bearer " + token.reveal().encode()
        else:
            value = basic_authorization(self.signal.org_id, token)
        self._cached = (token, value)
        return value

    def forward_headers(self, incoming: Headers, client_address: bytes) -> Headers:
        """What this upstream gets for a client request's headers: the
        contract's rules with this upstream's host, credentials and tenant."""
        return forward_request_headers(
            incoming,
            host=self.host_header,
            authorization=self.authorization(),
            tenant=self.tenant,
            client_address=client_address,
        )

    def request(self, method: bytes, target: bytes, headers: Any, body: Any) -> Deferred[Any]:
        """Send ``method target`` (origin-form) upstream.

        With our own `Agent` this skips `Agent.request`, which re-parses a
        full URL per request (about 3% of a small GET) only to find the one
        endpoint and pool key this upstream always uses; the target is still
        validated when the request line is written.
        """
        agent: Any = self.agent
        if type(agent) is Agent:
            return agent._requestWithEndpoint(  # type: ignore[no-any-return]
                self._key, self.endpoint, method, self._uri, headers, body, target
            )
        return agent.request(method, self.base_url + target, headers, body)  # type: ignore[no-any-return]

    def __attrs_post_init__(self) -> None:
        self._key = (self.signal.scheme.encode(), self.host_header, self.signal.port)
        self._uri = URI.fromBytes(self.base_url + b"/")

    def __repr__(self) -> str:
        return f"<Upstream {self.signal.name} {self.signal.url}>"


def build_upstream(
    reactor: IReactorTime,
    signal: SignalConfig,
    config: Config,
    token: Callable[[], Secret] | None,
    trust: IOpenSSLTrustRoot | None,
) -> Upstream:
    pool = _QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
    endpoint = make_endpoint(
        reactor, signal, connect_timeout=config.upstream_connect_timeout, trust=trust
    )
    agent = Agent.usingEndpointFactory(reactor, _FixedEndpoint(endpoint), pool=pool)
    netloc = _netloc(signal)
    return Upstream(
        signal=signal,
        agent=agent,
        pool=pool,
        endpoint=endpoint,
        token=token,
        host_header=netloc,
        base_url=signal.scheme.encode() + b"://" + netloc,
        base_path=signal.base_path.encode(),
        tenant=None if signal.tenant_id is None else signal.tenant_id.encode(),
    )


def _netloc(signal: SignalConfig) -> bytes:
    """``Host`` as the upstream expects it: IDNA host, port only when not default."""
    if isIPv6Address(signal.host):
        host = b"[" + signal.host.encode() + b"]"
    else:
        host = signal.host.encode("idna")
    default_port = 443 if signal.scheme == "https" else 80
    return host if signal.port == default_port else b"%s:%d" % (host, signal.port)


def trust_root(ca_pem: bytes | None) -> IOpenSSLTrustRoot | None:
    if ca_pem is None:
        return None
    return SystemPlusBundle(load_pem_bundle(ca_pem))


__all__ = ["Upstream", "build_upstream", "load_pem_bundle", "ssl", "trust_root"]
