"""`rules.h2check` against h2 itself: a header list is refused by
`request_problem` (`trailers_problem`, `content_length`) exactly when h2, as
the gRPC listener configures it for a server, refuses it.

Two oracles, both h2's public API: h2's own server (``H2Connection``) fed
the list HPACK-encoded in a HEADERS frame, which runs everything h2 does on
a received block (content-length included); and the brief's pair of module
functions, ``normalize_inbound_headers`` then ``validate_headers`` with the
flags h2 builds for a request's headers or trailers.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.exceptions
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hpack import Decoder, Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from lgmt_proxy.rules import h2check

Headers = list[tuple[bytes, bytes]]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EXPORT = b"/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: What an OTLP exporter sends (grpcio's order).
GRPC: Headers = [
    (b":scheme", b"http"),
    (b":path", EXPORT),
    (b":authority", b"127.0.0.1:4317"),
    (b":method", b"POST"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-python/1.66.1 grpc-c/43.0.0 (linux; chttp2)"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
]
#: The starting points of the mutated lists: requests h2 accepts, and a few
#: it refuses for one detail.
STARTS: list[Headers] = [
    GRPC,
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"a")],
    [(b":method", b"CONNECT"), (b":authority", b"a:443")],
    [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"https"),
        (b":path", b"/chat"),
        (b":authority", b"a"),
        (b"host", b"a"),
    ],
    [(b"cookie", b"a=1"), *GRPC, (b"cookie", b"b=2"), (b"content-length", b"5")],
    [(b":method", b"connect"), (b":authority", b"a:443")],
    [*GRPC[:2], (b"host", b"127.0.0.1:4317"), *GRPC[3:]],
]
TRAILERS: list[Headers] = [
    [],
    [(b"x-checksum", b"abc")],
    [(b"cookie", b"c"), (b"content-length", b"0")],
]

PSEUDO_NAMES = [b":method", b":scheme", b":authority", b":path", b":protocol", b":status"]
ODD_NAMES = [b":foo", b":", b":Method", b":path:", b"", b"x:y", b"a b", b"x\x00", b"caf\xc3\xa9"]
REGULAR_NAMES = [
    *(b"content-type", b"te", b"host", b"cookie", b"content-length", b"user-agent"),
    *(b"grpc-timeout", b"authorization", b"~!#$%&'*+-.^_`|09"),
    *(b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"),
    *(b"Content-Type", b"TE", b"Host", b"x\x7f", b"x\t"),
]
VALUES = [
    *(b"POST", b"GET", b"CONNECT", b"HEAD", b"connect", b"http", b"https", b"/", b"/x", b"*"),
    *(b"", b"trailers", b"TRAILERS", b"Trailers", b"trailers, deflate", b"gzip", b"websocket"),
    *(b"a", b"a:443", b"127.0.0.1:4317", b"A", b"200", b"100", b"a; b", b"caf\xc3\xa9"),
    *(b"0", b"5", b"05", b"10", b"-1", b"+5", b"1_0", b"5, 5", b"\xd9\xa0", b"\xef\xbc\x95"),
    *(b"a\rb", b"a\nb", b"a\x00b", b"a\x7fb\x0b", b"\x80\xff"),
]
#: Bytes either side of a rule: separators, controls, upper case, non-ASCII.
ODD_BYTES = list(b"az09-_:;=/AZ \t\x00\r\n\x0b\x1f\x7f\x80\xff")

odd_bytes = st.lists(st.sampled_from(ODD_BYTES), max_size=6).map(bytes)
names = st.one_of(
    st.sampled_from(PSEUDO_NAMES),
    st.sampled_from(REGULAR_NAMES),
    st.sampled_from(ODD_NAMES),
    odd_bytes,
)
padding = st.sampled_from([b"", b"", b"", b" ", b"\t", b"  "])
values = st.one_of(
    st.sampled_from(VALUES),
    st.tuples(padding, st.sampled_from(VALUES), padding).map(b"".join),
    odd_bytes,
)
fields = st.tuples(names, values)


#: Mostly the fields of a well-formed request: a mutation then lands near
#: the line between accepted and refused more often than across it.
near_fields = st.one_of(
    st.tuples(st.sampled_from(PSEUDO_NAMES + REGULAR_NAMES[:14]), st.sampled_from(VALUES)),
    st.tuples(st.sampled_from([b"host", b"content-length", b"cookie", b"te"]), values),
    st.tuples(st.sampled_from(PSEUDO_NAMES), st.sampled_from([b"", b"CONNECT", b"/", b"a"])),
    fields,
)


@st.composite
def mutated(draw: Any, starts: list[Headers]) -> Headers:
    """One of ``starts`` with a few fields inserted, dropped, renamed,
    revalued or moved."""
    headers = list(draw(st.sampled_from(starts)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["insert", "drop", "name", "value", "move"]))
        if op == "insert" or not headers:
            headers.insert(draw(st.integers(0, len(headers))), draw(near_fields))
            continue
        i = draw(st.integers(0, len(headers) - 1))
        name, value = headers[i]
        if op == "drop":
            del headers[i]
        elif op == "name":
            headers[i] = (draw(near_fields)[0], value)
        elif op == "value":
            headers[i] = (name, draw(near_fields)[1])
        else:
            headers.insert(draw(st.integers(0, len(headers) - 1)), headers.pop(i))
    return headers


requests = st.one_of(mutated(STARTS), mutated(STARTS), st.lists(fields, max_size=10))
trailer_lists = st.one_of(mutated(TRAILERS), mutated(TRAILERS), st.lists(fields, max_size=6))
EXAMPLES = settings(max_examples=800, deadline=None)


def _server() -> h2.connection.H2Connection:
    """h2 as the gRPC listener configures it for what it receives."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    conn.receive_data(PREFACE + SettingsFrame(0).serialize())
    return conn


