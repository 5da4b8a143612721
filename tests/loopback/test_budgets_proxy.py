"""Consumers' budgets through the proxy, on loopback: a Content-Length that
does not fit is refused before anything goes upstream, a chunked body is
charged as it streams, a reload changes a budget, and three proxies share
one budget through one real redis-server, which may stop and come back
under load."""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import load_client_auth
from lgmt_proxy.config.ratelimit import RedisSettings, parse_redis_url
from lgmt_proxy.config.watch import WatchedFile
from lgmt_proxy.limits.keeper import BudgetKeeper
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.shared import REASONS, build_shared
from tests.support.helpers import (
    ProxyFixture,
    Recorder,
    env_for,
    json_body,
    listen,
    raw_connect,
    raw_request,
    sleep,
    status_of,
    upstream_site,
)
from tests.support.redisserver import RedisServer

TOKEN = "pusher-token-0123456789"


def auth_doc(rate_limit: str) -> str:
    return f"""
consumers:
  - name: pusher
    token: {TOKEN}
    allow: [{{methods: [POST], paths: ["/otlp/v1/*"]}}]
    rate_limit: {rate_limit}
"""


def post(body: bytes, *, chunked: bool = False) -> bytes:
    head = (
        b"POST /otlp/v1/logs HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    )
    if not chunked:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
                      for i in range(0, len(body), 1000))  # fmt: skip
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


def header(raw: bytes, name: bytes) -> bytes | None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class Fixture(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.up = Recorder()
        port = listen(upstream_site(self.up))
        self.addCleanup(port.stopListening)
        self.upstream_url = f"http://127.0.0.1:{port.getHost().port}"
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "clients.yaml")

    def client_auth(self, rate_limit: str) -> WatchedFile[Any]:
        with open(self.path, "w") as f:
            f.write(auth_doc(rate_limit))
        auth, problem = load_client_auth(self.path)
        assert auth is not None, problem
        return WatchedFile(auth, self.path, kind="client_auth", load=load_client_auth)

    def proxy(self, client_auth: Any, budgets: BudgetKeeper | None = None) -> ProxyFixture:
        fixture = ProxyFixture(env_for(self.upstream_url), client_auth=client_auth, budgets=budgets)
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        return fixture


class LocalBudgetTests(Fixture):
    async def test_content_length_that_does_not_fit(self) -> None:
        """429 with Retry-After before the body is read: nothing upstream; a
        body larger than the whole burst 413, saying it can never fit."""
        proxy = self.proxy(self.client_auth("{bytes_per_second: 1000, burst_bytes: 2000}"))
        port = proxy.port.getHost().port
        self.assertEqual(status_of(await raw_request(port, post(b"x" * 1500))), 200)
        refused = await raw_request(port, post(b"y" * 1000))
        self.assertEqual(status_of(refused), 429)
        self.assertEqual(header(refused, b"retry-after"), b"1")
        self.assertEqual(json_body(refused)["error"], "byte budget of consumer pusher exceeded")
        too_large = await raw_request(port, post(b"z" * 2001))
        self.assertEqual(status_of(too_large), 413)
        self.assertIn("can never fit", json_body(too_large)["error"])
        self.assertEqual([len(s.body) for s in self.up.seen], [1500])
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="otlp", method="POST", status="429",
                         consumer="pusher"), 1)  # fmt: skip

    async def test_refused_before_the_body_is_sent(self) -> None:
        """A client that waits before sending a body that does not fit gets
        its 429 (or 413) at once, then the connection closes."""
        proxy = self.proxy(self.client_auth("{bytes_per_second: 1000, burst_bytes: 2000}"))
        port = proxy.port.getHost().port
        self.assertEqual(status_of(await raw_request(port, post(b"x" * 1500))), 200)
        for declared, expected in ((1000, 429), (10**9, 413)):
            client = await raw_connect(port)
            head = post(b"").split(b"Content-Length")[0]
            client.transport.write(head + b"Content-Length: %d\r\n\r\n" % declared)
            for _ in range(100):
                if b"}" in bytes(client.data):
                    break
                await sleep(0.02)
            self.assertEqual(status_of(bytes(client.data)), expected)
            await client.closed  # after a brief linger
        self.assertEqual(len(self.up.seen), 1)

    async def test_chunked_body_charged_as_it_streams(self) -> None:
        """The body in flight is not cut; the consumer's next request waits
        until the budget has refilled."""
        proxy = self.proxy(self.client_auth("{bytes_per_second: 1000, burst_bytes: 1000}"))
        port = proxy.port.getHost().port
        self.assertEqual(status_of(await raw_request(port, post(b"a" * 5000, chunked=True))), 200)
        self.assertEqual([len(s.body) for s in self.up.seen], [5000])
        refused = await raw_request(port, post(b"b" * 10, chunked=True))
        self.assertEqual(status_of(refused), 429)
        self.assertIn(header(refused, b"retry-after"), (b"4", b"5"))
        self.assertEqual(len(self.up.seen), 1)

    async def test_budget_change_applies_on_reload(self) -> None:
        source = self.client_auth("{requests_per_second: 0.01, burst: 1}")
        proxy = self.proxy(source)
        port = proxy.port.getHost().port
        statuses = [status_of(await raw_request(port, post(b"{}"))) for _ in range(2)]
        self.assertEqual(statuses, [200, 429])
        with open(self.path, "w") as f:
            f.write(auth_doc("{requests_per_second: 0.01, burst: 3}"))
        source.poll()
        statuses = [status_of(await raw_request(port, post(b"{}"))) for _ in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])


