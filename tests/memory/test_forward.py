"""The CONNECT state machine of `ConnectEndpoint`, in memory: what goes to
the forward proxy, and what each kind of answer, or silence, becomes."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lgmt_proxy.config.settings import Secret
from lgmt_proxy.dataplane.forward import ConnectEndpoint, ProxyRefused, connect_request

PROXY = IPv4Address("TCP", "192.0.2.20", 3128)


@implementer(IStreamClientEndpoint)
class ProxySide:
    """Stands for the TCP connection to the proxy: connecting completes
    when the test says so (or fails, or is cancelled)."""

    def __init__(self) -> None:
        self.pending: Deferred[Any] | None = None
        self.factory: Any = None
        self.transport = StringTransport(peerAddress=PROXY)
        self.protocol: Any = None
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factory = factory

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True

        self.pending = Deferred(cancel)
        return self.pending

    def connected(self) -> None:
        self.protocol = self.factory.buildProtocol(PROXY)
        self.protocol.makeConnection(self.transport)
        assert self.pending is not None
        self.pending.callback(self.protocol)


class Upstream(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET / HTTP/1.1\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class ConnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = ProxySide()
        self.upstream = Upstream()
        auth = Secret(value="Basic " + base64.b64encode(b"u:p").decode())
        self.endpoint = ConnectEndpoint(self.proxy, "prometheus.grafana.net", 443, auth)
        self.result = self.endpoint.connect(Factory.forProtocol(lambda: self.upstream))

    def test_connect_request_names_the_upstream_and_carries_the_credentials(self) -> None:
        self.proxy.connected()
        sent = self.proxy.transport.value()
        self.assertEqual(
            sent,
            b"CONNECT prometheus.grafana.net:443 HTTP/1.1\r\n"
            b"Host: prometheus.grafana.net:443\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n\r\n",
        )
        self.assertNoResult(self.result)

    def test_v6_target_in_brackets_and_no_credentials(self) -> None:
        self.assertEqual(
            connect_request("fd00::1", 8443, None),
            b"CONNECT [fd00::1]:8443 HTTP/1.1\r\nHost: [fd00::1]:8443\r\n\r\n",
        )

    def test_200_hands_the_connection_to_the_upstream_protocol(self) -> None:
        self.proxy.connected()
        self.proxy.transport.clear()
        # The answer arrives in pieces, with the upstream's first bytes after it.
        self.proxy.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n")
        self.assertNoResult(self.result)
        self.proxy.protocol.dataReceived(b"Proxy-Agent: squid\r\n\r\nHTTP/1.1 204 ")
        self.assertIs(self.successResultOf(self.result), self.upstream)
        # It writes straight to the proxy connection and gets every later byte.
        self.assertEqual(self.proxy.transport.value(), b"GET / HTTP/1.1\r\n\r\n")
        self.proxy.protocol.dataReceived(b"No Content\r\n\r\n")
        self.assertEqual(self.upstream.received, b"HTTP/1.1 204 No Content\r\n\r\n")
        self.proxy.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertIsNotNone(self.upstream.lost)

    def test_refusals_fail_with_the_proxy_status_and_abort(self) -> None:
        for status in (407, 403, 502):
            proxy, upstream = ProxySide(), Upstream()
            factory = Factory.forProtocol(Upstream)
            factory.buildProtocol = lambda addr, u=upstream: u  # type: ignore[method-assign]
            result = ConnectEndpoint(proxy, "h", 443).connect(factory)
            proxy.connected()
            proxy.protocol.dataReceived(
                b"HTTP/1.1 %d No\r\nContent-Length: 5\r\n\r\nnope!" % status
            )
            failure = self.failureResultOf(result, ProxyRefused)
            self.assertEqual(failure.value.status, status)
            self.assertTrue(proxy.transport.disconnecting)
            self.assertEqual(upstream.received, b"")

    def test_not_http_or_endless_head_is_refused(self) -> None:
        self.proxy.connected()
        self.proxy.protocol.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertEqual(self.failureResultOf(self.result, ProxyRefused).value.status, 0)
        proxy = ProxySide()
        result = ConnectEndpoint(proxy, "h", 443).connect(Factory.forProtocol(Upstream))
        proxy.connected()
        proxy.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)
        self.failureResultOf(result, ProxyRefused)

    def test_proxy_closing_before_answering_fails_the_connect(self) -> None:
        self.proxy.connected()
        self.proxy.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.failureResultOf(self.result)
        self.assertIsNone(self.upstream.lost)

    def test_proxy_down_is_a_connect_failure(self) -> None:
        assert self.proxy.pending is not None
        self.proxy.pending.errback(ConnectionRefusedError())
        self.failureResultOf(self.result, ConnectionRefusedError)

    def test_cancel_while_connecting_to_the_proxy(self) -> None:
        self.result.cancel()
        self.assertTrue(self.proxy.cancelled)
        self.failureResultOf(self.result)

    def test_cancel_while_waiting_for_the_answer_aborts(self) -> None:
        self.proxy.connected()
        self.result.cancel()
        self.failureResultOf(self.result, CancelledError)
        self.assertTrue(self.proxy.transport.disconnecting)
        # A late answer changes nothing.
        self.proxy.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.upstream.received, b"")

    def test_repr_names_the_target_not_the_credentials(self) -> None:
        self.assertEqual(repr(self.endpoint), "<ConnectEndpoint prometheus.grafana.net:443>")
