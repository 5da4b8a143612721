"""Per-consumer tenants (issue 13) end to end: one scraping Prometheus
remote-writes through the proxy as two consumers (two ``remote_write``
queues, each with its own Bearer token; the second has a list of tenants and
gets its first). The proxy's one ``tenant: from_consumer`` route forwards to a tenant router shaped like Mimir's
gateway: it sends each request to the real Prometheus receiver of the
``X-Scope-OrgID`` it got and refuses any other (Prometheus alone does not
look at the header). Each receiver must hold exactly its consumer's series.
Choosing another tenant of the list with the client's own ``X-Scope-OrgID``
is done with a plain request: Debian's Prometheus 2.42 does not send the
``headers`` of its ``remote_write`` configuration."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import FailTest, TestCase
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource

from ..support.helpers import ProxyProcess, call, free_port, listen, spawn_proxy, upstream_site
from .peers import FAST_QUEUE, agent_config, need_binary, poll, start_prometheus, temp_dir

TOKEN_A = "team-a-token-0123456789"
TOKEN_B = "platform-token-0123456789"


class TenantRouter(Resource):
    """``X-Scope-OrgID`` -> the receiver of that tenant; none or unknown: 401."""

    isLeaf = True

    def __init__(self, receivers: dict[bytes, int]) -> None:
        super().__init__()
        self.receivers = receivers
        self.seen: list[bytes | None] = []
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> Any:
        values = request.requestHeaders.getRawHeaders(b"x-scope-orgid")
        tenant = values[0] if values and len(values) == 1 else None
        self.seen.append(tenant)
        request.content.seek(0)
        self.bodies.append(request.content.read())
        port = self.receivers.get(tenant or b"")
        if port is None:
            request.setResponseCode(401)
            return b"no such tenant\n"
        return ReverseProxyResource("127.0.0.1", port, request.path).render(request)


async def _series(url: str, expr: str) -> list[dict[str, Any]]:
    response, body = await call(url + "/api/v1/query?" + urlencode({"query": expr}))
    if response.code != 200:
        raise FailTest(f"query {expr} at {url}: {response.code} {body!r}")
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


class TenantTests(TestCase):
    timeout = 120

    async def test_two_consumers_each_reach_their_own_tenant(self) -> None:
        need_binary("prometheus")
        run_id = uuid.uuid4().hex[:12]
        receiver_a = await start_prometheus(
            self,
            "tenant-a",
            {"global": {"scrape_interval": "1m"}},
            route_prefix="/api/prom",
            remote_write_receiver=True,
        )
        receiver_b = await start_prometheus(
            self,
            "tenant-b2",
            {"global": {"scrape_interval": "1m"}},
            route_prefix="/api/prom",
            remote_write_receiver=True,
        )
        router = TenantRouter({b"a": receiver_a.port, b"b2": receiver_b.port})
        router_port = listen(upstream_site(router))
        self.addCleanup(router_port.stopListening)

        directory = temp_dir(self, "tenants")
        routes = os.path.join(directory, "routes.yaml")
        with open(routes, "w") as f:
            json.dump(
                {
                    "routes": [
                        {
                            "name": "mimir",
                            "prefix": "/api/prom",
                            "upstream": f"http://127.0.0.1:{router_port.getHost().port}",
                            "tenant": "from_consumer",
                        }
                    ]
                },
                f,
            )
        clients = os.path.join(directory, "clients.yaml")
        with open(clients, "w") as f:
            json.dump(
                {
                    "consumers": [
                        {
                            "name": "team-a",
                            "token": TOKEN_A,
                            "allow": [{"methods": ["POST"], "paths": ["/api/prom/*"]}],
                            "tenant": "a",
                        },
                        {
                            "name": "platform",
                            "token": TOKEN_B,
                            "allow": [{"methods": ["POST"], "paths": ["/api/prom/*"]}],
                            "tenant": ["b2", "b"],
                        },
                    ]
                },
                f,
            )
        admin = free_port()
        proxy: ProxyProcess = await spawn_proxy(
            {
                "ROUTES_FILE": routes,
                "CLIENT_AUTH_FILE": clients,
                "SHUTDOWN_DELAY_SECONDS": "0",
                "SHUTDOWN_GRACE_SECONDS": "2",
                "LOG_LEVEL": "warn",
            },
            f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
        )

        self.addCleanup(proxy.stop)
        if proxy.ended.called:
            raise FailTest(f"lgmt-proxy did not start:\n{proxy.output.decode()}")

        def queue(token: str, via: str) -> dict[str, Any]:
            q: dict[str, Any] = {
                "url": f"{proxy.url}/api/prom/api/v1/write",
                "authorization": {"type": "Bearer", "credentials": token},
                "write_relabel_configs": [{"target_label": "via", "replacement": via}],
                "queue_config": FAST_QUEUE,
            }
            return q

        agent = await start_prometheus(
            self,
            "agent",
            agent_config(
                run_id, f"127.0.0.1:{admin}", [queue(TOKEN_A, "team-a"), queue(TOKEN_B, "platform")]
            ),
        )
        expr = f'up{{job="lgmt-proxy",e2e_run="{run_id}"}}'

        async def arrived(url: str) -> Any:
            return await _series(url, expr) or None

        in_a = await poll("team-a's series in tenant a", lambda: arrived(receiver_a.url), 60)
        try:
            in_b = await poll("platform's series in tenant b2", lambda: arrived(receiver_b.url), 60)
        except FailTest as e:
            raise FailTest(
                f"{e}\nthe router saw {sorted(set(router.seen))}\n{agent.child.tail()}"
            ) from None
        self.assertEqual({s["metric"]["via"] for s in in_a}, {"team-a"})
        self.assertEqual({s["metric"]["via"] for s in in_b}, {"platform"})
        # Every request the router got carried one of the two tenants.
        self.assertEqual(set(router.seen), {b"a", b"b2"})

        # The platform consumer chooses "b", the other tenant of its list: the
        # router gets it (and has no receiver for it).
        response, _ = await call(
            proxy.url + "/api/prom/api/v1/write",
            b"POST",
            {b"Authorization": [b"Bearer " + TOKEN_B.encode()], b"X-Scope-OrgID": [b"b"]},
            b"chosen-b",
        )
        self.assertEqual(response.code, 401)
        self.assertEqual(router.seen[router.bodies.index(b"chosen-b")], b"b")

        # A tenant outside the consumer's list, or another consumer's: 403 at
        # the proxy, and the router never sees the request.
        for token, tenant in ((TOKEN_B, b"a"), (TOKEN_A, b"b2")):
            marker = b"refused-" + tenant
            response, body = await call(
                proxy.url + "/api/prom/api/v1/write",
                b"POST",
                {b"Authorization": [b"Bearer " + token.encode()], b"X-Scope-OrgID": [tenant]},
                marker,
            )
            self.assertEqual(response.code, 403, body)
            self.assertNotIn(marker, router.bodies)
        self.assertEqual(set(router.seen), {b"a", b"b2", b"b"})