class SharedBudgetProxyTests(Fixture):
    """Three proxies (three replicas) and one redis-server."""

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.redis = RedisServer(os.path.join(self.dir, "redis"))
        self.addCleanup(self.redis.stop)

    def replicas(self, rate_limit: str, timeout: float) -> list[ProxyFixture]:
        settings = parse_redis_url(self.redis.url)
        assert isinstance(settings, RedisSettings)
        settings = attrs.evolve(settings, timeout=timeout)
        source = self.client_auth(rate_limit)
        proxies = []
        for _ in range(3):
            fixture = ProxyFixture(env_for(self.upstream_url), client_auth=source)
            local = LocalLimiter(reactor)
            shared, pool = build_shared(reactor, settings, local, fixture.metrics,
                                        first_backoff=0.05, max_backoff=0.5)  # fmt: skip
            fixture.factory.budgets = BudgetKeeper(local, shared)
            pool.start()
            self.addCleanup(pool.stop)
            self.addCleanup(lambda f=fixture: Deferred.fromCoroutine(f.close()))
            proxies.append(fixture)
        return proxies

    async def until_shared(self, proxies: list[ProxyFixture], seconds: float = 10.0) -> None:
        for _ in range(int(seconds / 0.05)):
            if all(p.sample("proxy_ratelimit_shared") == 1 for p in proxies):
                return
            await sleep(0.05)
        self.fail(f"not shared again within {seconds} s")

    async def drive(
        self, proxies: list[ProxyFixture], per_second: int, seconds: float, body: bytes = b"{}"
    ) -> tuple[list[int], float]:
        """``per_second`` requests a second (each with ``body``), spread over
        the proxies, for ``seconds``: every status, and how long sending took."""
        ports = [p.port.getHost().port for p in proxies]
        waves = int(seconds * 10)
        per_wave = per_second // 10
        started = reactor.seconds()  # type: ignore[attr-defined]
        pending = []
        for wave in range(waves):
            for i in range(per_wave):
                pending.append(Deferred.fromCoroutine(raw_request(ports[i % 3], post(body))))
            # Keep to the schedule whatever the last wave cost.
            lag = started + (wave + 1) / 10 - reactor.seconds()  # type: ignore[attr-defined]
            await sleep(max(0.0, lag))
        sent = reactor.seconds() - started  # type: ignore[attr-defined]
        answers = await gatherResults(pending)
        return [status_of(a) for a in answers], sent

    async def test_three_replicas_share_one_budget(self) -> None:
        """20 requests/s (burst 20) shared by three proxies driven together
        at 300 requests/s for 5 s: about 120 admitted, not up to 360."""
        await self.accuracy("{requests_per_second: 20, burst: 20}", b"{}")

    async def test_three_replicas_share_one_byte_budget(self) -> None:
        """The same for bytes: 20 kB/s (burst 20 kB) shared by three proxies
        driven with 1 kB pushes at 300 a second for 5 s: about 120 admitted."""
        await self.accuracy("{bytes_per_second: 20000, burst_bytes: 20000}", b"x" * 1000)

    async def accuracy(self, rate_limit: str, body: bytes) -> None:
        proxies = self.replicas(rate_limit, timeout=1.0)
        await self.until_shared(proxies)
        statuses, sent = await self.drive(proxies, 300, 5.0, body)
        admitted = statuses.count(200)
        self.assertEqual(set(statuses), {200, 429})
        self.assertEqual(len(self.up.seen), admitted)
        # The budget over the time the load actually took (5 s unless the
        # machine lagged): a burst of 20, then 20 a second.
        expected = 20 + 20 * sent
        errors = {r: sum(p.sample("proxy_ratelimit_backend_errors_total", reason=r) or 0
                         for p in proxies) for r in REASONS}  # fmt: skip
        why = (admitted, sent, {r: n for r, n in errors.items() if n})
        self.assertLess(abs(admitted - expected), 0.25 * expected, why)
        if sent < 5.5:
            self.assertLess(abs(admitted - 120), 30, admitted)
        self.assertEqual(sum(p.sample("proxy_ratelimit_backend_errors_total", reason="timeout")
                             for p in proxies), 0)  # fmt: skip

    async def test_redis_stopped_during_load_then_back(self) -> None:
        """Redis stopped: every request still answered, 200 or 429, the fall
        back in the metrics; Redis back: shared again within 10 s."""
        proxies = self.replicas("{requests_per_second: 20, burst: 20}", timeout=0.05)
        await self.until_shared(proxies)
        before, _ = await self.drive(proxies, 60, 1.0)
        self.redis.stop()
        during, _ = await self.drive(proxies, 60, 1.0)
        self.assertEqual(set(before + during) - {200, 429}, set())
        self.assertIn(200, during)
        for p in proxies:
            self.assertEqual(p.sample("proxy_ratelimit_shared"), 0)
            errors = sum(p.sample("proxy_ratelimit_backend_errors_total", reason=r)
                         for r in ("connect", "down"))  # fmt: skip
            self.assertGreater(errors, 0)
        self.redis.start()
        await self.until_shared(proxies, 10.0)
        after, _ = await self.drive(proxies, 60, 0.5)
        self.assertEqual(set(after) - {200, 429}, set())


