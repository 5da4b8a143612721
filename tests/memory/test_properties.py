"""Property tests (hypothesis) and a fuzz run over the request parser, in
memory: the real factory on MemoryReactorClock fed raw bytes through a
StringTransport, its upstream connections on StringTransports too (tests/support/memory.py)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from lgmt_proxy.rules.headers import HOP_BY_HOP, forward_request_headers
from lgmt_proxy.rules.routes import DEFAULT_ROUTES, Refusal, Route, split_target
from tests.support.helpers import ORG, basic
from tests.support.memory import MemoryProxy

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


segment = st.one_of(
    st.sampled_from(
        [
            ".",
            "..",
            "%2e",
            "%2E%2e",
            ".%2e",
            "%2f",
            "%2F",
            "a%2fb",
            "%5c",
            "api",
            "v1",
            "query",
            "",
            "x.y",
            "..a",
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~%", min_size=0, max_size=8),
)
prefixes = st.sampled_from(
    ["/api/prom", "/prometheus", "/loki", "/tempo", "/otlp", "/lokix", "/api", ""]
)
query = st.one_of(st.none(), st.text(alphabet="abcdefghij=&%2e./+:", max_size=20))
_DOTS = re.compile(rb"(^|/)\.{1,2}(/|$)")


class PropertyTests(TestCase):
    @SETTINGS
    @given(prefix=prefixes, segments=st.lists(segment, max_size=5), q=query)
    def test_upstream_target_stays_under_its_prefix(
        self, prefix: str, segments: list[str], q: str | None
    ) -> None:
        target = (prefix + "/" + "/".join(segments)).encode()
        if q is not None:
            target += b"?" + q.encode()
        proxy = MemoryProxy()
        proxy.send(b"GET " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n")
        calls = proxy.calls()
        try:
            path, sent_query = split_target(target)
        except Refusal:
            self.assertEqual(calls, [])
            return
        route = next(
            (r for r in DEFAULT_ROUTES if path == r.prefix or path.startswith(r.prefix + b"/")),
            None,
        )
        if route is None:
            self.assertEqual(calls, [])
            return
        ((signal, _, uri, headers),) = calls
        self.assertEqual(signal, route.upstream_name)
        upstream_path, _, upstream_query = uri.partition(b"?")
        self.assertTrue(upstream_path.startswith(route.upstream_prefix), (target, uri))
        self.assertIsNone(_DOTS.search(unquote_to_bytes(upstream_path)), uri)
        self.assertNotIn(b"%2f", upstream_path.lower())
        if sent_query is not None:
            self.assertEqual(upstream_query, sent_query)
        self.assertEqual(headers.getRawHeaders(b"authorization"), [basic(ORG[signal])])
        self.assertEqual(headers.getRawHeaders(b"x-scope-orgid"), [ORG[signal].encode()])

    @SETTINGS
    @given(
        names=st.lists(
            st.one_of(
                st.sampled_from(
                    sorted(
                        n.decode()
                        for n in HOP_BY_HOP
                        | {b"authorization", b"x-scope-orgid", b"expect", b"host"}
                    )
                ),
                st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10),
            ),
            max_size=12,
        ),
        listed=st.lists(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10), max_size=4
        ),
    )
    def test_no_hop_by_hop_header_survives(self, names: list[str], listed: list[str]) -> None:
        incoming = [(name.encode(), b"v") for name in names]
        incoming.append((b"Connection", ", ".join(listed).encode()))
        pairs = forward_request_headers(
            incoming, host=b"h", authorization=b"Basic x", tenant=b"t", client_address=b"1.2.3.4"
        )
        out = Headers()
        for n, v in pairs:
            out.addRawHeader(n, v)
        present = {n.lower() for n, _ in out.getAllRawHeaders()}
        self.assertFalse(present & HOP_BY_HOP)
        self.assertFalse(
            present
            & {n.encode() for n in listed}
            - {b"host", b"authorization", b"x-scope-orgid", b"x-forwarded-for"}
        )
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Basic x"])
        self.assertEqual(out.getRawHeaders(b"x-scope-orgid"), [b"t"])
        self.assertNotIn(b"expect", present)


_VALID = [
    b"GET /prometheus/api/v1/query?query=up HTTP/1.1\r\nHost: p\r\n\r\n",
    b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /otlp/v1/traces HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: p\r\n\r\n",
]


class _Errors:
    """Collects error-level log events (failures included) while active."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if event.get("log_failure") is not None or (level is not None and level >= LogLevel.error):
            self.events.append(formatEvent(event) + " " + repr(event.get("log_failure")))

    def __enter__(self) -> _Errors:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