def _headers_frame(encoder: Encoder, headers: Headers, end: bool) -> bytes:
    frame = HeadersFrame(1, data=encoder.encode(headers))
    frame.flags.add("END_HEADERS")
    if end:
        frame.flags.add("END_STREAM")
    return bytes(frame.serialize())


def h2_takes(headers: Headers, *, trailers: bool = False, body: int | None = None) -> bool:
    """Does h2's server take this list as a request's HEADERS (or, with
    ``trailers``, as trailers after GRPC), and then ``body`` bytes of DATA
    ending the stream?"""
    conn = _server()
    encoder = Encoder()
    try:
        if trailers:
            conn.receive_data(_headers_frame(encoder, GRPC, end=False))
        conn.receive_data(_headers_frame(encoder, headers, end=trailers))
        if body is not None:
            conn.receive_data(DataFrame(1, data=b"x" * body, flags=["END_STREAM"]).serialize())
    except h2.exceptions.ProtocolError:
        return False
    return True


def validate_takes(headers: Headers, *, trailers: bool = False) -> bool:
    """Do h2's module functions, as its server runs them, pass this list?"""
    flags = HeaderValidationFlags(
        is_client=False, is_trailer=trailers, is_response_header=False, is_push_promise=False
    )
    try:
        list(validate_headers(normalize_inbound_headers(headers, flags), flags))
    except h2.exceptions.ProtocolError:
        return False
    return True


def _length_or_error(headers: Headers) -> int | str | None:
    try:
        return h2check.content_length(headers)
    except h2check.ContentLengthError as e:
        return str(e)


class DifferentialTests(TestCase):
    """Generated lists: the same verdict as h2's."""

    @EXAMPLES
    @given(requests)
    def test_request_as_h2_server(self, headers: Headers) -> None:
        self.assertEqual(h2check.request_problem(headers) is None, h2_takes(headers), headers)

    @EXAMPLES
    @given(trailer_lists)
    def test_trailers_as_h2_server(self, headers: Headers) -> None:
        self.assertEqual(
            h2check.trailers_problem(headers) is None, h2_takes(headers, trailers=True), headers
        )

    @EXAMPLES
    @given(requests)
    def test_request_as_validate_headers(self, headers: Headers) -> None:
        """validate_headers does not read content-length (h2's stream does,
        the test above), so none is left in the list here."""
        headers = [field for field in headers if field[0] != b"content-length"]
        self.assertEqual(h2check.request_problem(headers) is None, validate_takes(headers), headers)

    @EXAMPLES
    @given(trailer_lists)
    def test_trailers_as_validate_headers(self, headers: Headers) -> None:
        headers = [field for field in headers if field[0] != b"content-length"]
        self.assertEqual(
            h2check.trailers_problem(headers) is None,
            validate_takes(headers, trailers=True),
            headers,
        )

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.sampled_from(VALUES),
                st.integers(0, 300).map(lambda n: str(n).encode()),
                st.tuples(padding, st.sampled_from([b"0", b"5", b"12"]), padding).map(b"".join),
                st.tuples(st.sampled_from([b"", b"0", b"00"]), st.integers(0, 99)).map(
                    lambda t: t[0] + str(t[1]).encode()
                ),
                odd_bytes,
            ),
            min_size=1,
            max_size=3,
        )
    )
    def test_content_length_as_h2_server(self, lengths: list[bytes]) -> None:
        """A declared length is refused where h2 refuses it, and where h2
        takes it, it is the length h2 then holds the body to."""
        headers = [*GRPC, *((b"content-length", v) for v in lengths)]
        length = _length_or_error(headers)
        self.assertEqual(isinstance(length, int), h2_takes(headers), lengths)
        self.assertEqual(h2check.request_problem(headers) is None, h2_takes(headers), lengths)
        if isinstance(length, int) and length <= 1000:
            self.assertTrue(h2_takes(headers, body=length))
            self.assertFalse(h2_takes(headers, body=length + 1))
            if length:
                self.assertFalse(h2_takes(headers, body=length - 1))