class SharedBudgetUpgradeTests(TestCase):
    """A WebSocket tail through a proxy whose budgets are shared: the
    request budget applies to the upgrade (decided by this replica at once,
    `BudgetKeeper.check_now`: the parser hands the connection over with the
    head), the tail opens and echoes, the next one over budget gets 429."""

    timeout = 60

    async def test_websocket_tail_with_shared_budgets(self) -> None:
        from autobahn.twisted.websocket import WebSocketServerFactory

        from lgmt_proxy.config.clientauth import parse_client_auth
        from tests.loopback.test_websocket import EchoUpstream, open_websocket
        from tests.support.helpers import TOKEN as CLOUD_TOKEN

        directory = self.mktemp()
        os.makedirs(directory)
        redis = RedisServer(directory)
        self.addCleanup(redis.stop)
        upstream = WebSocketServerFactory()
        upstream.protocol = EchoUpstream
        upstream.requests = []
        upstream.token = CLOUD_TOKEN
        port = listen(upstream)
        self.addCleanup(port.stopListening)
        auth = parse_client_auth(
            f"consumers: [{{name: tail, token: {TOKEN}, allow: [{{paths: ['/loki/*']}}], "
            "rate_limit: {requests_per_second: 0.01, burst: 1}}]"
        )
        fixture = ProxyFixture(
            env_for(f"http://127.0.0.1:{port.getHost().port}"), client_auth=lambda: auth
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        settings = parse_redis_url(redis.url)
        assert isinstance(settings, RedisSettings)
        local = LocalLimiter(reactor)
        shared, pool = build_shared(reactor, settings, local, fixture.metrics)
        fixture.factory.budgets = BudgetKeeper(local, shared)
        pool.start()
        self.addCleanup(pool.stop)
        for _ in range(100):
            if shared.shared:
                break
            await sleep(0.05)
        self.assertTrue(shared.shared)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        first = await open_websocket(fixture, "/loki/api/v1/tail?query=x", headers=headers)
        client = await first.opened
        client.sendClose()
        await first.closed
        second = await open_websocket(fixture, "/loki/api/v1/tail?query=x", headers=headers)
        with self.assertRaises(Exception) as caught:
            await second.opened
        self.assertIn("429", str(caught.exception))
        self.assertEqual(len(upstream.requests), 1)
