"""Shared test fixtures: a real proxy on loopback, recording upstreams, raw clients.

Everything binds 127.0.0.1 port 0 and runs on the real reactor; tests that
do not depend on sockets use MemoryReactorClock instead.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from lgmt_proxy.config.settings import Config, parse_config
from lgmt_proxy.config.tokens import token_source
from lgmt_proxy.dataplane.server import ProxyFactory
from lgmt_proxy.obs.metrics import ProxyMetrics
from lgmt_proxy.obs.ops import Readiness
from lgmt_proxy.service import build_proxy_factory

from .processes import ChildProcess

TOKEN = "glc_test-token-ABCDEF0123456789"
ORG = {"prometheus": "111", "loki": "222", "tempo": "333", "otlp": "444", "profiles": "555"}


def basic(org: str, token: str = TOKEN) -> bytes:
    return b"Basic " + base64.b64encode(f"{org}:{token}".encode())


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = {"GRAFANA_CLOUD_ACCESS_TOKEN": TOKEN}
    for signal, org in ORG.items():
        env[f"GRAFANA_CLOUD_{signal.upper()}_URL"] = url
        env[f"GRAFANA_CLOUD_{signal.upper()}_ORG_ID"] = org
    env.update(extra)
    return env


@attrs.define
class Seen:
    method: bytes
    uri: bytes
    headers: list[tuple[bytes, list[bytes]]]
    body: bytes

    def header(self, name: bytes) -> list[bytes] | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


class Recorder(Resource):
    """An upstream that records every request and answers as told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [(b"Content-Type", b"application/json")]
        self.body = b'{"status":"success"}'

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        self.seen.append(
            Seen(
                request.method,
                request.uri,
                list(request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
            )
        )
        request.setResponseCode(self.status)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return self.body if request.method != b"HEAD" else b""


def listen(site: protocol.ServerFactory) -> Any:
    return reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]


class ProxyFixture:
    """A real ProxySite listening on loopback, built like the service builds it."""

    def __init__(
        self,
        env: dict[str, str],
        trust: Any = None,
        client_auth: Any = None,
        routes: Any = None,
        token: Any = None,
        config: Config | None = None,
        budgets: Any = None,
    ) -> None:
        """``config``: as `tap.load` made it (files read), else parsed from ``env``."""
        self.config: Config = parse_config(env) if config is None else config
        self.registry = CollectorRegistry()
        self.readiness = Readiness()
        if token is None and self.config.token:
            token = token_source(self.config.token, None)
        self.token = token
        self.metrics = ProxyMetrics(
            self.registry, process_collectors=False, consumer_label=client_auth is not None
        )
        self.factory: ProxyFactory
        self.factory, self.upstreams = build_proxy_factory(
            self.config,
            reactor,
            token=self.token,
            registry=self.registry,
            readiness=self.readiness,
            metrics=self.metrics,
            trust=trust,
            client_auth=client_auth,
            routes=routes,
            budgets=budgets,
        )
        self.port = listen(self.factory)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    async def close(self) -> None:
        await self.port.stopListening()
        for connection in list(self.factory.connections):
            connection.close_now()
        for up in self.upstreams.values():
            up.pool.close()

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def metrics_text(self) -> str:
        """The /metrics exposition, as a scrape reads it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class RawClient(protocol.Protocol):
    """Sends raw bytes, collects everything until the server closes; ``reason``
    says how it closed (``ConnectionDone`` for a FIN, ``ConnectionLost`` for a
    reset)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[bytes] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        if not self.closed.called:
            self.closed.callback(bytes(self.data))


async def raw_connect(port: int) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


async def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` and return all the server sent before it closed (or timeout)."""
    client = await raw_connect(port)
    client.transport.write(data)
    delayed = reactor.callLater(timeout, client.transport.abortConnection)  # type: ignore[attr-defined]
    try:
        return await client.closed
    finally:
        if delayed.active():
            delayed.cancel()


def status_of(raw: bytes) -> int:
    line = raw.split(b"\r\n", 1)[0]
    return int(line.split(b" ")[1]) if line.startswith(b"HTTP/") else 0


def json_body(raw: bytes) -> Any:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def upstream_site(resource: Resource) -> Site:
    site = Site(resource)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


__all__ = ["NOT_DONE_YET", "defer"]


async def call(
    url: str,
    method: bytes = b"GET",
    headers: dict[bytes, list[bytes]] | None = None,
    body: bytes | None = None,
) -> tuple[Any, bytes]:
    """One request with a fresh, non-persistent Agent: (response, body bytes)."""
    import io

    from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    response = await agent.request(method, url.encode(), Headers(headers or {}), producer)
    data = await readBody(response)
    return response, data


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def twistd_path() -> str:
    import os
    import sys

    return os.path.join(os.path.dirname(sys.executable), "twistd")


class ProxyProcess(ChildProcess):
    """``twistd -n lgmt-proxy`` as a real subprocess on a free loopback port."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def vm(self, field: str) -> int:
        """A /proc/<pid>/status size field (VmRSS, VmHWM) in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)


async def spawn_proxy(env: dict[str, str], *args: str, wait: bool = True) -> ProxyProcess:
    import os

    proc = ProxyProcess()
    proc.port = free_port()
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **env}
    argv = [
        twistd_path(),
        "-n",
        "--pidfile=",
        "lgmt-proxy",
        "--listen",
        f"tcp:{proc.port}:interface=127.0.0.1",
        *args,
    ]
    proc.start(argv, full_env)
    if wait:
        await wait_healthy(proc)
    return proc


async def wait_healthy(proc: ProxyProcess) -> None:
    """Until the process answers /health 200, or ends (at most 200 tries)."""
    for _ in range(200):
        if proc.ended.called:
            return
        try:
            response, _ = await call(proc.url + "/health")
            if response.code == 200:
                return
        except Exception:
            await sleep(0.05)