class ExampleTests(TestCase):
    """Named lists, each with the reason given and h2's verdict."""

    def check(self, headers: Headers, reason: str | None, *, trailers: bool = False) -> None:
        got = (h2check.trailers_problem if trailers else h2check.request_problem)(headers)
        self.assertEqual(got, reason)
        self.assertEqual(h2_takes(headers, trailers=trailers), reason is None)

    def test_grpc_call(self) -> None:
        self.check(GRPC, None)
        self.assertIsNone(h2check.content_length(GRPC))

    def test_hpack_decoded_fields(self) -> None:
        """The listener passes hpack's decoded list as it is: HeaderTuple
        and NeverIndexedHeaderTuple fields (tuple subclasses)."""
        fields = [*GRPC, (b"authorization", b"Bearer t"), (b"content-length", b"12")]
        encoder, decoder = Encoder(), Decoder()
        decoder.decode(encoder.encode(fields), raw=True)
        decoded = decoder.decode(encoder.encode(fields), raw=True)  # from the dynamic table
        self.assertIsNone(h2check.request_problem(decoded))
        self.assertEqual(h2check.content_length(decoded), 12)

    def test_names(self) -> None:
        self.check([*GRPC, (b"", b"x")], h2check.EMPTY_NAME)
        self.check([*GRPC, (b"X-Tenant", b"x")], h2check.ILLEGAL_NAME)
        self.check([*GRPC, (b"x y", b"x")], h2check.ILLEGAL_NAME)
        self.check([*GRPC, (b"x:y", b"x")], h2check.ILLEGAL_NAME)
        self.check([*GRPC, (b"caf\xc3\xa9", b"x")], h2check.ILLEGAL_NAME)
        self.check([*GRPC, (b"x-~!#$%&'*+-.^_`|", b"x")], None)

    def test_values(self) -> None:
        self.check([*GRPC, (b"x", b"a\x00b")], h2check.ILLEGAL_VALUE)
        self.check([*GRPC, (b"x", b"a\rb")], h2check.ILLEGAL_VALUE)
        self.check([*GRPC, (b"x", b"a\nb")], h2check.ILLEGAL_VALUE)
        self.check([*GRPC, (b"x", b" a")], h2check.WHITESPACE)
        self.check([*GRPC, (b"x", b"a\t")], h2check.WHITESPACE)
        self.check([*GRPC, (b"x", b"a b\x7f\xff")], None)
        self.check([*GRPC, (b"x", b"")], None)

    def test_connection_specific_and_te(self) -> None:
        for name in (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding"):
            self.check([*GRPC, (name, b"close")], h2check.CONNECTION_SPECIFIC)
        self.check([*GRPC, (b"upgrade", b"h2c")], h2check.CONNECTION_SPECIFIC)
        self.check([*GRPC, (b"te", b"TRAILERS")], None)
        self.check([*GRPC[:4], (b"te", b"gzip")], h2check.BAD_TE)
        self.check([(b"te", b"trailers, gzip")], h2check.BAD_TE, trailers=True)

    def test_pseudo_header_fields(self) -> None:
        self.check([*GRPC, (b":method", b"POST")], h2check.LATE_PSEUDO)
        self.check([(b":method", b"POST"), *GRPC], h2check.DUPLICATE_PSEUDO)
        self.check([(b":foo", b"x"), *GRPC], h2check.UNKNOWN_PSEUDO)
        self.check([(b":status", b"200"), *GRPC], h2check.STATUS_IN_REQUEST)
        self.check(GRPC[1:], h2check.NO_SCHEME_PATH)
        self.check([f for f in GRPC if f[0] != b":method"], h2check.NO_METHOD)
        self.check([(b":path", b""), *GRPC[:1], *GRPC[2:]], h2check.EMPTY_PATH)
        self.check([(b":protocol", b"websocket"), *GRPC], h2check.PROTOCOL_NOT_CONNECT)

    def test_connect(self) -> None:
        self.check([(b":method", b"CONNECT"), (b":authority", b"a:443")], None)
        self.check([(b":method", b"connect"), (b":authority", b"a:443")], h2check.NO_SCHEME_PATH)
        self.check(
            [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
            h2check.CONNECT_PATH,
        )
        extended = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a")]
        self.check(extended, h2check.NO_SCHEME_PATH)
        self.check([*extended, (b":scheme", b"https"), (b":path", b"/")], None)

    def test_authority_and_host(self) -> None:
        no_authority = [f for f in GRPC if f[0] != b":authority"]
        self.check(no_authority, h2check.NO_AUTHORITY)
        self.check([*no_authority, (b"host", b"a")], None)
        self.check([*no_authority, (b"host", b"a"), (b"host", b"a")], h2check.TWO_HOSTS)
        self.check([*GRPC, (b"host", b"127.0.0.1:4317")], None)
        self.check([*GRPC, (b"host", b"elsewhere")], h2check.HOST_MISMATCH)
        self.check([(b":authority", b""), *no_authority, (b"host", b"")], None)

    def test_cookies_as_h2_joins_them(self) -> None:
        """h2 moves cookies to the end and joins them before it validates."""
        self.check([(b"cookie", b"a=1"), *GRPC], None)
        self.check([*GRPC, (b"cookie", b"a=1 "), (b"cookie", b" b=2")], None)
        self.check([*GRPC, (b"cookie", b" a=1"), (b"cookie", b"b=2")], h2check.WHITESPACE)
        self.check([*GRPC, (b"cookie", b"a=1"), (b"cookie", b"")], h2check.WHITESPACE)
        self.check([*GRPC, (b"cookie", b""), (b"cookie", b"b=2")], None)
        self.check([*GRPC, (b"cookie", b"")], None)
        self.check([*GRPC, (b"cookie", b"a\r\n")], h2check.ILLEGAL_VALUE)

    def test_trailers(self) -> None:
        self.check([], None, trailers=True)
        self.check([(b"grpc-status", b"0"), (b"cookie", b"x")], None, trailers=True)
        self.check([(b":path", b"/")], h2check.PSEUDO_IN_TRAILERS, trailers=True)
        self.check([(b"x", b"1"), (b":path", b"/")], h2check.PSEUDO_IN_TRAILERS, trailers=True)
        self.check([(b"content-length", b"x")], h2check.BAD_LENGTH, trailers=True)
        self.check([(b"Grpc-Status", b"0")], h2check.ILLEGAL_NAME, trailers=True)
        self.check([(b"host", b"a"), (b"host", b"b")], None, trailers=True)

    def test_content_length(self) -> None:
        for values, expected in [
            ([b"12"], 12),
            ([b"0"], 0),
            ([b"007"], 7),
            ([b"5", b"5"], 5),
            ([b"9" * 30], int(b"9" * 30)),
        ]:
            headers = [*GRPC, *((b"content-length", v) for v in values)]
            self.assertEqual(h2check.content_length(headers), expected)
            self.check(headers, None)
        for values, reason in [
            ([b""], h2check.BAD_LENGTH),
            ([b"+5"], h2check.BAD_LENGTH),
            ([b"-1"], h2check.BAD_LENGTH),
            ([b"5, 5"], h2check.BAD_LENGTH),
            ([b"1_0"], h2check.BAD_LENGTH),
            ([b"\xd9\xa0"], h2check.BAD_LENGTH),
            ([b"1" * 4301], h2check.BAD_LENGTH),  # past int()'s digit limit: h2's ValueError
            ([b"5", b"6"], h2check.TWO_LENGTHS),
        ]:
            headers = [*GRPC, *((b"content-length", v) for v in values)]
            self.assertEqual(_length_or_error(headers), reason)
            self.check(headers, reason)

    def test_reasons_hold_no_value_nor_name(self) -> None:
        """A secret in a refused value or a client's name never reaches the
        reason (which goes to the logs)."""
        secret = b"glc_s3cretTOKEN"
        for headers in [
            [*GRPC, (b"authorization", b"Bearer " + secret + b"\r\n")],
            [*GRPC, (b"authorization", b"Bearer " + secret + b" ")],
            [*GRPC, (b"X-" + secret, b"x")],
            [*GRPC, (b":" + secret, b"x")],
            [*GRPC, (b"host", secret)],
            [*GRPC, (b"content-length", secret)],
            [*GRPC, (b"te", secret)],
        ]:
            reason = h2check.request_problem(headers)
            assert reason is not None
            self.assertNotIn("s3cret", reason.lower())
            self.assertNotIn("x-", reason.lower())
