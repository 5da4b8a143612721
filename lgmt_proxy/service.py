"""The service twistd runs: listeners, the token watcher, startup lines and
the graceful drain, built from a validated `Config` and an injected reactor."""

from __future__ import annotations

import gc
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from OpenSSL.crypto import X509
from prometheus_client import CollectorRegistry
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.web.server import Site

from lgmt_proxy.announce import log_upstreams
from lgmt_proxy.config.clientauth import ClientAuth, load_client_auth
from lgmt_proxy.config.routesfile import RouteSpec
from lgmt_proxy.config.settings import Config, Secret
from lgmt_proxy.config.tokens import token_source
from lgmt_proxy.config.watch import WatchedFile
from lgmt_proxy.dataplane.drain import drain_connections
from lgmt_proxy.dataplane.grpc_server import GrpcFactory, GrpcTLSFactory
from lgmt_proxy.dataplane.resources import build_root
from lgmt_proxy.dataplane.server import ProxyFactory
from lgmt_proxy.dataplane.upstream import Upstream, build_upstream
from lgmt_proxy.io.sending import SendQueue
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.resp import RedisPool
from lgmt_proxy.limits.shared import build_shared
from lgmt_proxy.listeners import Listener
from lgmt_proxy.obs.budgets import BudgetSeries
from lgmt_proxy.obs.logs import StreamObserver, make_observer
from lgmt_proxy.obs.metrics import ProxyMetrics
from lgmt_proxy.obs.ops import Readiness, admin_root, ops_resources
from lgmt_proxy.obs.record import Recorder
from lgmt_proxy.rules.policy import Policy
from lgmt_proxy.rules.routes import DEFAULT_ROUTES, Route

_log = Logger(namespace="lgmt_proxy")

#: How often the token and client auth files are checked for changes.
WATCH_SECONDS = 1.0


def build_budgets(
    config: Config, reactor: Any, metrics: ProxyMetrics, trust: Sequence[X509] | None = None
) -> tuple[BudgetKeeper, RedisPool | None]:
    """Consumers' budgets: this replica's own, or shared through the Redis of
    RATE_LIMIT_REDIS_URL with this replica's as fall back (the pool is
    started and stopped with the service)."""
    local = LocalLimiter(reactor)
    settings = config.rate_limit_redis
    if settings is None:
        return BudgetKeeper(local), None
    shared, pool = build_shared(reactor, settings, local, metrics, trust=trust)
    return BudgetKeeper(local, shared), pool


def build_proxy_factory(
    config: Config,
    reactor: Any,
    *,
    token: Callable[[], Secret] | None,
    registry: CollectorRegistry,
    readiness: Readiness,
    metrics: ProxyMetrics,
    trust: Sequence[X509] | None = None,
    client_auth: Callable[[], ClientAuth] | None = None,
    routes: list[tuple[RouteSpec, Callable[[], Secret] | None]] | None = None,
    access_sink: StreamObserver | None = None,
    endpoints: Mapping[str, Any] | None = None,
    log_quiet: bool = False,
    access_log: bool = True,
    budgets: BudgetKeeper | None = None,
) -> tuple[ProxyFactory, dict[str, Upstream]]:
    """The main listener's `ProxyFactory` and its upstreams: everything but
    the listeners.

    ``routes`` (from ROUTES_FILE, each with its token source) replaces the
    built-in table of Grafana Cloud signals. ``endpoints`` replaces the
    endpoints the URLs name, by upstream (in-memory tests)."""
    endpoints = endpoints or {}
    sends = SendQueue(reactor)
    if routes is None:
        upstreams = {
            name: build_upstream(
                reactor, upstream, config, token, trust, endpoint=endpoints.get(name), sends=sends
            )
            for name, upstream in config.signals.items()
        }
        table: tuple[Route, ...] = DEFAULT_ROUTES
    else:
        upstreams = {
            spec.upstream.name: build_upstream(
                reactor,
                spec.upstream,
                config,
                source,
                trust,
                endpoint=endpoints.get(spec.upstream.name),
                sends=sends,
            )
            for spec, source in routes
        }
        table = tuple(spec.route for spec, _ in routes)
    root = build_root(upstreams, ops_resources(readiness, registry), table)
    factory = ProxyFactory(
        root,
        clock=reactor,
        recorder=Recorder(
            metrics, reactor, access_sink, log_quiet=log_quiet, access_log=access_log
        ),
        upstream_timeout=config.upstream_timeout,
        max_body=config.max_request_body_bytes,
        client_header_timeout=config.client_header_timeout,
        client_idle_timeout=config.client_idle_timeout,
        max_connections=config.max_connections,
        client_auth=client_auth,
        budgets=budgets,
        max_websockets=config.max_websockets,
        websocket_idle_timeout=config.websocket_idle_timeout,
        policy=Policy.build(config.allowed_origins, config.allowed_hosts),
        sends=sends,
    )
    return factory, upstreams


