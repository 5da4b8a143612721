"""Upstream TLS: verified against the system roots plus UPSTREAM_CA_FILE."""

from __future__ import annotations

import datetime
import ipaddress
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane.upstream import load_pem_bundle, trust_root
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    call,
    env_for,
    json_body,
    raw_request,
    status_of,
    upstream_site,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, host: str, *, ip: str | None = None
) -> tuple[bytes, bytes]:
    """A certificate for ``host`` (and for the address ``ip``, if given)."""
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    if ip is not None:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class TLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.ca_key, self.ca = make_ca("lgmt-proxy test CA")
        key_pem, cert_pem = make_leaf(self.ca_key, self.ca, "localhost")
        server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        self.recorder = Recorder()
        self.port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, upstream_site(self.recorder), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        self.env = env_for(f"https://localhost:{self.port.getHost().port}")

    def proxy(self, trust: object = None) -> ProxyFixture:
        fixture = ProxyFixture(self.env, trust=trust)
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        return fixture

    async def test_unknown_ca_refused_502(self) -> None:
        proxy = self.proxy()
        response, body = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["upstream"], "loki")
        self.assertEqual(self.recorder.seen, [])
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="tls"), 1
        )

    async def test_ca_file_trusted_every_certificate(self) -> None:
        _, other = make_ca("some other CA")
        bundle = pem(other) + pem(self.ca)  # ours is second: every certificate counts
        self.assertEqual(len(load_pem_bundle(bundle)), 2)
        proxy = self.proxy(trust_root(bundle))
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.recorder.seen[-1].header(b"authorization"), [basic(ORG["loki"])])
        # The TLS connection's records went out on our own write path.
        (pooled,) = proxy.upstreams["loki"].pool.idle
        assert pooled.sender is not None
        self.assertTrue(pooled.sender.direct and pooled.sender.tls, pooled.sender)

    async def test_hostname_checked(self) -> None:
        key_pem, cert_pem = make_leaf(self.ca_key, self.ca, "not-localhost.example")
        server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, upstream_site(self.recorder), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.env = env_for(f"https://localhost:{port.getHost().port}")
        proxy = self.proxy(trust_root(pem(self.ca)))
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 502)
        self.assertEqual(self.recorder.seen, [])
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="tls"), 1
        )

    async def test_address_checked_against_the_certificates_addresses(self) -> None:
        # An upstream URL with an IP address: the certificate must name that
        # address (an IP SAN), not merely be signed by a trusted CA.
        key_pem, cert_pem = make_leaf(self.ca_key, self.ca, "localhost", ip="127.0.0.1")
        server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, upstream_site(self.recorder), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.env = env_for(f"https://127.0.0.1:{port.getHost().port}")
        proxy = self.proxy(trust_root(pem(self.ca)))
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 200)
        # The same certificate for another address of this host: refused.
        other = reactor.listenSSL(  # type: ignore[attr-defined]
            0, upstream_site(self.recorder), server.options(), interface="127.0.0.2"
        )
        self.addCleanup(other.stopListening)
        self.env = env_for(f"https://127.0.0.2:{other.getHost().port}")
        seen = len(self.recorder.seen)
        proxy = self.proxy(trust_root(pem(self.ca)))
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 502)
        self.assertEqual(len(self.recorder.seen), seen)
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="tls"), 1
        )

    def test_bundle_without_certificates(self) -> None:
        self.assertRaises(ValueError, load_pem_bundle, b"not a pem")


