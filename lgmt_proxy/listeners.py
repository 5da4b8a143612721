"""The listeners: endpoint descriptions bound so that closing one answers
the connections the kernel had already queued instead of resetting them
(issue 20). Nothing here reads the environment; the reactor is passed in."""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="lgmt_proxy.service")


#: At most this many queued connections are taken over when a listener
#: closes: twice Linux's default cap on an accept queue (net.core.somaxconn,
#: 4096), so a flood of connects cannot hold the reactor in the loop.
ACCEPT_AT_CLOSE = 8192


class BadEndpoint(ValueError):
    """An endpoint description Twisted cannot parse, with the option or
    variable it came from (what the start-up error names)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option


class HeldSockets:
    """The reactor a `Listener`'s endpoint listens with. A TCP listening
    socket is bound here and lent to the reactor (`adoptStreamPort` takes
    its own copy), so it stays ours: stopping the port closes the reactor's
    copy only. A port from the reactor's own ``listenTCP`` shuts its socket
    down when it stops, which resets every connection in the accept queue.
    Anything else (``unix:``, ``ssl:``, a memory reactor in tests) goes to
    the reactor as it is."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        #: The socket under each port listenTCP returned, by the port's id.
        self.held: dict[int, socket.socket] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if not isinstance(self.reactor, PosixReactorBase):  # no real sockets to hold
            return self.reactor.listenTCP(port, factory, backlog, interface)
        family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
            address: Any = (interface, port)
            try:
                if family == socket.AF_INET6:  # the scope id of fe80::1%eth0, as Twisted does
                    address = socket.getaddrinfo(
                        interface, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
                    )[0][4]
                sock.bind(address)
            except OSError as e:
                raise CannotListenError(interface, port, e) from None
            sock.listen(backlog)
            sock.setblocking(False)
            listening = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except BaseException:
            sock.close()
            raise
        self.held[id(listening)] = sock
        return listening


class Listener(Service):
    """Listens on an endpoint description while running. Unlike Twisted's
    `StreamServerEndpointService`, a port that cannot be bound raises
    `CannotListenError` out of ``privilegedStartService`` (twistd binds
    there), so the service can print one plain line and exit 1. Stopping
    it answers what the kernel had already queued (`close_listening`)."""

    def __init__(self, description: str, factory: Any, reactor: Any, *, option: str) -> None:
        """``option``: where ``description`` came from (``--listen``...)."""
        self.sockets = HeldSockets(reactor)
        try:
            self.endpoint = serverFromString(self.sockets, description)
        except ValueError as e:
            raise BadEndpoint(option, str(e)) from None
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self.port is not None:
            return
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        if outcome:
            self.port = outcome[0]

    @property
    def address(self) -> str:
        """Where the port is bound (port 0 resolved): a URL for TCP."""
        host = self.port.getHost()
        if isinstance(host, IPv6Address):
            return f"http://[{host.host}]:{host.port}"
        if isinstance(host, IPv4Address):
            return f"http://{host.host}:{host.port}"
        return str(host)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        held = self.sockets.held.pop(id(port), None)
        return Deferred.fromCoroutine(close_listening(port, held, self.factory, self.reactor))


async def close_listening(
    port: Any, held: socket.socket | None, factory: Any, reactor: Any
) -> None:
    """Stop listening without resetting a connection the kernel completed.

    Closing a listening socket resets every connection still in its accept
    queue, and their clients may have sent a request already (a POST they
    must not retry: a reset cannot be told from a request lost mid-way). So
    the reactor stops reading the port and closes its copy of the socket
    (a reactor turn later), while ``held`` keeps it listening; then
    everything queued is accepted and handed to the reactor with ``factory``
    (MAX_CONNECTIONS applies as to any connection), and ``held`` is closed
    in the same turn. Only connects after that are refused, which a client
    can safely retry elsewhere. Without a held socket, just stop."""
    if held is None:
        await maybeDeferred(port.stopListening)  # None if it was not listening
        return
    try:
        await maybeDeferred(port.stopListening)
        adopted = adopt_queued(held, factory, reactor)
    finally:
        held.close()
    if adopted:
        _log.info("listener closed: {n} queued connections taken over", n=adopted)


def adopt_queued(
    listening: socket.socket, factory: Any, reactor: Any, limit: int = ACCEPT_AT_CLOSE
) -> int:
    """Accept every connection queued on ``listening`` (until it would
    block) and give each to the reactor. Returns how many were taken."""
    listening.setblocking(False)
    adopted = 0
    for _ in range(limit):
        try:
            conn, _address = listening.accept()
        except BlockingIOError:
            break
        except ConnectionAbortedError:
            continue  # the client gave up while queued
        except OSError as e:  # out of descriptors: what is left is reset
            _log.warn("listener closed: cannot accept queued connections: {e}", e=e.strerror)
            break
        with conn:  # the reactor holds its own duplicate
            conn.setblocking(False)
            reactor.adoptStreamConnection(conn.fileno(), conn.family, factory)
        adopted += 1
    return adopted