class _QuietSite(Site):
    """twisted.web's site for the admin listener: probes and scrapes are not
    access-logged (Twisted's combined log line per request)."""

    noisy = False

    def log(self, request: object) -> None:
        pass


def admin_site(readiness: Readiness, registry: CollectorRegistry, clock: Any) -> Site:
    """/health, /ready and /metrics alone, on twisted.web: not subject to
    MAX_CONNECTIONS, so the kubelet's probes are answered under overload."""
    return _QuietSite(admin_root(readiness, registry), timeout=75.0, reactor=clock)


def ipv6_available() -> bool:
    """Whether this host can listen on IPv6 at all (an IPv4-only node or
    container has no ``::``)."""

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def default_listen(port: int) -> str:
    """``PORT`` on every address, IPv6 and IPv4 (one dual-stack socket on
    ``::``), or IPv4 alone where the host has no IPv6. Twisted's default
    backlog of 50 drops SYNs under a burst of new connections."""
    if ipv6_available():
        return f"tcp6:port={port}:interface=\\:\\::backlog=1024"
    return f"tcp:{port}:backlog=1024"


def _freeze_startup_objects() -> None:
    """Move everything built at start-up out of the cyclic collector's way:
    full collections then only walk what requests allocate (the process-wide
    GC is ours to tune: twistd runs one service per process)."""
    gc.collect()
    gc.freeze()


