"""Prometheus on both sides: a scraping Prometheus with no credentials
remote-writes through the proxy into a Prometheus that demands Basic auth
(bcrypt, ``--web.config.file``); promtool, Grafana-style ``query_range`` (GET)
and ``query`` (POST form) read the series back through the proxy."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import FailTest, TestCase

from ..support.helpers import ORG, TOKEN, basic, call
from .peers import (
    FAST_QUEUE,
    agent_config,
    need_binary,
    need_modules,
    poll,
    run,
    start_prometheus,
    start_proxy,
)


async def _query(url: str, expr: str, headers: Any = None) -> tuple[int, Any]:
    response, body = await call(
        url + "/api/v1/query?" + urlencode({"query": expr}), headers=headers
    )
    try:
        doc = json.loads(body)
    except ValueError:
        doc = body.decode(errors="replace")
    return response.code, doc


async def _remote_write_failures(port: int) -> float:
    """Samples the agent failed to remote-write (non-retryable answers such as 401)."""
    _, body = await call(f"http://127.0.0.1:{port}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("prometheus_remote_storage_samples_failed_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class PrometheusRemoteWriteTests(TestCase):
    timeout = 120

    async def test_remote_write_through_proxy_then_query_back(self) -> None:
        need_binary("prometheus")
        promtool = need_binary("promtool")
        need_modules("bcrypt")
        import bcrypt

        run_id = uuid.uuid4().hex[:12]
        token_hash = bcrypt.hashpw(TOKEN.encode(), bcrypt.gensalt(rounds=6)).decode()

        # The upstream: a remote-write receiver that only answers to ORG:TOKEN.
        upstream = await start_prometheus(
            self,
            "upstream",
            {"global": {"scrape_interval": "1m"}},
            route_prefix="/api/prom",
            basic_auth_users={ORG["prometheus"]: token_hash},
            auth_header=basic(ORG["prometheus"]),
            remote_write_receiver=True,
        )
        proxy = await start_proxy(self, {"prometheus": f"http://127.0.0.1:{upstream.port}"})

        # The agent: scrapes the proxy's own /metrics every second and remote-writes to
        # the proxy with no credentials of its own.
        agent = await start_prometheus(
            self,
            "agent",
            agent_config(
                run_id,
                f"127.0.0.1:{proxy.port}",
                [{"url": f"{proxy.url}/api/prom/api/v1/write", "queue_config": FAST_QUEUE}],
            ),
        )
        expr = f'up{{job="lgmt-proxy",e2e_run="{run_id}"}}'

        # Without the proxy the upstream refuses the very same query.
        code, doc = await _query(upstream.url, expr)
        self.assertEqual(code, 401, f"the upstream Prometheus must demand credentials: {doc}")

        # The series arrive at the upstream: only the injected credentials could
        # have written them. A refused remote write fails at once.
        async def pushed() -> Any:
            code, doc = await _query(upstream.url, expr, upstream.headers)
            self.assertEqual(code, 200, doc)
            if doc["data"]["result"]:
                return doc["data"]["result"]
            refused = await _remote_write_failures(agent.port)
            if refused:
                raise FailTest(
                    f"the agent's remote writes through the proxy were refused "
                    f"({refused:g} samples failed):\n{agent.child.tail()}"
                )
            return None

        await poll(f"{expr} to arrive by remote write", pushed, timeout=60)

        # ... and read back through the proxy, as Grafana's data source would.
        code, doc = await _query(proxy.url + "/prometheus", expr)
        self.assertEqual(code, 200, doc)
        result = doc["data"]["result"]
        self.assertEqual(len(result), 1, doc)
        self.assertEqual(result[0]["metric"]["instance"], f"127.0.0.1:{proxy.port}")
        self.assertEqual(result[0]["value"][1], "1")

        # promtool, the CLI of the same release, through the proxy.
        code, out = await run(
            "promtool", [promtool, "query", "instant", proxy.url + "/prometheus", expr], timeout=30
        )
        self.assertEqual(code, 0, out)
        self.assertIn(f'e2e_run="{run_id}"', out)
        self.assertIn("=> 1 @", out)
        # ... and straight at the upstream, without the proxy's credentials: refused.
        code, out = await run(
            "promtool", [promtool, "query", "instant", upstream.url, expr], timeout=30
        )
        self.assertNotEqual(code, 0, out)
        self.assertIn("401", out)

        # Grafana's range query: GET with the parameters in the query string.
        now = time.time()
        params = urlencode(
            {"query": expr, "start": f"{now - 120:.3f}", "end": f"{now:.3f}", "step": "1"}
        )
        response, body = await call(f"{proxy.url}/prometheus/api/v1/query_range?{params}")
        self.assertEqual(response.code, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["data"]["resultType"], "matrix")
        self.assertEqual(len(doc["data"]["result"]), 1, doc)
        self.assertGreaterEqual(len(doc["data"]["result"][0]["values"]), 1)
        response, body = await call(
            f"http://127.0.0.1:{upstream.port}/api/prom/api/v1/query_range?{params}"
        )
        self.assertEqual(response.code, 401, body)

        # Grafana's instant query: POST, form-encoded. The proxy's own counter of
        # the remote writes it forwarded comes back the same way it went.
        counter = (
            f'sum(proxy_requests_total{{e2e_run="{run_id}",upstream="prometheus",method="POST"}})'
        )
        form_headers = {b"Content-Type": [b"application/x-www-form-urlencoded"]}

        def form() -> bytes:
            return urlencode({"query": counter, "time": f"{time.time():.3f}"}).encode()

        async def forwarded() -> Any:
            response, body = await call(
                proxy.url + "/prometheus/api/v1/query", b"POST", form_headers, form()
            )
            if response.code != 200:
                raise FailTest(f"POST query through the proxy answered {response.code}: {body!r}")
            result = json.loads(body)["data"]["result"]
            return result or None

        result = await poll("the proxy's own request counter", forwarded, timeout=30)
        self.assertGreaterEqual(float(result[0]["value"][1]), 1.0)
        response, body = await call(
            f"http://127.0.0.1:{upstream.port}/api/prom/api/v1/query", b"POST", form_headers, form()
        )
        self.assertEqual(response.code, 401, body)
