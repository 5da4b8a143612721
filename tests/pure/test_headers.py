"""Every rule of the contract's Headers section, on the pure functions."""

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from lgmt_proxy.rules.headers import (
    HOP_BY_HOP,
    forward_request_headers,
    head_lines,
    response_headers,
    response_lines,
)


def fwd(pairs: list[tuple[bytes, bytes]]) -> Headers:
    out = forward_request_headers(
        pairs,
        host=b"up.example",
        authorization=b"Basic b3JnOnRvaw==",
        tenant=b"t1",
        client_address=b"10.1.2.3",
    )
    return as_headers(out)


def as_headers(pairs: list[tuple[bytes, bytes]]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


class RequestHeaderTests(TestCase):
    def test_credentials_injected_and_client_ones_dropped(self) -> None:
        out = fwd(
            [
                (b"Authorization", b"Bearer client"),
                (b"X-Scope-OrgID", b"evil"),
                (b"x-scope-orgid", b"evil2"),
            ]
        )
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Basic b3JnOnRvaw=="])
        self.assertEqual(out.getRawHeaders(b"x-scope-orgid"), [b"t1"])

    def test_host_is_upstream(self) -> None:
        out = fwd([(b"Host", b"proxy.local:8085")])
        self.assertEqual(out.getRawHeaders(b"host"), [b"up.example"])

    def test_x_forwarded_for(self) -> None:
        self.assertEqual(fwd([]).getRawHeaders(b"x-forwarded-for"), [b"10.1.2.3"])
        out = fwd([(b"X-Forwarded-For", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"1.1.1.1, 2.2.2.2, 10.1.2.3"])

    def test_hop_by_hop_dropped(self) -> None:
        names = [
            b"Connection",
            b"Keep-Alive",
            b"Proxy-Authorization",
            b"Proxy-Connection",
            b"TE",
            b"Trailer",
            b"Transfer-Encoding",
            b"Upgrade",
            b"Expect",
            b"Content-Length",
        ]
        out = fwd([(n, b"x") for n in names] + [(b"Accept", b"*/*")])
        for n in names:
            self.assertFalse(out.hasHeader(n), n)
        self.assertEqual(out.getRawHeaders(b"accept"), [b"*/*"])

    def test_connection_listed_dropped(self) -> None:
        out = fwd(
            [
                (b"Connection", b"keep-alive, X-Secret , x-other"),
                (b"X-Secret", b"1"),
                (b"X-Other", b"2"),
                (b"X-Kept", b"3"),
            ]
        )
        self.assertFalse(out.hasHeader(b"x-secret"))
        self.assertFalse(out.hasHeader(b"x-other"))
        self.assertEqual(out.getRawHeaders(b"x-kept"), [b"3"])

    def test_repeated_headers_keep_every_value(self) -> None:
        out = fwd([(b"X-Multi", b"a"), (b"X-Multi", b"b"), (b"Cookie", b"c=1")])
        self.assertEqual(out.getRawHeaders(b"x-multi"), [b"a", b"b"])
        self.assertEqual(out.getRawHeaders(b"cookie"), [b"c=1"])

    def test_nothing_added(self) -> None:
        out = fwd([])
        names = sorted(n.lower() for n, _ in out.getAllRawHeaders())
        self.assertEqual(names, [b"authorization", b"host", b"x-forwarded-for", b"x-scope-orgid"])

    def test_connection_cannot_list_away_an_injected_header(self) -> None:
        # The Connection-listed filter sees the client's headers only: each
        # injected header arrives exactly once whatever Connection names.
        injected = [b"Host", b"Authorization", b"X-Scope-OrgID", b"X-Forwarded-For"]
        for listing in (b"close, host", b"Host", b", ".join(injected), b"keep-alive,x-scope-orgid"):
            raw = forward_request_headers(
                [(b"Connection", listing), (b"Host", b"proxy.local"), (b"Accept", b"*/*")],
                host=b"up.example",
                authorization=b"Basic b3JnOnRvaw==",
                tenant=b"t1",
                client_address=b"10.1.2.3",
            )
            names = sorted(n.lower() for n, _ in raw)
            self.assertEqual(
                names,
                [b"accept", b"authorization", b"host", b"x-forwarded-for", b"x-scope-orgid"],
                listing,
            )
            out = as_headers(raw)
            self.assertEqual(out.getRawHeaders(b"host"), [b"up.example"], listing)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"10.1.2.3"], listing)

    def test_client_headers_never_duplicate_an_injected_one(self) -> None:
        spellings = [b"Host", b"HOST", b"host", b"Authorization", b"X-Scope-OrgID"]
        spellings += [b"X_Scope_OrgID", b"x-scope_orgid", b"AUTHORIZATION", b"Host_"]
        raw = forward_request_headers(
            [(n, b"client") for n in spellings],
            host=b"up.example",
            authorization=b"Basic b3JnOnRvaw==",
            tenant=b"t1",
            client_address=b"10.1.2.3",
        )
        by_dash: dict[bytes, list[bytes]] = {}
        for name, value in raw:
            by_dash.setdefault(name.lower().replace(b"_", b"-"), []).append(value)
        self.assertEqual(by_dash[b"host"], [b"up.example"])
        self.assertEqual(by_dash[b"authorization"], [b"Basic b3JnOnRvaw=="])
        self.assertEqual(by_dash[b"x-scope-orgid"], [b"t1"])
        self.assertEqual(by_dash[b"x-forwarded-for"], [b"10.1.2.3"])
        self.assertEqual(by_dash[b"host-"], [b"client"])  # not a look-alike: kept

    def test_connection_listed_x_forwarded_for_keeps_the_proxys_entry(self) -> None:
        out = fwd([(b"Connection", b"X-Forwarded-For"), (b"X-Forwarded-For", b"6.6.6.6")])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"10.1.2.3"])

    def test_no_injected_credentials_none_from_the_client_either(self) -> None:
        raw = forward_request_headers(
            [(b"Connection", b"host"), (b"Authorization", b"Bearer c"), (b"X-Scope-OrgID", b"9")],
            host=b"up.example",
            authorization=None,
            tenant=None,
            client_address=b"10.1.2.3",
        )
        self.assertEqual(raw, [(b"Host", b"up.example"), (b"X-Forwarded-For", b"10.1.2.3")])