class ProxyService(MultiService):
    """lgmt-proxy as a twistd service."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        token: Secret | None,
        client_auth: ClientAuth | None = None,
        routes: list[RouteSpec] | None = None,
        listen: str | None = None,
        admin_listen: str | None = None,
        trust: Sequence[X509] | None = None,
        stdout: IO[str] = sys.stdout,
        sandbox: bool = False,
        handle_sigterm: bool = True,
        warnings: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.config = config
        #: Said at start-up, not fatal (unknown variables: likely typos).
        self._warnings = tuple(warnings)
        self.reactor = reactor
        self.sandbox = sandbox
        self._handle_sigterm = handle_sigterm
        self._hurried = False
        self._cut = 0
        self._waiting: Deferred[None] | None = None
        self.registry = CollectorRegistry()
        self.readiness = Readiness()
        self.log_observer, self._sink = make_observer(
            stdout,
            log_format=config.log_format,
            log_level=config.log_level,
            schedule=lambda f: reactor.callLater(0, f),
        )
        self.metrics = ProxyMetrics(
            self.registry,
            consumer_label=client_auth is not None,
            tenant_label=config.metrics_tenant_label,
        )
        reloads = self.metrics.config_reloads
        self.token = token_source(token, config.token_file, reloads) if token is not None else None
        self._watched: list[WatchedFile[Any]] = (
            [self.token] if config.token_file and self.token else []
        )
        route_sources: list[tuple[RouteSpec, Callable[[], Secret] | None]] | None = None
        self._from_consumer = {
            s.upstream.name for s in routes or [] if s.route.tenant_from_consumer
        }
        if routes is not None:
            route_sources = []
            for spec in routes:
                source = None
                if spec.token is not None:
                    source = token_source(
                        spec.token, spec.token_file, reloads, name=spec.token_file_key
                    )
                    if spec.token_file:
                        self._watched.append(source)
                route_sources.append((spec, source))
        self.client_auth: WatchedFile[ClientAuth] | None = None
        if client_auth is not None:
            self.client_auth = WatchedFile(
                client_auth,
                config.client_auth_file,
                kind="client_auth",
                load=load_client_auth,
                reloads=self.metrics.config_reloads,
            )
            self.registry.register(BudgetSeries(self.client_auth))
        #: Consumers' budgets: shared through Redis with RATE_LIMIT_REDIS_URL.
        self.budgets, self.redis = build_budgets(config, reactor, self.metrics, trust)
        self.proxy_factory, self.upstreams = build_proxy_factory(
            config,
            reactor,
            budgets=self.budgets,
            token=self.token,
            registry=self.registry,
            readiness=self.readiness,
            metrics=self.metrics,
            trust=trust,
            client_auth=self.client_auth,
            routes=route_sources,
            # Access lines go straight to the output unless the level hides them.
            access_sink=self._sink if config.log_level in ("debug", "info") else None,
            log_quiet=config.log_level == "debug",
            access_log=config.log_level in ("debug", "info"),
        )
        self.listen = listen or default_listen(config.port)
        if admin_listen and admin_listen.isdigit():
            # A bare port: every address, IPv6 and IPv4, like PORT.
            admin_listen = default_listen(int(admin_listen))
        self._main = Listener(self.listen, self.proxy_factory, reactor, option="--listen")
        self._main.setServiceParent(self)
        self._admin: Listener | None = None
        if admin_listen:
            self._admin = Listener(
                admin_listen,
                admin_site(self.readiness, self.registry, reactor),
                reactor,
                option="--admin-listen",
            )
            self._admin.setServiceParent(self)
        #: OTLP over gRPC (OTLP_GRPC_LISTEN), sharing the main listener's rules.
        self.grpc_factory: GrpcFactory | None = None
        self._grpc: Listener | None = None
        grpc_listen = config.otlp_grpc_listen
        if grpc_listen:
            if grpc_listen.isdigit():
                grpc_listen = default_listen(int(grpc_listen))
            grpc = self.grpc_factory = GrpcFactory(self.proxy_factory)
            tls = config.otlp_grpc_tls
            factory = grpc if tls is None else GrpcTLSFactory(grpc, tls.options, reactor)
            self._grpc = Listener(grpc_listen, factory, reactor, option="OTLP_GRPC_LISTEN")
            self._grpc.setServiceParent(self)
        if self.client_auth is not None:
            self._watched.append(self.client_auth)
        if self._watched:
            TimerService(WATCH_SECONDS, self._poll).setServiceParent(self)

    def _poll(self) -> None:
        for watched in self._watched:
            watched.poll()

    def setServiceParent(self, parent: Any) -> Any:
        # twistd builds the Application after makeService; the log observer
        # set on it as a component replaces twistd's default text log.
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd binds the listeners here, before the reactor runs.
        with self._listen_errors():
            super().privilegedStartService()

    @contextmanager
    def _listen_errors(self) -> Iterator[None]:
        """A port that cannot be bound: one plain line, exit 1, no traceback."""
        try:
            yield
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            # twistd has replaced sys.stderr with a logger by now, and the
            # batched log never flushes since the reactor will not run.
            self._sink.flush()
            print(
                f"lgmt-proxy: cannot listen on {e.interface or '*'}:{e.port}: {reason}",
                file=sys.__stderr__,
            )
            raise SystemExit(1) from None

    def startService(self) -> None:
        with self._listen_errors():
            super().startService()
        if self.redis is not None:
            self.redis.start()
        if self._handle_sigterm:
            self.reactor.callWhenRunning(self._install_sigterm)
            self.reactor.callWhenRunning(_freeze_startup_objects)
        self._announce()

    def _announce(self) -> None:
        for text in self._warnings:
            # Not a `warning` field: Twisted's legacy observer takes those for
            # Python warnings.
            _log.warn("{text}", text=text)
        if self.client_auth is not None:
            names = ", ".join(c.name for c in self.client_auth().consumers)
            _log.info("client authentication on: consumers {names}", names=names)
        else:
            _log.warn(
                "client authentication off: anyone who can reach the port uses the "
                "proxy's credentials (set CLIENT_AUTH_FILE to restrict it)"
            )
        if self.sandbox:
            _log.warn(
                "SANDBOX MODE: every signal goes to a built-in loopback echo upstream; "
                "nothing reaches Grafana Cloud"
            )
        if self.redis is not None and self.config.rate_limit_redis is not None:
            _log.info(
                "consumers' budgets shared through Redis at {where} (deadline {timeout}s)",
                where=self.config.rate_limit_redis.display,
                timeout=self.config.rate_limit_redis.timeout,
            )
        _log.info("listening on {address}", address=self._main.address, listen=self.listen)
        if self._grpc is not None:
            tls = self.config.otlp_grpc_tls
            _log.info(
                "OTLP over gRPC ({how}) on {address}, bridged to the otlp route",
                how="h2c" if tls is None else f"TLS, ALPN h2, {tls.subject} until {tls.not_after}",
                address=self._grpc.address.replace("http://", "", 1),
            )
        log_upstreams(
            _log,
            self.upstreams,
            from_consumer=self._from_consumer,
            routes_file=self.config.routes_file is not None,
        )

    def _install_sigterm(self) -> None:
        # twistd re-raises SIGTERM or SIGINT after stopping (exit status -15,
        # and make's "Interrupt" line under `make run`); stopping the reactor
        # ourselves makes a drained shutdown exit 0. A second signal cuts the
        # drain short (Ctrl-C twice); later ones are ignored.
        reactor = self.reactor
        stopping: list[int] = []

        def on_signal(signum: int, frame: object) -> None:
            stopping.append(signum)
            name = signal.Signals(signum).name
            if len(stopping) == 1:
                reactor.callFromThread(self._log_signal, name, first=True)
                reactor.callFromThread(reactor.stop)
            elif len(stopping) == 2:
                reactor.callFromThread(self._log_signal, name, first=False)
                reactor.callFromThread(self.hurry)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    @staticmethod
    def _log_signal(name: str, *, first: bool) -> None:
        if first:
            _log.info("{signal}: stopping; a second SIGINT or SIGTERM stops at once", signal=name)
        else:
            _log.info("{signal} again: stopping at once", signal=name)

    def hurry(self) -> None:
        """Stop now: skip the rest of the delay and the grace period and cut
        the connections still open (a second Ctrl-C)."""
        self._hurried = True
        if self._waiting is not None:
            self._waiting.cancel()
        for connection in list(self.proxy_factory.connections):
            self._cut += 1
            connection.close_now()
        if self.grpc_factory is not None:
            for grpc_connection in list(self.grpc_factory.connections):
                self._cut += 1
                grpc_connection.close_now()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.readiness.draining = True
        # Every response from now on says Connection: close and closes its
        # connection, so clients move to other pods during the delay.
        self.proxy_factory.draining = True
        grpc = self.grpc_factory
        if grpc is not None:
            # GOAWAY now: gRPC clients finish their calls and move on.
            for grpc_connection in list(grpc.connections):
                grpc_connection.close_when_idle(0.0)
        delay = 0.0 if self._hurried else self.config.shutdown_delay
        _log.info("draining: /ready answers 503; closing the listener in {delay}s", delay=delay)
        if delay:
            self._waiting = deferLater(self.reactor, delay, lambda: None)
            try:
                await self._waiting
            except CancelledError:  # hurried
                pass
            self._waiting = None
        await self._main.stopService()
        if self._grpc is not None:
            await self._grpc.stopService()
        grace = 0.0 if self._hurried else self.config.shutdown_grace
        drains = [
            Deferred.fromCoroutine(drain_connections(self.proxy_factory, self.reactor, grace))
        ]
        if grpc is not None:
            drains.append(Deferred.fromCoroutine(drain_connections(grpc, self.reactor, grace)))
        aborted = sum(await gatherResults(drains))
        if self._hurried:
            _log.info("drain cut short: {n} open connections cut", n=self._cut + aborted)
        elif aborted:
            _log.warn(
                "drain: {n} connections still busy after the grace period were cut", n=aborted
            )
        for up in self.upstreams.values():
            up.pool.close()
        if self.redis is not None:
            self.redis.stop()
        await super().stopService()
        _log.info("stopped")
        self._sink.flush()
