"""One upstream per route target: its endpoint, connection pool, TLS policy
and the credentials it injects.

The client is our own (`pool.UpstreamPool` over `Protocol` and httptools)
rather than treq or twisted.web's `Agent`: treq's client shares a cookie jar
between callers, follows redirects and decompresses, each of which breaks a
transparent proxy, and the Agent cost a fifth of the CPU per request and
leaked pooled connections on targets it refused; see docs/architecture.md.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import attrs
from OpenSSL import crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from lgmt_proxy.config.egress import ForwardProxy
from lgmt_proxy.config.settings import Config, Secret, UpstreamConfig
from lgmt_proxy.dataplane.forward import ConnectEndpoint
from lgmt_proxy.dataplane.pool import UpstreamPool
from lgmt_proxy.io.compress import Gzip
from lgmt_proxy.io.sending import SendQueue
from lgmt_proxy.io.tls import ClientTLS, TLSEndpoint
from lgmt_proxy.io.tlswire import WireTLSEndpoint
from lgmt_proxy.rules.compression import compress_request
from lgmt_proxy.rules.headers import RawHeaders, forward_request_headers


def load_pem_bundle(data: bytes) -> list[crypto.X509]:
    """Every certificate in a PEM bundle (raises ValueError if there is none)."""
    from cryptography import x509

    certs = x509.load_pem_x509_certificates(data)
    return [crypto.X509.from_cryptography(c) for c in certs]


def trust_root(ca_pem: bytes | None, system_pem: bytes | None = None) -> list[crypto.X509] | None:
    """Every certificate of ``ca_pem`` plus the platform's roots
    (``system_pem``, the system bundle read at start-up): a private CA for a
    self-hosted stack must not stop Grafana Cloud's certificates verifying.
    None (no ``ca_pem``): the platform's default verify paths."""
    if ca_pem is None:
        return None
    certs = load_pem_bundle(ca_pem)
    if system_pem:
        try:
            certs += load_pem_bundle(system_pem)
        except ValueError:
            pass
    return certs


def _tcp(reactor: object, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)


def make_endpoint(
    reactor: object,
    upstream: UpstreamConfig,
    *,
    connect_timeout: float,
    trust: Sequence[crypto.X509] | None,
    proxy: ForwardProxy | None = None,
    sends: SendQueue | None = None,
) -> IStreamClientEndpoint:
    """TCP to the upstream, or through ``proxy`` (``CONNECT``: the proxy
    resolves the upstream's name), then TLS verified against the upstream's
    own name for an https upstream (TLS to an https proxy as well): on the
    socket itself (`WireTLSEndpoint`, its plaintext sent by the connection's
    sender), or, inside TLS to an https proxy or without a send queue,
    through Twisted's TLS layer (`TLSEndpoint`)."""
    clock: IReactorTime = reactor  # type: ignore[assignment]
    if proxy is None:
        tcp = _tcp(reactor, upstream.host, upstream.port, connect_timeout)
    else:
        to_proxy = _tcp(reactor, proxy.host, proxy.port, connect_timeout)
        if proxy.scheme == "https":
            to_proxy = TLSEndpoint(clock, ClientTLS(proxy.host, trust), to_proxy)
        tcp = ConnectEndpoint(to_proxy, upstream.host, upstream.port, proxy.authorization)
    if upstream.scheme != "https":
        return tcp
    creator = ClientTLS(upstream.host, trust)
    if sends is None or (proxy is not None and proxy.scheme == "https"):
        return TLSEndpoint(clock, creator, tcp)  # no socket under it: TLS inside TLS
    return WireTLSEndpoint(reactor, creator, tcp, sends)  # type: ignore[arg-type]


def basic_authorization(user: str, token: Secret) -> bytes:
    raw = f"{user}:{token.reveal()}".encode()
    return b"Basic " + base64.b64encode(raw)


