"""Budgets shared through a real redis-server: two limiters (two replicas)
share one consumer's budget; Redis stopped, frozen, refusing (password,
OOM, read-only) never fails or hangs a decision, and sharing comes back."""

from __future__ import annotations

from typing import Any

import attrs
from OpenSSL.crypto import X509
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.ratelimit import RedisSettings, parse_redis_url
from lgmt_proxy.dataplane.upstream import trust_root
from lgmt_proxy.limits.budget import ADMITTED, BYTES, REQUESTS, Budget, Limits, Verdict
from lgmt_proxy.limits.lease import LEASE_SECONDS, lease_size
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.resp import RedisPool
from lgmt_proxy.limits.shared import SharedLimiter, build_shared, keys
from lgmt_proxy.obs.metrics import ProxyMetrics
from tests.loopback.test_tls import make_ca, make_leaf, pem
from tests.support.helpers import sleep
from tests.support.redisserver import RedisServer

PASSWORD = "r3dis-s3cret-passw0rd"


async def verdict(decision: Verdict | Deferred[Verdict]) -> Verdict:
    """A decision taken from the lease at once, or one that asked Redis."""
    if isinstance(decision, Deferred):
        return await decision
    return decision


class Replica:
    """One replica's limiter, pool and metrics."""

    def __init__(self, settings: RedisSettings, trust: list[X509] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry, process_collectors=False)
        self.limiter: SharedLimiter
        self.pool: RedisPool
        self.limiter, self.pool = build_shared(
            reactor, settings, LocalLimiter(reactor), self.metrics,
            first_backoff=0.05, max_backoff=0.2, trust=trust,
        )  # fmt: skip
        self.pool.start()

    def errors(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "proxy_ratelimit_backend_errors_total", {"reason": reason}
        )
        return value or 0.0

    @property
    def shared_gauge(self) -> float | None:
        return self.registry.get_sample_value("proxy_ratelimit_shared")


class SharedBudgetTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer(self.mktemp())
        self.addCleanup(self.redis.stop)
        self.warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "lgmt_proxy.budgets":
                self.warnings.append(event["log_format"].format(**event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def replica(self, url: str | None = None, **changes: Any) -> Replica:
        settings = parse_redis_url(url or self.redis.url)
        assert isinstance(settings, RedisSettings)
        # A generous deadline: this machine is shared; the deadline's own
        # tests set theirs.
        replica = Replica(attrs.evolve(settings, **{"timeout": 2.0, **changes}))
        self.addCleanup(replica.pool.stop)
        return replica

    async def until(self, check: Any, what: str, seconds: float = 10.0) -> None:
        for _ in range(int(seconds / 0.05)):
            if check():
                return
            await sleep(0.05)
        self.fail(f"not within {seconds} s: {what}")

    async def test_two_replicas_share_one_budget(self) -> None:
        """A burst of 10 at 1 request/s is 10 in all, not 10 per replica; a
        refusal says which budget and how long to wait."""
        a, b = self.replica(), self.replica()
        await self.until(lambda: a.pool.ready and b.pool.ready, "both connected")
        limits = Limits(Budget(rate=1, burst=10), None)
        verdicts = []
        for i in range(30):
            verdicts.append(
                await verdict((a if i % 2 else b).limiter.check("team-a", limits, None))
            )
        admitted = sum(v.allowed for v in verdicts)
        # 11 if a second passed meanwhile; a unit or two short if a lease
        # taken ahead of need was not spent before the end.
        self.assertLessEqual(10 - 2 * lease_size(limits.requests), admitted)
        self.assertLessEqual(admitted, 11)
        refused = [v for v in verdicts if not v.allowed]
        self.assertEqual({v.budget for v in refused}, {REQUESTS})
        self.assertTrue(all(0 < v.retry_after <= 1.0 for v in refused))
        self.assertEqual((a.shared_gauge, b.shared_gauge), (1.0, 1.0))
        self.assertTrue(a.limiter.shared)
        # Another consumer has its own keys; keys expire once full again.
        self.assertTrue((await verdict(a.limiter.check("team-b", limits, None))).allowed)
        ttl = int(self.redis.cli("PTTL", keys("team-a")[0].decode()))
        self.assertTrue(0 < ttl <= 11_000, ttl)
        self.assertEqual(self.redis.cli("EXISTS", keys("team-a")[1].decode()), "0")

    async def test_bytes_declared_and_streamed(self) -> None:
        """A Content-Length is charged up front across replicas; a streamed
        body charged on one replica overdraws the budget for the other."""
        a, b = self.replica(), self.replica()
        await self.until(lambda: a.pool.ready and b.pool.ready, "both connected")
        limits = Limits(None, Budget(rate=1000, burst=4000))
        self.assertTrue((await verdict(a.limiter.check("team-a", limits, 3000))).allowed)
        refused = await verdict(b.limiter.check("team-a", limits, 2000))
        self.assertEqual((refused.allowed, refused.budget), (False, BYTES))
        # 1 s for the 1000 bytes missing, and a's lease beyond its 3000.
        lease = lease_size(limits.bytes) / 1000
        self.assertTrue(0.8 < refused.retry_after <= 1.0 + lease, refused)
        self.assertTrue((await verdict(b.limiter.check("team-a", limits, None))).allowed)
        for _ in range(5):
            b.limiter.charge("team-a", limits, 2000)  # 10 kB streamed
        await self.until(lambda: not b.limiter._charging, "charges sent")
        # a sees it when it next asks Redis: once its lease is spent or stale.
        await sleep(LEASE_SECONDS)
        refused = await verdict(a.limiter.check("team-a", limits, None))
        self.assertFalse(refused.allowed)
        self.assertGreater(refused.retry_after, 5.0)
        too_large = await verdict(a.limiter.check("team-a", limits, 4001))
        self.assertTrue(too_large.too_large)

    async def test_script_reloaded_after_flush(self) -> None:
        """EVALSHA falls back to EVAL when Redis no longer holds the script."""
        a = self.replica()
        await self.until(lambda: a.pool.ready, "connected")
        limits = Limits(Budget(1, 1), None)
        self.assertTrue((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        self.redis.cli("SCRIPT", "FLUSH")
        self.assertFalse((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(a.errors("error"), 0)

    async def test_stopped_then_back(self) -> None:
        """Redis stopped: decisions are taken locally at once (a warning, the
        gauge at 0, errors counted); Redis back on its port: shared again
        without a restart, and said so."""
        a = self.replica()
        await self.until(lambda: a.limiter.shared, "shared")
        limits = Limits(Budget(rate=1, burst=3), None)
        self.redis.stop()
        await self.until(lambda: not a.pool.ready, "connection lost")
        verdicts = [await verdict(a.limiter.check("team-a", limits, None)) for _ in range(5)]
        self.assertEqual([v.allowed for v in verdicts], [True, True, True, False, False])
        self.assertEqual(a.shared_gauge, 0.0)
        self.assertGreaterEqual(a.errors("connect"), 1)
        self.assertGreaterEqual(a.errors("down"), 1)
        failed = [w for w in self.warnings if "failed" in w]
        self.assertEqual(len(failed), 1, self.warnings)
        self.redis.start()
        await self.until(lambda: a.limiter.shared, "shared again")
        self.assertEqual(a.shared_gauge, 1.0)
        self.assertTrue((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(len([w for w in self.warnings if "shared again" in w]), 1, self.warnings)
        self.assertEqual(len([w for w in self.warnings if "failed" in w]), 1)

    async def test_a_lease_through_a_restart(self) -> None:
        """Units leased before Redis stops are spent while it is down, at
        once and without an error; past them the replica decides alone;
        Redis back, the next lease comes from it again."""
        a = self.replica()
        await self.until(lambda: a.limiter.shared, "shared")
        limits = Limits(Budget(rate=100, burst=100), None)  # leases of 10
        self.assertTrue((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        lease = a.limiter.lease("team-a", limits)
        self.assertEqual(lease.held_requests, lease_size(limits.requests))
        self.redis.stop()
        await self.until(lambda: not a.pool.ready, "connection lost")
        if reactor.seconds() >= lease.expires:  # type: ignore[attr-defined]
            self.skipTest("the machine took longer than a lease's life to stop Redis")
        held = lease.held_requests
        leased = [a.limiter.check("team-a", limits, None) for _ in range(held)]
        self.assertEqual(leased, [ADMITTED] * held)
        self.assertEqual(a.errors("down"), 0)
        alone = a.limiter.check("team-a", limits, None)
        self.assertEqual(alone, ADMITTED)  # local, at once: 12 of its 100
        self.assertEqual(a.errors("down"), 1)
        self.assertFalse(a.limiter.shared)
        self.redis.start()  # empty: every budget full again
        await self.until(lambda: a.limiter.shared, "shared again")
        self.assertTrue((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(self.redis.cli("EXISTS", keys("team-a")[0].decode()), "1")

    async def test_frozen_redis_meets_the_deadline(self) -> None:
        """A Redis that stops answering (SIGSTOP) costs each decision the
        deadline, never more, and the decision is local."""
        a = self.replica(timeout=0.05)
        await self.until(lambda: a.limiter.shared, "shared")
        limits = Limits(Budget(rate=1, burst=2), None)
        self.redis.freeze()
        try:
            started = reactor.seconds()  # type: ignore[attr-defined]
            verdicts = [await verdict(a.limiter.check("team-a", limits, None)) for _ in range(3)]
            elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        finally:
            self.redis.thaw()
        self.assertEqual([v.allowed for v in verdicts], [True, True, False])
        self.assertEqual(a.errors("timeout"), 3)
        self.assertFalse(a.limiter.shared)
        # Three deadlines, not a hang (generous: the machine is shared).
        self.assertLess(elapsed, 5.0)
        # Thawed: the next decision Redis answers makes the budget shared again.
        for _ in range(100):
            await verdict(a.limiter.check("team-b", limits, None))
            if a.limiter.shared:
                break
            await sleep(0.05)
        self.assertTrue(a.limiter.shared)

    async def test_oom_and_read_only(self) -> None:
        """A Redis that refuses writes (out of memory, a read-only replica)
        is a local decision, counted by reason."""
        a = self.replica()
        await self.until(lambda: a.limiter.shared, "shared")
        limits = Limits(Budget(rate=1, burst=1), None)
        self.redis.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        self.redis.cli("CONFIG", "SET", "maxmemory", "1")
        self.assertTrue((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(a.errors("oom"), 1)
        self.assertFalse(a.limiter.shared)
        self.redis.cli("CONFIG", "SET", "maxmemory", "0")
        self.redis.cli("REPLICAOF", "127.0.0.1", "1")
        self.addCleanup(self.redis.cli, "REPLICAOF", "NO", "ONE")
        self.assertFalse((await verdict(a.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(a.errors("readonly"), 1)
        self.redis.cli("REPLICAOF", "NO", "ONE")
        self.assertTrue((await verdict(a.limiter.check("team-b", limits, None))).allowed)
        self.assertTrue(a.limiter.shared)


class PasswordTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.redis = RedisServer(self.mktemp(), password=PASSWORD)
        self.addCleanup(self.redis.stop)

    async def connected(self, settings: RedisSettings) -> Replica:
        replica = Replica(attrs.evolve(settings, timeout=2.0))
        self.addCleanup(replica.pool.stop)
        for _ in range(100):
            if replica.pool.ready or replica.errors("auth"):
                break
            await sleep(0.05)
        return replica

    async def test_password_in_the_url(self) -> None:
        settings = parse_redis_url(f"redis://:{PASSWORD}@127.0.0.1:{self.redis.port}/2")
        assert isinstance(settings, RedisSettings)
        self.assertNotIn(PASSWORD, repr(settings) + settings.display)
        replica = await self.connected(settings)
        self.assertTrue(replica.pool.ready)
        limits = Limits(Budget(1, 1), None)
        self.assertTrue((await verdict(replica.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(self.redis.cli("-n", "2", "EXISTS", keys("team-a")[0].decode()), "1")

    async def test_password_from_a_file(self) -> None:
        settings = parse_redis_url(self.redis.url)
        assert isinstance(settings, RedisSettings)
        with_password = settings.with_password(PASSWORD + "\n")
        assert isinstance(with_password, RedisSettings)
        replica = await self.connected(with_password)
        self.assertTrue(replica.pool.ready)

    async def test_wrong_or_no_password(self) -> None:
        """Refused at the handshake: counted as auth, decisions local."""
        for url in (
            f"redis://:wrong-password@127.0.0.1:{self.redis.port}",
            f"redis://127.0.0.1:{self.redis.port}",
        ):
            settings = parse_redis_url(url)
            assert isinstance(settings, RedisSettings)
            replica = await self.connected(settings)
            self.assertFalse(replica.pool.ready)
            self.assertGreaterEqual(replica.errors("auth"), 1)
            limits = Limits(Budget(1, 1), None)
            self.assertTrue((await verdict(replica.limiter.check("team-a", limits, None))).allowed)
            self.assertFalse((await verdict(replica.limiter.check("team-a", limits, None))).allowed)
            self.assertEqual(replica.shared_gauge, 0.0)


class TLSTests(TestCase):
    """``rediss://``: a real redis-server speaking TLS only, its certificate
    from a private CA that the proxy trusts through UPSTREAM_CA_FILE (as its
    upstreams), verified against the URL's host name."""

    timeout = 60

    def setUp(self) -> None:
        self.ca_key, self.ca = make_ca("lgmt-proxy test Redis CA")
        key_pem, cert_pem = make_leaf(self.ca_key, self.ca, "localhost")
        self.redis = RedisServer(self.mktemp(), tls=(key_pem, cert_pem, pem(self.ca)))
        self.addCleanup(self.redis.stop)

    async def connected(self, trust: list[X509] | None) -> Replica:
        settings = parse_redis_url(self.redis.url)
        assert isinstance(settings, RedisSettings) and settings.tls
        replica = Replica(attrs.evolve(settings, timeout=2.0), trust=trust)
        self.addCleanup(replica.pool.stop)
        for _ in range(60):
            if replica.pool.ready or replica.errors("connect") or replica.errors("tls"):
                break
            await sleep(0.05)
        return replica

    async def test_shared_over_tls_with_a_private_ca(self) -> None:
        replica = await self.connected(trust_root(pem(self.ca)))
        self.assertTrue(replica.pool.ready)
        self.assertEqual(replica.shared_gauge, 1.0)
        limits = Limits(Budget(1, 1), None)
        self.assertTrue((await verdict(replica.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(self.redis.cli("EXISTS", keys("team-a")[0].decode()), "1")

    async def test_a_ca_not_trusted_is_local_not_failed(self) -> None:
        _, other = make_ca("some other CA")
        replica = await self.connected(trust_root(pem(other)))
        self.assertFalse(replica.pool.ready)
        limits = Limits(Budget(1, 1), None)
        self.assertTrue((await verdict(replica.limiter.check("team-a", limits, None))).allowed)
        self.assertFalse((await verdict(replica.limiter.check("team-a", limits, None))).allowed)
        self.assertEqual(self.redis.cli("EXISTS", keys("team-a")[0].decode()), "0")