#: Every header the proxy treats specially that has a ``-`` in its name, so
#: a ``_`` spelling that a CGI/WSGI-style upstream would read as it.
SPECIAL_DASHED = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"Proxy-Authorization",
    b"Proxy-Authenticate",
    b"X-Forwarded-For",
    b"X-Forwarded-Host",
    b"X-Forwarded-Proto",
    b"X-Scope-OrgID",
]


class UnderscoreLookAlikeTests(TestCase):
    """Issue 20 item 15: a ``_`` spelling of a framing, hop-by-hop,
    forwarding or injected header never reaches the upstream; other
    underscore names (custom headers) do."""

    def test_every_special_header_look_alike_dropped(self) -> None:
        spellings = []
        for name in SPECIAL_DASHED:
            spellings += [name.replace(b"-", b"_"), name.upper().replace(b"-", b"_")]
            first, _, rest = name.partition(b"-")
            spellings.append(first + b"_" + rest)  # one dash only: Proxy_Connection
            spellings.append(name.lower().replace(b"-", b"_", 1))
        raw = forward_request_headers(
            [(n, b"1") for n in spellings] + [(b"Accept", b"*/*")],
            host=b"up.example",
            authorization=b"Basic b3JnOnRvaw==",
            tenant=b"t1",
            client_address=b"10.1.2.3",
        )
        self.assertEqual(
            sorted(n for n, _ in raw),
            [b"Accept", b"Authorization", b"Host", b"X-Forwarded-For", b"X-Scope-OrgID"],
        )
        self.assertFalse([n for n, _ in raw if b"_" in n])

    def test_framing_look_alikes_dropped_with_a_body(self) -> None:
        out = fwd(
            [
                (b"Transfer_Encoding", b"chunked"),
                (b"Content_Length", b"0"),
                (b"content_length", b"5"),
                (b"X_Forwarded_Host", b"evil.example"),
                (b"X_Forwarded_Proto", b"http"),
                (b"Content-Type", b"application/x-protobuf"),
            ]
        )
        names = sorted(n.lower() for n, _ in out.getAllRawHeaders())
        self.assertEqual(
            names,
            [b"authorization", b"content-type", b"host", b"x-forwarded-for", b"x-scope-orgid"],
        )

    def test_other_underscore_names_kept(self) -> None:
        # Custom headers may use _ (nothing the proxy sends or reads): they
        # pass, as in the service we replace; so do near-misses of the
        # special names, which no _-to-- mapping turns into one.
        kept = [
            (b"X_Custom_Header", b"a"),
            (b"X_Grafana_Org", b"b"),
            (b"Content_Length_", b"c"),
            (b"_Transfer-Encoding", b"d"),
            (b"Host_", b"e"),
            (b"Connection_", b"f"),
            (b"X-Forwarded_Server", b"g"),
        ]
        raw = forward_request_headers(
            kept,
            host=b"up.example",
            authorization=None,
            tenant=None,
            client_address=b"10.1.2.3",
        )
        self.assertEqual([p for p in raw if b"_" in p[0]], kept)

    def test_underscores_in_values_are_not_names(self) -> None:
        out = fwd([(b"X-Note", b"Transfer_Encoding"), (b"X-Other", b"Content_Length: 1")])
        self.assertEqual(out.getRawHeaders(b"x-note"), [b"Transfer_Encoding"])
        self.assertEqual(out.getRawHeaders(b"x-other"), [b"Content_Length: 1"])


class ResponseHeaderTests(TestCase):
    def test_end_to_end_kept_hop_by_hop_dropped(self) -> None:
        up = [(n, b"x") for n in HOP_BY_HOP]
        up += [
            (b"Content-Encoding", b"gzip"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Retry-After", b"30"),
            (b"Connection", b"X-Hop"),
            (b"X-Hop", b"1"),
            (b"Content-Length", b"12"),
        ]
        out = as_headers(response_headers(up))
        self.assertFalse(out.hasHeader(b"content-length"))
        for n in HOP_BY_HOP:
            self.assertFalse(out.hasHeader(n), n)
        self.assertFalse(out.hasHeader(b"x-hop"))
        self.assertEqual(out.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(out.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(out.getRawHeaders(b"retry-after"), [b"30"])

    def test_response_lines_are_the_kept_headers_as_lines(self) -> None:
        # One pass for the usual answer, the same bytes as the two steps
        # whatever Connection lists.
        base = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"63"),
            (b"Set-Cookie", b"a=1"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
        ]
        for connection in ([], [b"keep-alive"], [b"Close"], [b"X-Hop"], [b"keep-alive", b"x-hop"]):
            up = base + [(b"Connection", c) for c in connection]
            self.assertEqual(response_lines(up), head_lines(response_headers(up)), connection)
        usual = [*base, (b"Connection", b"keep-alive")]
        self.assertEqual(
            response_lines(usual),
            b"Content-Type: application/json\r\nSet-Cookie: a=1\r\nX-Hop: 1\r\n",
        )
        self.assertNotIn(b"X-Hop", response_lines([*base, (b"Connection", b"X-Hop")]))