@attrs.define(repr=False)
class Upstream:
    """Where one route target's requests go and what is injected into them.

    ``token`` is a callable so a rotated token file takes effect for the next
    request; the encoded header is cached per token value.
    """

    config: UpstreamConfig
    pool: UpstreamPool
    endpoint: IStreamClientEndpoint
    token: Callable[[], Secret] | None
    host_header: bytes
    base_path: bytes
    tenant: bytes | None
    #: The forward proxy its connections go through (None: direct).
    proxy: ForwardProxy | None = None
    _cached: tuple[Secret, bytes] | None = None

    @property
    def authorization(self) -> bytes | None:
        """The ``Authorization`` value to inject (None: send none)."""
        if self.token is None:
            return None
        token = self.token()
        cached = self._cached
        if cached is not None and cached[0] is token:
            return cached[1]
        if self.config.auth == "bearer":
            value = b"Bearer " + token.reveal().encode()
        else:
            value = basic_authorization(self.config.user, token)
        self._cached = (token, value)
        return value

    def forward_headers(
        self,
        incoming: RawHeaders,
        client_address: bytes,
        tenant: bytes | None = None,
        *,
        gzip: bool = False,
    ) -> RawHeaders:
        """What this upstream gets for a client request's headers: the
        contract's rules with this upstream's host, credentials and tenant
        (``tenant``: the consumer's, on a ``from_consumer`` route);
        ``gzip``: the body goes up gzip'd (`body_gzip`)."""
        return forward_request_headers(
            incoming,
            host=self.host_header,
            authorization=self.authorization,
            tenant=self.tenant if tenant is None else tenant,
            client_address=client_address,
            content_encoding=b"gzip" if gzip else None,
        )

    def forward(
        self,
        method: bytes,
        target: bytes,
        incoming: RawHeaders,
        client_address: bytes,
        tenant: bytes | None,
        has_body: bool,
    ) -> tuple[RawHeaders, Gzip | None]:
        """`forward_headers`, and the body's compressor when this upstream
        has ``UPSTREAM_COMPRESSION`` on and the rules say it is a push body
        that came uncompressed (`compress_request`); else None: as it came."""
        level = self.config.gzip_level
        gzip = None
        if level is not None and compress_request(method, target, incoming, has_body):
            gzip = Gzip(level)
        headers = self.forward_headers(incoming, client_address, tenant, gzip=gzip is not None)
        return headers, gzip

    def __repr__(self) -> str:
        return f"<Upstream {self.config.name} {self.config.url}>"


def build_upstream(
    reactor: IReactorTime,
    upstream: UpstreamConfig,
    config: Config,
    token: Callable[[], Secret] | None,
    trust: Sequence[crypto.X509] | None,
    *,
    endpoint: IStreamClientEndpoint | None = None,
    sends: SendQueue | None = None,
) -> Upstream:
    """``endpoint`` replaces the one the URL names (in-memory tests);
    ``sends`` is shared with the listener (one send per connection per turn).
    The forward proxy is the route's own (``upstream.proxy``) if it names
    one, else the environment's."""
    proxy = config.egress.proxy_for(upstream.scheme, upstream.host, upstream.port, upstream.proxy)
    if sends is None:
        sends = SendQueue(reactor)
    if endpoint is None:
        endpoint = make_endpoint(
            reactor,
            upstream,
            connect_timeout=config.upstream_connect_timeout,
            trust=trust,
            proxy=proxy,
            sends=sends,
        )
    pool = UpstreamPool(
        endpoint,
        reactor,
        tls=upstream.scheme == "https",
        connect_timeout=config.upstream_connect_timeout,
        idle_timeout=config.upstream_idle_timeout,
        sends=sends,
    )
    return Upstream(
        config=upstream,
        pool=pool,
        endpoint=endpoint,
        token=token,
        host_header=_netloc(upstream),
        base_path=upstream.base_path.encode(),
        tenant=None if upstream.tenant is None else upstream.tenant.encode(),
        proxy=proxy,
    )


def _netloc(upstream: UpstreamConfig) -> bytes:
    """``Host`` as the upstream expects it: IDNA host, port only when not default."""
    if isIPv6Address(upstream.host):
        host = b"[" + upstream.host.encode() + b"]"
    else:
        host = upstream.host.encode("idna")
    default_port = 443 if upstream.scheme == "https" else 80
    return host if upstream.port == default_port else b"%s:%d" % (host, upstream.port)


__all__ = ["Upstream", "build_upstream", "load_pem_bundle", "trust_root"]
