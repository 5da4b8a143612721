"""In-memory tests where no socket is needed: the operations resources through
treq's StubTreq, and the stalled-body rule on a fake clock."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter
from treq.testing import StubTreq
from twisted.trial.unittest import TestCase

from lgmt_proxy.obs.ops import Readiness, admin_root
from tests.support.memory import MemoryProxy


class OpsResourceTests(TestCase):
    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        Counter("proxy_example", "x", registry=self.registry).inc(3)
        self.readiness = Readiness()
        self.treq = StubTreq(admin_root(self.readiness, self.registry))

    async def test_health_and_ready(self) -> None:
        r = await self.treq.get("http://proxy/health")
        self.assertEqual((r.code, json.loads(await r.content())), (200, {"status": "ok"}))
        r = await self.treq.get("http://proxy/ready")
        self.assertEqual(r.code, 200)
        self.readiness.draining = True
        r = await self.treq.get("http://proxy/ready")
        self.assertEqual((r.code, json.loads(await r.content())), (503, {"status": "draining"}))
        r = await self.treq.get("http://proxy/health")
        self.assertEqual(r.code, 200)

    async def test_metrics_text(self) -> None:
        r = await self.treq.get("http://proxy/metrics")
        self.assertEqual(r.code, 200)
        self.assertIn(b"proxy_example_total 3.0", await r.content())

    async def test_other_methods_405_json(self) -> None:
        r = await self.treq.post("http://proxy/health", data=b"x")
        self.assertEqual(r.code, 405)
        self.assertEqual(json.loads(await r.content())["error"], "method not allowed")

    async def test_other_paths_404(self) -> None:
        r = await self.treq.get("http://proxy/loki/api/v1/push")
        self.assertEqual(r.code, 404)


class StalledBodyTests(TestCase):
    def test_stalled_upload_cut_with_408(self) -> None:
        proxy = MemoryProxy(UPSTREAM_TIMEOUT_SECONDS="5", CLIENT_IDLE_TIMEOUT_SECONDS="60")
        proto, transport = proxy.connect()
        proto.dataReceived(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\nfirst"
        )
        ((signal, method, _target, _headers),) = proxy.calls()
        self.assertEqual((signal, method), ("loki", b"POST"))
        proxy.clock.advance(4)
        proto.dataReceived(b"more")  # activity resets the silence timer
        proxy.clock.advance(4)
        self.assertEqual(transport.value(), b"")
        proxy.clock.advance(1.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_no_headers_in_time_504(self) -> None:
        proxy = MemoryProxy(UPSTREAM_TIMEOUT_SECONDS="30")
        proto, transport = proxy.connect()
        proto.dataReceived(b"GET /tempo/api/search HTTP/1.1\r\nHost: p\r\n\r\n")
        proxy.clock.advance(29.9)
        self.assertEqual(transport.value(), b"")
        proxy.clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "), transport.value())
        self.assertIn(b'"upstream": "tempo"', transport.value())