class HandshakeTimeoutTests(TestCase):
    timeout = 30

    async def test_stalled_handshake_is_a_connect_timeout(self) -> None:
        from twisted.internet import protocol

        silent = protocol.Factory.forProtocol(protocol.Protocol)  # accepts, never speaks TLS
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        env = env_for(
            f"https://localhost:{port.getHost().port}",
            UPSTREAM_CONNECT_TIMEOUT_SECONDS="0.5",
            UPSTREAM_TIMEOUT_SECONDS="20",
        )
        proxy = ProxyFixture(env)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, body = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 504)
        # The connect deadline's answer, not the response timeout's (which
        # would come 20 s on): the handshake counts as connecting.
        self.assertEqual(
            json.loads(body)["error"], "upstream connection not established in time", body
        )
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="timeout"), 1
        )

    async def test_stalled_websocket_handshake_is_a_connect_timeout(self) -> None:
        # A WebSocket tunnel's TLS handshake runs under the connect deadline
        # too, not under the upstream timeout (20 s here) its HTTP answer gets.
        from twisted.internet import protocol

        silent = protocol.Factory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        env = env_for(
            f"https://localhost:{port.getHost().port}",
            UPSTREAM_CONNECT_TIMEOUT_SECONDS="0.5",
            UPSTREAM_TIMEOUT_SECONDS="20",
        )
        proxy = ProxyFixture(env)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        raw = await raw_request(
            proxy.port.getHost().port,
            b"GET /loki/api/v1/tail HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            timeout=10,
        )
        self.assertEqual(status_of(raw), 504, raw[:200])
        self.assertEqual(json_body(raw)["error"], "upstream connection not established in time")
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="timeout"), 1
        )

    async def test_websocket_to_an_unverified_upstream_is_a_tls_failure(self) -> None:
        ca_key, ca = make_ca("some CA nobody trusts")
        key_pem, cert_pem = make_leaf(ca_key, ca, "localhost")
        server = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        recorder = Recorder()
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, upstream_site(recorder), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        proxy = ProxyFixture(env_for(f"https://localhost:{port.getHost().port}"))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        raw = await raw_request(
            proxy.port.getHost().port,
            b"GET /loki/api/v1/tail HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            timeout=10,
        )
        self.assertEqual(status_of(raw), 502, raw[:200])
        self.assertEqual(json_body(raw)["error"], "upstream TLS verification failed")
        self.assertEqual(recorder.seen, [])


class _Splice(protocol.Protocol):
    """The forward proxy's side towards the upstream."""

    def __init__(self, front: _HTTPSForwardProxy) -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.front.transport.loseConnection()  # type: ignore[union-attr]


class _HTTPSForwardProxy(protocol.Protocol):
    """An ``https://`` forward proxy: TLS from lgmt-proxy, ``CONNECT``, then a
    splice to 127.0.0.1 at the port asked for (it resolves every name)."""

    def connectionMade(self) -> None:
        self.head = b""
        self.back: _Splice | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.back is not None:
            self.back.transport.write(data)  # type: ignore[union-attr]
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        line = self.head.split(b"\r\n", 1)[0]
        self.factory.connects.append(line)  # type: ignore[attr-defined]
        port = int(line.split(b" ")[1].rsplit(b":", 1)[1])
        back = _Splice(self)
        connecting = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), back)
        connecting.addCallback(self._connected)

    def _connected(self, back: _Splice) -> None:
        self.back = back
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self.back is not None:
            self.back.transport.loseConnection()  # type: ignore[union-attr]


class HTTPSForwardProxyTests(TestCase):
    timeout = 30

    async def test_tls_inside_tls_through_an_https_forward_proxy(self) -> None:
        # TLS to the proxy, CONNECT, then TLS to the upstream inside it,
        # verified against the upstream's own name (written through: no
        # socket under the inner TLS layer).
        ca_key, ca = make_ca("lgmt-proxy test CA")
        upstream_key, upstream_cert = make_leaf(ca_key, ca, "upstream.lgmt-tls.test")
        proxy_key, proxy_cert = make_leaf(ca_key, ca, "localhost")
        recorder = Recorder()
        upstream = reactor.listenSSL(  # type: ignore[attr-defined]
            0,
            upstream_site(recorder),
            ssl.PrivateCertificate.loadPEM(upstream_key + upstream_cert).options(),
            interface="127.0.0.1",
        )
        self.addCleanup(upstream.stopListening)
        front = protocol.Factory.forProtocol(_HTTPSForwardProxy)
        front.connects = []  # type: ignore[attr-defined]
        forward = reactor.listenSSL(  # type: ignore[attr-defined]
            0,
            front,
            ssl.PrivateCertificate.loadPEM(proxy_key + proxy_cert).options(),
            interface="127.0.0.1",
        )
        self.addCleanup(forward.stopListening)
        url = f"https://upstream.lgmt-tls.test:{upstream.getHost().port}"
        proxy = ProxyFixture(
            env_for(url, HTTPS_PROXY=f"https://localhost:{forward.getHost().port}"),
            trust=trust_root(pem(ca)),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        response, _ = await call(proxy.url + "/loki/api/v1/labels")
        self.assertEqual(response.code, 200)
        response, _ = await call(proxy.url + "/loki/api/v1/push", b"POST", body=b"x" * 300_000)
        self.assertEqual(response.code, 200)
        self.assertEqual(recorder.seen[-1].body, b"x" * 300_000)
        self.assertEqual(
            front.connects,  # type: ignore[attr-defined]
            [b"CONNECT upstream.lgmt-tls.test:%d HTTP/1.1" % upstream.getHost().port],
        )
