"""Read paths as Grafana uses them, from a plain HTTP client (the standard
library's http.client, in a thread): Loki ``query_range``, Tempo search and
trace by id. The upstream answers only with the proxy's credentials, gets the
query string byte for byte, and its answers (404 included) come back intact."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ..support.helpers import ORG, basic, listen, upstream_site
from .peers import start_proxy
from .upstream import FakeCloud, LogLine, Span

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def _get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", target, headers={"Accept": "application/json"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


async def get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    return await deferToThread(_get, port, target)


class ReadPathTests(TestCase):
    timeout = 60

    async def _stack(self) -> tuple[FakeCloud, int, int]:
        cloud = FakeCloud()
        now = time.time_ns()
        labels = {"app": "checkout", "env": "prod"}
        cloud.logs += [
            LogLine(labels, now - 2_000_000_000, "GET /cart 200", "json"),
            LogLine(labels, now - 1_000_000_000, "POST /pay 502 ✗", "json"),
            LogLine({"app": "other"}, now, "not this one", "json"),
        ]
        cloud.spans += [
            Span(TRACE_ID, "b7ad6b7169203331", "", "GET /cart", "checkout", now - 10**9, now),
            Span(TRACE_ID, "00f067aa0ba902b7", "b7ad6b7169203331", "SELECT", "db", now - 9**9, now),
        ]
        port = listen(upstream_site(cloud))
        self.addCleanup(port.stopListening)
        proxy = await start_proxy(
            self,
            {
                "loki": f"http://127.0.0.1:{port.getHost().port}",
                "tempo": f"http://127.0.0.1:{port.getHost().port}",
            },
        )
        return cloud, proxy.port, port.getHost().port

    def _assert_credentials(self, cloud: FakeCloud, signal: str) -> None:
        self.assertTrue(cloud.seen)
        for seen in cloud.seen:
            self.assertEqual(seen.header(b"Authorization"), [basic(ORG[signal])])
            self.assertEqual(seen.header(b"X-Scope-OrgID"), [ORG[signal].encode()])

    async def test_loki_query_range(self) -> None:
        cloud, proxy, direct = await self._stack()
        start, end = time.time_ns() - 3600 * 10**9, time.time_ns() + 10**9
        # As Grafana encodes it: the selector percent-encoded, more parameters after.
        query = (
            "query=%7Bapp%3D%22checkout%22%2Cenv%3D%22prod%22%7D"
            f"&limit=1000&start={start}&end={end}&step=2&direction=backward"
        )
        status, headers, body = await get(proxy, "/loki/api/v1/query_range?" + query)
        self.assertEqual(status, 200, body)
        self.assertEqual(headers.get("Content-Type"), "application/json")
        doc = json.loads(body)
        self.assertEqual(doc["status"], "success")
        (stream,) = doc["data"]["result"]
        self.assertEqual(stream["stream"], {"app": "checkout", "env": "prod"})
        self.assertEqual([v[1] for v in stream["values"]], ["GET /cart 200", "POST /pay 502 ✗"])
        self.assertEqual(cloud.seen[-1].uri, b"/loki/api/v1/query_range?" + query.encode())
        self._assert_credentials(cloud, "loki")

        status, _, body = await get(direct, "/loki/api/v1/query_range?" + query)
        self.assertEqual(status, 401, body)

    async def test_tempo_search_and_trace_by_id(self) -> None:
        cloud, proxy, direct = await self._stack()
        search = "/tempo/api/search?tags=service.name%3Dcheckout&limit=20&start=0&end=4102444800"
        status, _, body = await get(proxy, search)
        self.assertEqual(status, 200, body)
        traces: list[dict[str, Any]] = json.loads(body)["traces"]
        self.assertEqual(
            [(t["traceID"], t["rootTraceName"]) for t in traces], [(TRACE_ID, "GET /cart")]
        )
        self.assertEqual(cloud.seen[-1].uri, search.encode())

        status, _, body = await get(proxy, f"/tempo/api/traces/{TRACE_ID}")
        self.assertEqual(status, 200, body)
        batches = json.loads(body)["batches"]
        services = {b["resource"]["attributes"][0]["value"]["stringValue"] for b in batches}
        names = {s["name"] for b in batches for ss in b["scopeSpans"] for s in ss["spans"]}
        self.assertEqual((services, names), ({"checkout", "db"}, {"GET /cart", "SELECT"}))

        # Tempo's 404 for an unknown trace comes back as it was sent.
        status, headers, body = await get(proxy, "/tempo/api/traces/" + "f" * 32)
        self.assertEqual(
            (status, headers.get("Content-Type"), body), (404, "text/plain", b"trace not found")
        )
        self._assert_credentials(cloud, "tempo")

        for target in (search, f"/tempo/api/traces/{TRACE_ID}"):
            status, _, body = await get(direct, target)
            self.assertEqual(status, 401, body)
