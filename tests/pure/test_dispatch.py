"""The dispatch decision (pure): its checks in order, and what each decision
carries for the record."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.clientauth import parse_client_auth
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.limits.budget import Budget, Limits
from lgmt_proxy.rules.dispatch import Proxy, Refuse, ServeLocal, Tunnel, decide, read_target
from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.policy import Policy
from lgmt_proxy.rules.routes import Local, Proxied, Route

ROUTE = Proxied(Route(b"/loki", b"/loki", "loki"), object())
TENANTS = Proxied(Route(b"/m", b"/m", "m", tenant_from_consumer=True), object())
METRICS = Local(object(), quiet=True, consumers_only=True)
AUTH = parse_client_auth(
    'consumers: [{name: a, token: "aaaaaaaaaaaaaaaaaaaa", tenant: [t1, t2], '
    'allow: [{methods: [GET], paths: ["/loki/*", "/m/*", "/metrics"]}]}]'
)
GOOD = [b"Bearer aaaaaaaaaaaaaaaaaaaa"]


def request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> Incoming:
    req = Incoming(0.0)
    req.method = method
    req.headers = headers
    assert req.read_head() is None
    req.path = path
    return req


def auth_headers(values: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", v) for v in values]


class DecideTests(TestCase):
    def test_target_rules(self) -> None:
        self.assertEqual(read_target(b"GET", b"/loki/x?q"), (b"/loki/x", b"q"))
        with self.assertRaises(Refusal) as caught:
            read_target(b"CONNECT", b"example.com:443")
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("CONNECT", caught.exception.message)

    def test_without_client_auth(self) -> None:
        get = request(b"GET", b"/loki/x", [])
        self.assertEqual(decide(get, ROUTE, Policy(), None), Proxy())
        self.assertEqual(decide(get, METRICS, Policy(), None), ServeLocal())
        ws = request(b"GET", b"/loki/x", [(b"Upgrade", b"WebSocket")])
        self.assertEqual(decide(ws, ROUTE, Policy(), None), Tunnel())
        # A POST asking for a WebSocket is no WebSocket handshake.
        post = request(b"POST", b"/loki/x", [(b"Upgrade", b"websocket")])
        self.assertEqual(decide(post, ROUTE, Policy(), None), Proxy())

    def test_two_hosts_first_on_every_path(self) -> None:
        two = request(b"TRACE", b"/loki/x", [(b"Host", b"a"), (b"host", b"b")])
        for match in (ROUTE, METRICS, Local(object())):
            refused = decide(two, match, Policy(), AUTH.authenticate)
            assert isinstance(refused, Refuse)
            self.assertEqual((refused.refusal.status, refused.routed), (400, False))

    def test_policy_before_client_auth(self) -> None:
        trace = request(b"TRACE", b"/loki/x", [])
        refused = decide(trace, ROUTE, Policy(), AUTH.authenticate)
        assert isinstance(refused, Refuse)
        self.assertEqual(
            (refused.refusal.status, refused.consumer, refused.routed), (405, None, True)
        )

    def test_client_auth_in_order(self) -> None:
        cases = [
            (request(b"GET", b"/loki/x", []), 401, None),
            (request(b"POST", b"/loki/x", auth_headers(GOOD)), 403, "a"),
            (request(b"GET", b"/other", auth_headers(GOOD)), 403, "a"),
        ]
        for req, status, consumer in cases:
            refused = decide(req, ROUTE, Policy(), AUTH.authenticate)
            assert isinstance(refused, Refuse), req.path
            self.assertEqual((refused.refusal.status, refused.consumer), (status, consumer))
        unauthenticated = decide(cases[0][0], ROUTE, Policy(), AUTH.authenticate)
        assert isinstance(unauthenticated, Refuse)
        self.assertIn((b"WWW-Authenticate",), [h[:1] for h in unauthenticated.refusal.headers])
        ok = request(b"GET", b"/loki/x", auth_headers(GOOD))
        self.assertEqual(decide(ok, ROUTE, Policy(), AUTH.authenticate), Proxy("a"))

    def test_tenant_then_budgets_carried(self) -> None:
        """The decision carries the consumer's budgets: the caller asks them
        last (they may answer later, from Redis)."""
        asked = request(b"GET", b"/m/x", [*auth_headers(GOOD), (b"X-Scope-OrgID", b"t2")])
        self.assertEqual(decide(asked, TENANTS, Policy(), AUTH.authenticate), Proxy("a", b"t2"))
        foreign = request(b"GET", b"/m/x", [*auth_headers(GOOD), (b"X-Scope-OrgID", b"t9")])
        refused = decide(foreign, TENANTS, Policy(), AUTH.authenticate)
        assert isinstance(refused, Refuse)
        self.assertEqual((refused.refusal.status, refused.tenant), (403, None))
        limited = parse_client_auth(
            'consumers: [{name: b, token: "bbbbbbbbbbbbbbbbbbbb", tenant: t1, '
            "rate_limit: {requests_per_second: 2, bytes_per_second: 100}, "
            'allow: [{paths: ["/*"]}]}]'
        )
        req = request(b"GET", b"/m/x", auth_headers([b"Bearer bbbbbbbbbbbbbbbbbbbb"]))
        decision = decide(req, TENANTS, Policy(), limited.authenticate)
        self.assertEqual(decision, Proxy("b", b"t1", Limits(Budget(2, 2), Budget(100, 100))))
        ws = request(b"GET", b"/loki/x", [(b"Upgrade", b"websocket")])
        ws.headers += auth_headers([b"Bearer bbbbbbbbbbbbbbbbbbbb"])
        ws.authorization = [b"Bearer bbbbbbbbbbbbbbbbbbbb"]
        tunnel = decide(ws, ROUTE, Policy(), limited.authenticate)
        assert isinstance(tunnel, Tunnel)
        self.assertEqual(tunnel.limits.requests, Budget(2, 2))

    def test_metrics_names_consumers_only_to_them(self) -> None:
        anonymous = request(b"GET", b"/metrics", [])
        refused = decide(anonymous, METRICS, Policy(), AUTH.authenticate)
        assert isinstance(refused, Refuse)
        self.assertEqual(refused.refusal.status, 401)
        known = request(b"GET", b"/metrics", auth_headers(GOOD))
        self.assertEqual(decide(known, METRICS, Policy(), AUTH.authenticate), ServeLocal("a"))
        # Other local paths ask nobody.
        self.assertEqual(
            decide(anonymous, Local(object()), Policy(), AUTH.authenticate), ServeLocal()
        )
