"""The real data plane in memory: a `ProxyFactory` on `MemoryReactorClock`,
clients and upstream connections on `StringTransport`s, so framing, pool and
timer rules run without sockets (as treq's `RequestTraversalAgent` does)."""

from __future__ import annotations

import socket
from typing import Any

import httptools
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http_headers import Headers
from zope.interface import implementer

from lgmt_proxy.config.settings import parse_config
from lgmt_proxy.config.tokens import token_source
from lgmt_proxy.obs.metrics import ProxyMetrics
from lgmt_proxy.obs.ops import Readiness
from lgmt_proxy.service import build_proxy_factory

from .helpers import ORG, env_for

UPSTREAM_ADDRESS = IPv4Address("TCP", "192.0.2.10", 443)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects each protocol to a fresh `StringTransport`. With
    ``handshake=True`` the TLS handshake completes at once (the endpoint
    stands for TCP and TLS); with ``hold=True`` connecting never finishes."""

    def __init__(self, *, handshake: bool = True, hold: bool = False) -> None:
        self.handshake = handshake
        self.hold = hold
        self.connections: list[tuple[Any, StringTransport]] = []
        self.pending: list[Deferred[Any]] = []
        self._held: list[Any] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.hold:
            d: Deferred[Any] = Deferred(self._cancel)
            self.pending.append(d)
            self._held.append(factory)
            return d
        return succeed(self._connected(factory))

    def release(self) -> StringTransport:
        """Complete the oldest held connect; its transport."""
        d, factory = self.pending.pop(0), self._held.pop(0)
        proto = self._connected(factory)
        d.callback(proto)
        return self.connections[-1][1]

    def _connected(self, factory: Any) -> Any:
        proto = factory.buildProtocol(UPSTREAM_ADDRESS)
        transport = StringTransport(peerAddress=UPSTREAM_ADDRESS)
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        if self.handshake and IHandshakeListener.providedBy(proto):
            proto.handshakeCompleted()
        return proto

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled += 1


class _Sent:
    """Parses what the proxy wrote on one upstream connection."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)
        self.method = b""
        self._url = b""
        self._headers = Headers()
        self._body = b""
        self._open = False

    def on_message_begin(self) -> None:
        self._open = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._open = False
        self.requests.append((self.method, self._url, self._headers, self._body))
        self._url, self._headers, self._body = b"", Headers(), b""


def sent_requests(raw: bytes) -> list[tuple[bytes, bytes, Headers, bytes]]:
    """The requests in ``raw``: complete ones, and a last one whose head is
    complete but whose body is not (yet)."""
    sink = _Sent()
    try:
        sink.parser.feed_data(raw)
    except httptools.HttpParserError:
        pass
    requests = list(sink.requests)
    if sink._open and sink.method:
        requests.append((sink.method, sink._url, sink._headers, sink._body))
    return requests


class MemoryProxy:
    """The real factory, resource tree, exchange and pool, in memory."""

    def __init__(self, **extra: str) -> None:
        self.clock = MemoryReactorClock()
        env = env_for("https://upstream.example", **extra)
        for signal in ORG:
            env[f"GRAFANA_CLOUD_{signal.upper()}_URL"] = f"https://{signal}.example"
        config = parse_config(env)
        assert config.token is not None
        self.registry = CollectorRegistry()
        self.endpoints = {name: MemoryEndpoint() for name in ORG}
        self.factory, self.upstreams = build_proxy_factory(
            config,
            self.clock,
            token=token_source(config.token, None),
            registry=self.registry,
            readiness=Readiness(),
            metrics=ProxyMetrics(self.registry, process_collectors=False),
            endpoints=self.endpoints,
        )

    def connect(self) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", "10.1.2.3", 4321)
        transport = StringTransport(peerAddress=address)
        proto = self.factory.buildProtocol(address)
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes) -> tuple[Any, StringTransport]:
        proto, transport = self.connect()
        proto.dataReceived(data)
        return proto, transport

    def upstream(self, name: str, index: int = -1) -> tuple[Any, StringTransport]:
        """An upstream connection opened for ``name`` (the last by default)."""
        return self.endpoints[name].connections[index]

    def calls(self) -> list[tuple[str, bytes, bytes, Headers]]:
        """Every request head sent upstream: signal, method, target, headers."""
        out = []
        for name, endpoint in self.endpoints.items():
            for _proto, transport in endpoint.connections:
                for method, target, headers, _body in sent_requests(transport.value()):
                    out.append((name, method, target, headers))
        return out

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def small_socket_pair(case: Any) -> tuple[socket.socket, socket.socket]:
    """A connected, non-blocking pair (ours, the peer's) with small kernel
    buffers, so a backlog builds with little data; closed after ``case``."""
    ours, peer = socket.socketpair()
    for s in (ours, peer):
        s.setblocking(False)
        case.addCleanup(s.close)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return ours, peer
