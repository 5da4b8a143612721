"""The OTLP/gRPC listener under TLS (OTLP_GRPC_TLS_CERT_FILE and _KEY_FILE)
on loopback, with the `h2` library over Twisted's TLS as the client: a call
through a certificate signed by the test's own CA, ALPN ``h2`` required
(a client offering only ``http/1.1`` fails the handshake, one offering
nothing is closed with no HTTP/2 byte sent), and a handshake that never
comes is cut after CLIENT_HEADER_TIMEOUT_SECONDS. grpcio and the
OpenTelemetry SDK over TLS are in tests/e2e/test_grpc.py."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import protocol, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.servertls import ServerTLS, load_server_tls
from lgmt_proxy.dataplane.grpc_server import GrpcFactory, GrpcTLSFactory
from lgmt_proxy.tap import load
from tests.loopback.test_grpc import H2Client
from tests.loopback.test_tls import make_ca, make_leaf, pem
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


def write_tls_files(where: str, host: str = "localhost") -> tuple[str, str, bytes]:
    """A CA, a certificate for ``host`` signed by it (with the CA after it
    in the chain file) and its key, in ``where``: the cert file, key file
    and the CA's PEM."""
    os.makedirs(where, exist_ok=True)
    ca_key, ca = make_ca("lgmt-grpc-test-ca")
    key_pem, cert_pem = make_leaf(ca_key, ca, host)
    cert_file = os.path.join(where, "tls.crt")
    key_file = os.path.join(where, "tls.key")
    with open(cert_file, "wb") as f:
        f.write(cert_pem + pem(ca))
    with open(key_file, "wb") as f:
        f.write(key_pem)
    return cert_file, key_file, pem(ca)


class Silent(protocol.Protocol):
    """Records what it receives and when the connection ends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.reason: Any = None
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.closed.callback(None)


def _abort(client: protocol.Protocol) -> None:
    if isinstance(client, Silent) and client.closed.called:
        return
    client.transport.abortConnection()  # type: ignore[union-attr]


class GrpcTLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.up = Recorder()
        self.up.headers = [(b"Content-Type", b"application/x-protobuf")]
        self.up.body = b"\x0a\x02\x08\x01"
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        cert_file, key_file, self.ca_pem = write_tls_files(self.mktemp())
        tls, problems = load_server_tls(cert_file, key_file)
        assert tls is not None, problems
        self.start_proxy(f"http://127.0.0.1:{port.getHost().port}", tls)

    def start_proxy(self, upstream_url: str, tls: ServerTLS, **env: str) -> None:
        proxy = self.proxy = ProxyFixture(env_for(upstream_url, **env))
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        self.grpc = GrpcFactory(proxy.factory)
        port = listen(GrpcTLSFactory(self.grpc, tls.options, reactor))
        self.port = port.getHost().port
        self.addCleanup(self._close, port)

    async def _close(self, port: Any) -> None:
        await port.stopListening()
        for connection in list(self.grpc.connections):
            connection.close_now()

    async def connect(self, client: protocol.Protocol, alpn: list[bytes] | None) -> Any:
        options = ssl.optionsForClientTLS(
            "localhost",
            trustRoot=ssl.Certificate.loadPEM(self.ca_pem),
            acceptableProtocols=alpn,
        )
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        connected = await connectProtocol(endpoint, client)
        self.addCleanup(_abort, client)
        return connected

    async def test_call_over_tls(self) -> None:
        client = H2Client()
        await self.connect(client, [b"h2"])
        message = os.urandom(100_000)  # past one window
        call = await client.unary(message)
        self.assertEqual(call.status, 0, call)
        self.assertEqual(call.message, self.up.body)
        self.assertEqual(client.transport.negotiatedProtocol, b"h2")  # type: ignore[union-attr]
        seen = self.up.seen[-1]
        self.assertEqual((seen.method, seen.uri, seen.body), (b"POST", b"/otlp/v1/traces", message))
        self.assertEqual(seen.header(b"Authorization"), [basic(ORG["otlp"])])
        # A second call on the same TLS connection.
        self.assertEqual((await client.unary(b"again")).status, 0)
        self.assertEqual(len(self.up.seen), 2)

    async def test_other_protocol_fails_the_handshake(self) -> None:
        client = Silent()
        await self.connect(client, [b"http/1.1"])
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[union-attr]
        await client.closed
        self.assertEqual(bytes(client.received), b"")
        # RFC 7301's alert, not a generic handshake failure.
        self.assertIn("no application protocol", repr(client.reason.value))
        self.assertEqual(self.up.seen, [])

    async def test_no_alpn_closed_without_http2(self) -> None:
        client = Silent()
        await self.connect(client, None)
        await client.closed
        self.assertEqual(bytes(client.received), b"")  # not even SETTINGS
        while self.grpc.connections:
            await sleep(0.01)

    async def test_handshake_never_sent_is_cut(self) -> None:
        self.proxy.factory.client_header_timeout = 0.3
        client = Silent()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(_abort, client)
        await client.closed
        self.assertEqual(bytes(client.received), b"")


class TLSConfigTests(TestCase):
    """What `tap.load` makes of the two variables and their files."""

    def env(self, upstream: str = "http://127.0.0.1:9", **extra: str) -> dict[str, str]:
        return env_for(upstream, OTLP_GRPC_LISTEN="tcp:4317:interface=127.0.0.1", **extra)

    def test_loaded_once(self) -> None:
        cert_file, key_file, _ = write_tls_files(self.mktemp())
        config, *_ = load(
            self.env(OTLP_GRPC_TLS_CERT_FILE=cert_file, OTLP_GRPC_TLS_KEY_FILE=key_file)
        )
        tls = config.otlp_grpc_tls
        assert tls is not None
        self.assertEqual(tls.subject, "CN=localhost")
        self.assertNotIn("PRIVATE", repr(config))

    def test_problems_name_the_variable_never_the_key(self) -> None:
        from lgmt_proxy.config.settings import ConfigError

        where = self.mktemp()
        cert_file, key_file, _ = write_tls_files(where)
        _, other_key, _ = write_tls_files(where + "-other")
        cases = {
            "OTLP_GRPC_TLS_CERT_FILE: ": (key_file, key_file),  # a key is no certificate
            "OTLP_GRPC_TLS_KEY_FILE: ": (cert_file, cert_file),
            "does not match": (cert_file, other_key),
            "cannot read": (cert_file, where + "/missing.key"),
        }
        with open(key_file, "rb") as f:
            key_text = f.read().decode()
        for expected, (cert, key) in cases.items():
            with self.assertRaises(ConfigError) as caught:
                load(self.env(OTLP_GRPC_TLS_CERT_FILE=cert, OTLP_GRPC_TLS_KEY_FILE=key))
            text = "\n".join(caught.exception.problems)
            self.assertIn(expected, text)
            self.assertEqual(len(caught.exception.problems), 1, text)
            self.assertNotIn(key_text.splitlines()[1], text)
        # Both wrong: one line for each.
        with self.assertRaises(ConfigError) as caught:
            load(self.env(OTLP_GRPC_TLS_CERT_FILE=key_file, OTLP_GRPC_TLS_KEY_FILE=cert_file))
        self.assertEqual(
            [line.split(":")[0] for line in caught.exception.problems],
            ["OTLP_GRPC_TLS_CERT_FILE", "OTLP_GRPC_TLS_KEY_FILE"],
        )
