"""Connections through an HTTP forward proxy: ``CONNECT host:port``, then the
caller's protocol (TLS to the upstream, usually) runs over the tunnel.

`ConnectEndpoint` is an ordinary client endpoint, so everything above it is
unchanged: ``WireTLSEndpoint(reactor, creator, ConnectEndpoint(...), sends)`` runs
TLS, verified against the upstream's own name (SNI), inside the tunnel; the
pool's one connect deadline covers the TCP connect to the proxy, the CONNECT
answer and the TLS handshake, because cancelling the endpoint's Deferred
aborts whatever stage it is in. The upstream's host name goes to the proxy
as written: the proxy resolves it, we never do.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from lgmt_proxy.config.settings import Secret

#: The most of a CONNECT answer's head we read (proxies answer in a few
#: hundred bytes; a 407 page may come with a body, which we never read).
MAX_ANSWER_HEAD = 16384
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: |\r\n)")


class ProxyRefused(ConnectError):
    """The forward proxy answered CONNECT with something other than 2xx
    (407: credentials missing or wrong; 403: not allowed; 502/503: it could
    not reach the upstream). ``status`` is its status, 0 for an answer that
    is not HTTP."""

    def __init__(self, status: int) -> None:
        self.status = status
        #: What `errors.classify` looks for (rules/ imports nothing of the data plane).
        self.proxy_status = status
        super().__init__(string=f"forward proxy answered CONNECT with {status or 'no HTTP'}")


def connect_request(host: str, port: int, authorization: Secret | None) -> bytes:
    """The CONNECT request for ``host:port`` (a v6 address in brackets)."""
    authority = (f"[{host}]" if ":" in host else host).encode("idna") + b":%d" % port
    lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
    if authorization is not None:
        lines.append(b"Proxy-Authorization: " + authorization.reveal().encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer_status(head: bytes) -> int:
    """The status of a CONNECT answer's head, 0 if it is not HTTP/1.x."""
    match = _STATUS_LINE.match(head)
    return int(match.group(1)) if match else 0


class _Tunnel(Protocol):
    """Speaks to the proxy until it says 200, then hands every byte to the
    caller's protocol, which writes to the proxy connection's transport
    itself (no extra layer on the write path)."""

    def __init__(
        self, factory: IProtocolFactory, request: bytes, ready: Deferred[IProtocol]
    ) -> None:
        self._factory = factory
        self._request = request
        self._ready: Deferred[IProtocol] | None = ready
        self._head = b""
        self.inner: IProtocol | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_ANSWER_HEAD:
                self._refuse(ProxyRefused(0))
            return
        status = answer_status(self._head)
        if not 200 <= status < 300:
            self._refuse(ProxyRefused(status))
            return
        rest = self._head[end + 4 :]
        self._head = b""
        self._switch(rest)

    def _switch(self, rest: bytes) -> None:
        assert self.transport is not None
        inner = self._factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._refuse(ConnectError(string="the protocol factory built nothing"))
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _refuse(self, error: Exception) -> None:
        ready, self._ready = self._ready, None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if ready is not None:
            ready.errback(Failure(error))

    def abort(self) -> None:
        """The connect attempt was cancelled while the proxy had not answered."""
        self._ready = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connectionLost(reason)
            return
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.errback(Failure(ConnectError(string="forward proxy closed before answering")))


class _TunnelFactory:
    """One `_Tunnel` for one connect attempt."""

    def __init__(self, tunnel: _Tunnel) -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr: IAddress) -> _Tunnel:
        return self.tunnel

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


@implementer(IStreamClientEndpoint)
class ConnectEndpoint:
    """An endpoint to ``host:port`` through the forward proxy at ``proxy``
    (a TCP endpoint, or TLS to an ``https://`` proxy)."""

    def __init__(
        self,
        proxy: IStreamClientEndpoint,
        host: str,
        port: int,
        authorization: Secret | None = None,
    ) -> None:
        self._proxy = proxy
        self._request = connect_request(host, port, authorization)

    def __repr__(self) -> str:
        return f"<ConnectEndpoint {self._request.split(b' ', 2)[1].decode()!s}>"

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting: Deferred[Any] | None = None
        tunnel: _Tunnel | None = None

        def cancel(_: Deferred[IProtocol]) -> None:
            if connecting is not None and not connecting.called:
                connecting.cancel()
            elif tunnel is not None:
                tunnel.abort()

        ready: Deferred[IProtocol] = Deferred(cancel)
        tunnel = _Tunnel(factory, self._request, ready)
        connecting = self._proxy.connect(_TunnelFactory(tunnel))  # type: ignore[arg-type]

        def connect_failed(failure: Failure) -> None:
            if not ready.called:
                ready.errback(failure)

        connecting.addErrback(connect_failed)
        return ready