class FuzzTests(TestCase):
    @settings(max_examples=500, deadline=None)
    @given(
        base=st.sampled_from(_VALID),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4),
        inserts=st.lists(
            st.tuples(st.integers(min_value=0, max_value=200), st.binary(max_size=6)), max_size=4
        ),
        split=st.integers(min_value=1, max_value=64),
    )
    def test_mutated_requests_never_crash_or_hang(
        self, base: bytes, cuts: list[int], inserts: list[tuple[int, bytes]], split: int
    ) -> None:
        data = bytearray(base)
        for at in cuts:
            if data:
                del data[at % len(data)]
        for at, blob in inserts:
            data[at % (len(data) + 1) : at % (len(data) + 1)] = blob
        proxy = MemoryProxy(
            CLIENT_HEADER_TIMEOUT_SECONDS="1",
            UPSTREAM_TIMEOUT_SECONDS="2",
            CLIENT_IDLE_TIMEOUT_SECONDS="2.5",
        )
        raw = bytes(data)
        with _Errors() as errors:
            proto, transport = proxy.connect()
            for i in range(0, len(raw), split):  # delivered in pieces, as a network would
                proto.dataReceived(raw[i : i + split])
            # Whatever it was, within the timeouts the proxy answered or hung up
            # (a stalled body is cut by the idle timeout, a stalled head by the head one).
            proxy.clock.advance(3)
            proxy.clock.advance(3)
        written = transport.value()
        self.assertTrue(
            transport.disconnecting or written.startswith(b"HTTP/1.1 ") or not raw.strip(),
            (raw, written[:80]),
        )
        if written:
            self.assertTrue(written.startswith(b"HTTP/1.1 "), written[:80])
        self.assertEqual(errors.events, [])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes(self, raw: bytes) -> None:
        proxy = MemoryProxy(CLIENT_HEADER_TIMEOUT_SECONDS="1")
        with _Errors() as errors:
            proto, _transport = proxy.connect()
            proto.dataReceived(raw)
            proxy.clock.advance(2)
        self.assertEqual(errors.events, [])

    def test_random_target_bytes_go_under_their_route_or_nowhere(self) -> None:
        """Arbitrary bytes after a route's prefix (random ones, and the ones
        that matter to paths): what goes upstream is origin-form, under that
        route's upstream prefix, with no dot segment or encoded slash in it.
        Enough of the inputs must reach an upstream for that to mean anything
        (random bytes alone almost never make a request that is forwarded)."""
        tried: list[bytes] = []
        forwarded: list[bytes] = []
        piece = st.one_of(
            st.binary(max_size=8),
            st.text(alphabet="abcxyz019-_.~%:@!$&'()*+,;=", max_size=8).map(str.encode),
            st.sampled_from(
                [b"..", b".", b"%2e", b"%2E.", b"%2f", b"%5C", b"\\", b"#", b" ", b"?", b"//"]
            ),
        )

        @SETTINGS
        @given(route=st.sampled_from(DEFAULT_ROUTES), pieces=st.lists(piece, max_size=5))
        def check(route: Route, pieces: list[bytes]) -> None:
            target = route.prefix + b"/" + b"/".join(pieces)
            tried.append(target)
            proxy = MemoryProxy()
            with _Errors() as errors:
                proxy.send(b"GET " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n")
            self.assertEqual(errors.events, [])
            for signal, _, uri, _ in proxy.calls():
                forwarded.append(uri)
                self.assertEqual(signal, route.upstream_name, (target, uri))
                path = uri.partition(b"?")[0]
                self.assertTrue(path.startswith(route.upstream_prefix + b"/"), (target, uri))
                self.assertIsNone(_DOTS.search(unquote_to_bytes(path)), (target, uri))
                self.assertNotIn(b"%2f", path.lower())

        check()
        # About a quarter are forwarded; under a tenth means the inputs changed.
        self.assertGreaterEqual(
            len(forwarded) * 10, len(tried), f"{len(forwarded)} of {len(tried)} forwarded"
        )
