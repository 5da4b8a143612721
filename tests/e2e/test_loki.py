"""Loki clients through the proxy: python-logging-loki (JSON, insists on 204)
and winston-loki (protobuf + snappy), then the lines read back with
``/loki/api/v1/query_range``. The upstream decodes each push and accepts it
only with the proxy's credentials."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlencode

from twisted.trial.unittest import TestCase

from ..support.helpers import ORG, call
from .clients import python_logging_loki, winston_loki
from .peers import fake_cloud_behind_proxy
from .upstream import FakeCloud

LINES = ["first line", 'quotes " and \\ backslash', "unicode: héllo ✓ 日本"]


class LokiPushTests(TestCase):
    timeout = 90

    async def _stack(self) -> tuple[FakeCloud, str, str]:
        return await fake_cloud_behind_proxy(self, "loki")

    async def _query_back(self, proxy: str, run_id: str) -> list[str]:
        params = urlencode(
            {
                "query": f'{{run="{run_id}"}}',
                "start": str(int((time.time() - 300) * 1e9)),
                "end": str(int((time.time() + 60) * 1e9)),
                "limit": "100",
                "direction": "forward",
            }
        )
        response, body = await call(f"{proxy}/loki/api/v1/query_range?{params}")
        self.assertEqual(response.code, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["data"]["resultType"], "streams")
        return [value[1] for stream in doc["data"]["result"] for value in stream["values"]]

    async def test_python_logging_loki_json_push(self) -> None:
        cloud, direct, proxy = await self._stack()
        run_id = uuid.uuid4().hex[:12]
        tags = {"app": "lgmt-e2e", "run": run_id}

        errors = await python_logging_loki(f"{proxy}/loki/api/v1/push", tags, LINES)
        # Its handler raises on anything but 204: the proxy passed 204 through.
        if errors:
            self.fail(
                f"python-logging-loki failed through the proxy (the upstream refused "
                f"{len(cloud.rejected)} pushes): {errors}"
            )

        pushes = [s for s in cloud.seen if s.method == b"POST"]
        self.assertEqual(len(pushes), len(LINES))
        for push in pushes:
            self.assertEqual(push.header(b"Content-Type"), [b"application/json"])
            self.assertEqual(push.header(b"X-Scope-OrgID"), [ORG["loki"].encode()])
        self.assertEqual([log.line for log in cloud.logs], LINES)
        for log in cloud.logs:
            self.assertEqual(log.encoding, "json")
            self.assertEqual((log.labels["app"], log.labels["run"]), ("lgmt-e2e", run_id))
            self.assertEqual(log.labels["severity"], "info")
        self.assertEqual(await self._query_back(proxy, run_id), LINES)

        # The same client straight at the upstream, without the proxy: refused.
        refused = len(cloud.rejected)
        errors = await python_logging_loki(f"{direct}/loki/api/v1/push", tags, LINES[:1])
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("401", errors[0])
        self.assertEqual(len(cloud.rejected), refused + 1)

    async def test_winston_loki_snappy_protobuf_push(self) -> None:
        cloud, direct, proxy = await self._stack()
        run_id = uuid.uuid4().hex[:12]
        labels = {"app": "lgmt-e2e-node", "run": run_id}

        started = time.time_ns() // 10**6 * 10**6  # the client stamps in milliseconds
        code, out = await winston_loki(proxy, labels, LINES)
        ended = time.time_ns()
        self.assertEqual(code, 0, f"winston-loki failed through the proxy:\n{out}")

        pushes = [s for s in cloud.seen if s.method == b"POST"]
        self.assertEqual(len(pushes), 1, "winston-loki batches every line into one push")
        self.assertEqual(pushes[0].header(b"Content-Type"), [b"application/x-protobuf"])
        self.assertEqual(pushes[0].header(b"X-Scope-OrgID"), [ORG["loki"].encode()])
        self.assertEqual([log.line for log in cloud.logs], LINES)
        for log in cloud.logs:
            self.assertEqual(log.encoding, "protobuf")
            self.assertEqual(log.labels, {"level": "info", **labels})
            # In nanoseconds, stamped while the client ran.
            self.assertTrue(started <= log.ts <= ended, (started, log.ts, ended))
        self.assertEqual(await self._query_back(proxy, run_id), LINES)

        # Straight at the upstream, without the proxy: the push is refused.
        code, out = await winston_loki(direct, labels, LINES[:1])
        self.assertEqual(code, 1, out)
        self.assertIn("401", out)
