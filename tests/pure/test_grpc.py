"""OTLP over gRPC, the pure parts: OTLP_GRPC_LISTEN, the status table, the
message framing, Retry-After and the hand-encoded RetryInfo (decoded here
by a minimal protobuf reader; tests/e2e/test_grpc.py decodes it with
googleapis' own classes)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import parse_config
from lgmt_proxy.rules import grpc, h2frames
from tests.pure.test_config import BASE, problems

SPLITS = settings(max_examples=200, deadline=None)

OTLP = {
    **BASE,
    "GRAFANA_CLOUD_OTLP_URL": "https://otlp-gateway-prod-us-east-2.grafana.net/otlp",
    "GRAFANA_CLOUD_OTLP_ORG_ID": "1234",
}


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints and bytes only."""
    out: list[tuple[int, int | bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(data):
        key = varint()
        if key & 7 == 0:
            out.append((key >> 3, varint()))
        else:
            assert key & 7 == 2
            size = varint()
            out.append((key >> 3, data[i : i + size]))
            i += size
    return out


class ListenSettingTests(TestCase):
    def test_off_by_default(self) -> None:
        self.assertIsNone(parse_config(OTLP).otlp_grpc_listen)
        for off in ("", "off", " OFF "):
            self.assertIsNone(parse_config({**OTLP, "OTLP_GRPC_LISTEN": off}).otlp_grpc_listen)

    def test_port_or_description(self) -> None:
        for value in ("4317", "tcp:4317", "tcp:port=4317:interface=127.0.0.1", "unix:/run/g"):
            config = parse_config({**OTLP, "OTLP_GRPC_LISTEN": value})
            self.assertEqual(config.otlp_grpc_listen, value)

    def test_bad_values(self) -> None:
        cases = {
            "0": "OTLP_GRPC_LISTEN: a port must be 1 to 65535, got '0'",
            "70000": "OTLP_GRPC_LISTEN: a port must be 1 to 65535, got '70000'",
            "8085": "OTLP_GRPC_LISTEN: must not be the main listener's PORT",
            "grpc please": "OTLP_GRPC_LISTEN: expected a port (4317) or an endpoint "
            "description (tcp:4317, tcp:port=4317:interface=127.0.0.1)",
        }
        for value, problem in cases.items():
            self.assertEqual(problems({**OTLP, "OTLP_GRPC_LISTEN": value}), [problem], value)

    def test_needs_the_otlp_signal(self) -> None:
        self.assertEqual(
            problems({**BASE, "OTLP_GRPC_LISTEN": "4317"}),
            [
                "OTLP_GRPC_LISTEN: OTLP over gRPC is bridged to the otlp signal; "
                "set GRAFANA_CLOUD_OTLP_URL and GRAFANA_CLOUD_OTLP_ORG_ID"
            ],
        )


class TLSSettingTests(TestCase):
    CERT = {"OTLP_GRPC_TLS_CERT_FILE": "/tls/tls.crt"}
    KEY = {"OTLP_GRPC_TLS_KEY_FILE": "/tls/tls.key"}

    def test_both_named_files_only_read_later(self) -> None:
        config = parse_config({**OTLP, "OTLP_GRPC_LISTEN": "4317", **self.CERT, **self.KEY})
        self.assertEqual(config.otlp_grpc_tls_files, ("/tls/tls.crt", "/tls/tls.key"))
        self.assertIsNone(config.otlp_grpc_tls)  # tap.load reads them
        self.assertIsNone(parse_config({**OTLP, "OTLP_GRPC_LISTEN": "4317"}).otlp_grpc_tls_files)

    def test_both_or_neither(self) -> None:
        on = {**OTLP, "OTLP_GRPC_LISTEN": "4317"}
        self.assertEqual(
            problems({**on, **self.CERT}),
            ["OTLP_GRPC_TLS_KEY_FILE: required for TLS on the gRPC listener (set both or neither)"],
        )
        self.assertEqual(
            problems({**on, **self.KEY}),
            [
                "OTLP_GRPC_TLS_CERT_FILE: required for TLS on the gRPC listener (set both or neither)"
            ],
        )

    def test_needs_the_listener(self) -> None:
        for off in ({}, {"OTLP_GRPC_LISTEN": "off"}):
            self.assertEqual(
                problems({**OTLP, **off, **self.CERT, **self.KEY}),
                ["OTLP_GRPC_TLS_CERT_FILE: set, but the gRPC listener is off (OTLP_GRPC_LISTEN)"],
            )
        # A bad OTLP_GRPC_LISTEN is the one problem reported.
        found = problems({**OTLP, "OTLP_GRPC_LISTEN": "0", **self.CERT, **self.KEY})
        self.assertEqual(len(found), 1)
        self.assertTrue(found[0].startswith("OTLP_GRPC_LISTEN:"))


class TimeoutTests(TestCase):
    def test_units(self) -> None:
        cases = {
            b"1H": 3600.0,
            b"2M": 120.0,
            b"10S": 10.0,
            b"1500m": 1.5,
            b"250000u": 0.25,
            b"99999999n": 0.099999999,
            b"0S": 0.0,  # grpc-go accepts it: a deadline already past
        }
        for value, seconds in cases.items():
            found = grpc.parse_timeout(value)
            assert found is not None, value
            self.assertAlmostEqual(found, seconds, places=9, msg=value)

    def test_malformed(self) -> None:
        for value in (b"", b"S", b"10", b"10s", b"10X", b"123456789S", b"-1S", b"1.5S",
                      b" 1S", b"1S ", b"\xd9\xa1S", b"+1S"):  # fmt: skip
            self.assertIsNone(grpc.parse_timeout(value), value)


class StatusTests(TestCase):
    def test_otlp_table(self) -> None:
        table = {
            200: grpc.OK,
            204: grpc.OK,
            400: grpc.INVALID_ARGUMENT,
            401: grpc.UNAUTHENTICATED,
            403: grpc.PERMISSION_DENIED,
            404: grpc.UNIMPLEMENTED,
            413: grpc.RESOURCE_EXHAUSTED,
            429: grpc.RESOURCE_EXHAUSTED,
            502: grpc.UNAVAILABLE,
            503: grpc.UNAVAILABLE,
            504: grpc.UNAVAILABLE,
            500: grpc.INTERNAL,
            501: grpc.INTERNAL,
            409: grpc.UNKNOWN,
        }
        for http, code in table.items():
            self.assertEqual(grpc.grpc_status(http), code, http)

    def test_retry_after(self) -> None:
        self.assertEqual(grpc.retry_seconds(b"7"), 7)
        self.assertEqual(grpc.retry_seconds(b" 30 "), 30)
        self.assertIsNone(grpc.retry_seconds(None))
        self.assertIsNone(grpc.retry_seconds(b"soon"))
        date = b"Wed, 21 Oct 2015 07:28:10 GMT"
        self.assertEqual(grpc.retry_seconds(date, now=1445412480.0), 10)
        self.assertEqual(grpc.retry_seconds(date, now=1445412500.0), 0)  # in the past
        self.assertEqual(grpc.retry_seconds(b"999999999"), 86400)

    def test_trailers_with_retry_info(self) -> None:
        trailers = dict(grpc.trailers(grpc.RESOURCE_EXHAUSTED, "slow down: 100%", 300))
        self.assertEqual(trailers[b"grpc-status"], b"8")
        self.assertEqual(trailers[b"grpc-message"], b"slow down: 100%25")
        self.assertNotIn(b"=", trailers[b"grpc-status-details-bin"])  # unpadded base64
        # RetryInfo{retry_delay: Duration{seconds: 300}}
        info = grpc.retry_info(300)
        ((number, duration),) = _fields(info)
        self.assertEqual((number, _fields(duration)), (1, [(1, 300)]))  # type: ignore[arg-type]
        status = _fields(grpc.status_details(8, "m", 300))
        self.assertEqual(status[:2], [(1, 8), (2, b"m")])
        number, detail = status[2]
        self.assertEqual(number, 3)
        any_fields = dict(_fields(detail))  # type: ignore[arg-type]
        self.assertEqual(any_fields[1], b"type.googleapis.com/google.rpc.RetryInfo")
        self.assertEqual(any_fields[2], info)

    def test_plain_trailers(self) -> None:
        self.assertEqual(grpc.trailers(grpc.OK, ""), [(b"grpc-status", b"0")])


class FramingTests(TestCase):
    def test_prefix_split_anywhere(self) -> None:
        framed = grpc.frame_message(b"hello")
        for cut in range(len(framed) + 1):
            reader = grpc.MessageReader()
            out = reader.feed(framed[:cut]) + reader.feed(framed[cut:])
            self.assertEqual(out, b"hello")
            self.assertTrue(reader.done)
            self.assertEqual((reader.length, reader.compressed), (5, False))

    def test_compressed_flag_and_errors(self) -> None:
        reader = grpc.MessageReader()
        self.assertEqual(reader.feed(b"\x01\x00\x00\x00\x02ab"), b"ab")
        self.assertTrue(reader.compressed)
        with self.assertRaises(grpc.FramingError):
            grpc.MessageReader().feed(b"\x02\x00\x00\x00\x00")
        with self.assertRaises(grpc.FramingError):
            grpc.MessageReader().feed(b"\x00\x00\x00\x00\x01ab")

    def test_methods_are_the_otlp_paths(self) -> None:
        self.assertEqual(
            sorted(grpc.METHODS.values()),
            [b"/otlp/v1/logs", b"/otlp/v1/metrics", b"/otlp/v1/traces"],
        )


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


class FrameSplitterTests(TestCase):
    """What the bridge takes past h2 and what it hands to h2, in order."""

    def test_runs_and_data_frames_in_order(self) -> None:
        settings = _frame(4, 0, 0, b"")
        headers = _frame(1, 4, 1, b"\x82")
        data = _frame(0, 0, 1, b"abc")
        last = _frame(0, 1, 1, b"de")
        ping = _frame(2, 0, 1, b"\0\0\0\0\x10")  # PRIORITY: h2's
        other = _frame(0, 0, 3, b"f")
        splitter = h2frames.FrameSplitter()
        wire = h2frames.PREFACE + settings + headers + data + ping + data + last + other
        parts = splitter.split(wire, 16384)
        self.assertEqual(parts[0], h2frames.PREFACE)
        self.assertEqual(parts[1], settings)
        self.assertEqual(parts[2], h2frames.HeaderBlock(1, False, b"\x82", [headers]))
        self.assertEqual(_taken(parts[3]), (1, 0, b"abc", 3, data))
        self.assertEqual(parts[4], ping)
        # Back to back on one stream: one piece of data, the frames kept for h2.
        self.assertEqual(_taken(parts[5]), (1, 1, b"abcde", 5, data + last))
        self.assertEqual(_taken(parts[6]), (3, 0, b"f", 1, other))
        self.assertEqual(len(parts), 7)

    def test_header_blocks_whole(self) -> None:
        """A header block comes whole, padding and priority removed, its
        CONTINUATIONs joined; RST_STREAM, WINDOW_UPDATE (a stream's and the
        connection's) and PING come apart; one of the wrong length goes to h2."""
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS, 16384)
        padded = _frame(
            1, 0x8 | 0x20 | 0x4 | 0x1, 5, b"\x02" + b"\0\0\0\3\xff" + b"\x82\x84" + b"\0\0"
        )
        first = _frame(1, 0, 7, b"\x82")
        cont = _frame(9, 0, 7, b"\x84")
        last = _frame(9, 0x4, 7, b"\x86")
        reset = _frame(3, 0, 7, b"\0\0\0\x08")
        grant = _frame(8, 0, 7, b"\0\0\1\0")
        conn_grant = _frame(8, 0, 0, b"\0\0\1\0")
        ping, acked = _frame(6, 0, 0, b"12345678"), _frame(6, 1, 0, b"12345678")
        short = _frame(6, 0, 0, b"1234")
        wire = padded + first + cont + last + reset + grant + conn_grant + ping + acked + short
        parts = splitter.split(wire, 16384)
        self.assertEqual(parts[0], h2frames.HeaderBlock(5, True, b"\x82\x84", [padded]))
        block = parts[1]
        assert isinstance(block, h2frames.HeaderBlock)
        self.assertEqual(
            (block.stream_id, block.end_stream, block.block), (7, False, b"\x82\x84\x86")
        )
        self.assertEqual(block.raw, first + cont + last)
        self.assertEqual(
            parts[2:],
            [
                h2frames.StreamFrame(h2frames.RST_STREAM, 7, 8, reset),
                h2frames.StreamFrame(h2frames.WINDOW_UPDATE, 7, 256, grant),
                h2frames.StreamFrame(h2frames.WINDOW_UPDATE, 0, 256, conn_grant),
                h2frames.StreamFrame(h2frames.PING, 0, 0, ping),
                h2frames.StreamFrame(h2frames.PING, 0, h2frames.ACK, acked),
                short,
            ],
        )

    def test_header_blocks_refused(self) -> None:
        """What is a connection error in a header block (RFC 9113, 6.2,
        6.10, 5.3.1; 8.4: a client does not push)."""
        for wire in (
            _frame(1, 0x4, 0, b"\x82"),  # stream 0
            _frame(1, 0x20 | 0x4, 1, b"\0\0\0\1\xff\x82"),  # depends on itself
            _frame(1, 0x8 | 0x4, 1, b"\x05\x82"),  # padding past the end
            _frame(1, 0x20 | 0x4, 1, b"\0\0"),  # too short for its priority
            _frame(1, 0, 1, b"\x82") + _frame(9, 0x4, 3, b"\x84"),  # continued on another stream
            _frame(5, 0x4, 1, b"\0\0\0\2"),  # PUSH_PROMISE
        ):
            splitter = h2frames.FrameSplitter()
            splitter.split(h2frames.PREFACE + _SETTINGS, 16384)
            with self.assertRaises(h2frames.SplitError):
                splitter.split(wire, 16384)
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS + _frame(1, 0, 1, b"\x82"), 16384)
        for _ in range(h2frames.MAX_CONTINUATIONS):  # empty ones: no memory, but CPU
            self.assertEqual(splitter.split(_frame(9, 0, 1, b""), 16384), [])
        with self.assertRaises(h2frames.HeaderBlockError):
            splitter.split(_frame(9, 0, 1, b""), 16384)

    def test_partial_frames_wait_for_the_rest(self) -> None:
        splitter = h2frames.FrameSplitter()
        wire = (
            h2frames.PREFACE
            + _SETTINGS
            + _frame(0, 0, 3, b"x" * 100)
            + _frame(2, 0, 1, b"\0\0\0\0\1")
        )
        out: list[bytes | h2frames.DataFrame] = []
        for i in range(0, len(wire), 7):  # a few bytes at a time
            out += splitter.split(wire[i : i + 7], 16384)
        self.assertEqual(
            b"".join(p for p in out if isinstance(p, bytes)),
            h2frames.PREFACE + _SETTINGS + wire[-14:],
        )
        frames = [p for p in out if isinstance(p, h2frames.DataFrame)]
        self.assertEqual([(f.stream_id, f.payload) for f in frames], [(3, b"x" * 100)])

    def test_padding(self) -> None:
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS, 16384)
        padded = _frame(0, 0x8 | 0x1, 5, b"\x03" + b"msg" + b"\0\0\0")
        (frame,) = splitter.split(padded, 16384)
        assert isinstance(frame, h2frames.DataFrame)
        self.assertEqual((frame.payload, frame.length, frame.flags), (b"msg", 7, 0x9))
        # Padding as long as the frame: invalid, left to h2 to refuse.
        (bad,) = splitter.split(_frame(0, 0x8, 5, b"\x05abc"), 16384)
        assert isinstance(bad, h2frames.DataFrame)
        self.assertEqual(bad.flags, -1)

    def test_oversized_frame_goes_to_h2_at_once(self) -> None:
        """Nothing is held waiting for a frame over the maximum: h2 gets
        its header (and refuses it) at once."""
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS, 16384)
        head = (16385).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
        self.assertEqual(splitter.split(head + b"y" * 10, 16384), [head + b"y" * 10])
        # Its header cut across reads: the same once the header is whole.
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS + head[:4], 16384)
        self.assertEqual(splitter.split(head[4:] + b"y" * 10, 16384), [head + b"y" * 10])

    def test_our_maximum_once_acknowledged(self) -> None:
        """``max_frame`` holds from the client's acknowledgement of our
        SETTINGS on (16 KiB before: a bigger frame goes to h2, which
        refuses it); the acknowledgement is a run of its own, so that h2
        raises its limit before the frames after it."""
        ack = _frame(4, 0x1, 0, b"")
        big = _frame(0, 0x1, 1, b"z" * 65536)
        splitter = h2frames.FrameSplitter()
        parts = splitter.split(h2frames.PREFACE + _SETTINGS + big, 65536)
        self.assertEqual(parts, [h2frames.PREFACE, _SETTINGS + big])
        splitter = h2frames.FrameSplitter()
        ping = _frame(2, 0, 1, b"\0\0\0\0\x10")  # PRIORITY: h2's
        parts = splitter.split(h2frames.PREFACE + _SETTINGS + ack + ping + big, 65536)
        self.assertEqual(parts[:3], [h2frames.PREFACE, _SETTINGS + ack, ping])
        self.assertEqual(_taken(parts[3]), (1, 1, b"z" * 65536, 65536, big))
        self.assertEqual(len(parts), 4)
        # Beyond it: to h2 at once.
        head = (65537).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
        self.assertEqual(splitter.split(head, 65536), [head])

    def test_header_block_within_1_mib(self) -> None:
        """h2 holds a header block whole before decoding it: with 64 KiB
        frames, still no more than 1 MiB (as 64 CONTINUATIONs of 16 KiB)."""
        ack = _frame(4, 0x1, 0, b"")
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS + ack, 65536)
        splitter.split(_frame(1, 0, 1, b"h" * 65536), 65536)
        for _ in range(15):  # 1 MiB in all: taken
            splitter.split(_frame(9, 0, 1, b"h" * 65536), 65536)
        with self.assertRaises(h2frames.HeaderBlockError):
            splitter.split(_frame(9, 0x4, 1, b"h"), 65536)
        # A block ended is forgotten: the next one counts from nothing.
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS + ack, 65536)
        for sid in range(1, 41, 2):
            block = _frame(1, 0, sid, b"h" * 65536) + _frame(9, 0x4, sid, b"h" * 65536)
            (part,) = splitter.split(block, 65536)
            assert isinstance(part, h2frames.HeaderBlock)
            self.assertEqual((part.stream_id, part.block), (sid, b"h" * 131072))

    def test_frames_the_bridge_writes(self) -> None:
        self.assertEqual(
            h2frames.window_update(7, 65536), _frame(8, 0, 7, (65536).to_bytes(4, "big"))
        )
        self.assertEqual(h2frames.rst_stream(9, 7), _frame(3, 0, 9, b"\0\0\0\7"))
        self.assertEqual(
            h2frames.ping_ack(_frame(6, 0, 0, b"12345678")), _frame(6, 1, 0, b"12345678")
        )
        self.assertEqual(h2frames.data_frame(9, b"abc"), _frame(0, 0, 9, b"abc"))
        self.assertEqual(
            h2frames.headers_frames(3, b"x" * 5, True, 2),
            _frame(1, 0x1, 3, b"xx") + _frame(9, 0, 3, b"xx") + _frame(9, 0x4, 3, b"x"),
        )
        self.assertEqual(h2frames.headers_frames(3, b"xy", False, 16384), _frame(1, 0x4, 3, b"xy"))

    @SPLITS
    @given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    def test_any_cut_of_the_bytes_splits_the_same(self, cuts: list[int]) -> None:
        """However TCP cuts what a client sends (a frame header at any byte
        offset included), the same frames come out, in the same order."""
        whole = _pieces(_split_at(_WIRE, []))
        self.assertEqual(_pieces(_split_at(_WIRE, cuts)), whole)

    def test_every_byte_offset(self) -> None:
        whole = _pieces(_split_at(_WIRE, []))
        for cut in range(1, len(_WIRE)):
            self.assertEqual(_pieces(_split_at(_WIRE, [cut])), whole, cut)
        self.assertEqual(_pieces(_split_at(_WIRE, list(range(len(_WIRE))))), whole)

    def test_data_inside_a_header_block_refused(self) -> None:
        """Between a HEADERS without END_HEADERS and the CONTINUATION ending
        it, any other frame is a connection error (RFC 9113, 6.10)."""
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS, 16384)
        with self.assertRaises(h2frames.SplitError):
            splitter.split(_frame(1, 0, 3, b"\x82") + _frame(0, 0, 1, b"abc"), 16384)

    def test_preface_goes_on_with_settings(self) -> None:
        """RFC 9113, 3.4: the client's first frame is SETTINGS (h2 does not
        check it); a SETTINGS acknowledgement is not."""
        for first in (_frame(0, 0, 1, b"x"), _frame(1, 5, 1, b"\x82"), _frame(4, 1, 0, b"")):
            splitter = h2frames.FrameSplitter()
            with self.assertRaises(h2frames.PrefaceError):
                splitter.split(h2frames.PREFACE + first, 16384)
        splitter = h2frames.FrameSplitter()
        splitter.split(h2frames.PREFACE + _SETTINGS[:5], 16384)  # not yet known
        self.assertEqual(splitter.split(_SETTINGS[5:], 16384), [_SETTINGS])


_SETTINGS = _frame(4, 0, 0, b"")
#: A client's bytes: DATA frames of two calls (padded, empty, back to back),
#: a header block in CONTINUATIONs with a PING after it, WINDOW_UPDATEs of
#: a stream and of the connection, a RST_STREAM.
_WIRE = (
    h2frames.PREFACE
    + _SETTINGS
    + _frame(1, 0x4, 1, b"\x82")
    + _frame(4, 0x1, 0, b"")
    + _frame(0, 0, 1, b"\0\0\0\0\x20" + b"a" * 20)
    + _frame(0, 0x8, 1, b"\x02" + b"b" * 12 + b"\0\0")
    + _frame(0, 0, 1, b"")
    + _frame(1, 0x0, 3, b"\x82")
    + _frame(9, 0x4, 3, b"\x84")
    + _frame(6, 0, 0, b"\0" * 8)
    + _frame(0, 0, 3, b"c" * 30)
    + _frame(0, 0, 3, b"d" * 3)
    + _frame(8, 0, 3, b"\0\0\0\2")
    + _frame(0, 0x1, 1, b"")
    + _frame(3, 0, 3, b"\0\0\0\x08")
    + _frame(8, 0, 0, b"\0\0\0\1")
)


def _taken(part: h2frames.Part) -> tuple[int, int, bytes, int, bytes]:
    assert isinstance(part, h2frames.DataFrame)
    return (part.stream_id, part.flags, part.payload, part.length, part.raw)


def _split_at(wire: bytes, cuts: list[int]) -> list[h2frames.Part]:
    splitter = h2frames.FrameSplitter()
    bounds = sorted({0, len(wire), *(min(c, len(wire)) for c in cuts)})
    out: list[h2frames.Part] = []
    for start, end in itertools.pairwise(bounds):
        out += splitter.split(wire[start:end], 16384)
    return out


def _pieces(parts: list[h2frames.Part]) -> tuple[list[object], dict[int, bytes], bytes]:
    """Each DATA frame taken (and how many bytes h2 had before it), the
    payload taken per stream, and all h2 got: how a read joins frames of
    one stream depends on the cuts, these do not."""
    frames: list[object] = []
    payloads: dict[int, bytes] = {}
    h2_bytes = b""
    for part in parts:
        if isinstance(part, bytes):
            h2_bytes += part
            continue
        if isinstance(part, h2frames.HeaderBlock):
            frames.append((len(h2_bytes), part.stream_id, part.end_stream, part.block, part.raw))
            continue
        if isinstance(part, h2frames.StreamFrame):
            frames.append((len(h2_bytes), part))
            continue
        for frame in part.frames:
            frames.append((len(h2_bytes), bytes(frame)))
        payloads[part.stream_id] = payloads.get(part.stream_id, b"") + part.payload
    return frames, payloads, h2_bytes


class InflowTests(TestCase):
    def test_windows_granted_at_half_and_enforced(self) -> None:
        from lgmt_proxy.dataplane.grpc_flow import CONNECTION_WINDOW, STREAM_WINDOW, Inflow

        full = CONNECTION_WINDOW  # what h2's own accounting allows, untouched
        flow = Inflow()
        flow.add(1, None)
        self.assertEqual(flow.received(1, STREAM_WINDOW, STREAM_WINDOW, False, full), 0)
        flow.taken(1, STREAM_WINDOW // 2 - 1)
        self.assertEqual(flow.updates, [])  # not yet half
        flow.taken(1, 1)
        self.assertEqual(flow.updates, [h2frames.window_update(1, STREAM_WINDOW // 2)])
        self.assertEqual(flow.received(1, STREAM_WINDOW // 2, 0, False, full), 0)
        self.assertEqual(flow.received(1, 1, 1, False, full), 3)  # FLOW_CONTROL_ERROR
        # The connection's window counts every call's bytes.
        other = Inflow()
        for sid in range(1, 40, 2):
            other.add(sid, None)
        sent = 0
        for sid in range(1, 40, 2):
            sent += STREAM_WINDOW
            error = other.received(sid, STREAM_WINDOW, STREAM_WINDOW, False, full)
            self.assertEqual(error, 0 if sent <= CONNECTION_WINDOW else 3)

    def test_one_connection_window_with_h2s_share(self) -> None:
        """The client has one connection window: what h2 was given (DATA of
        closed streams) and not granted again counts against the calls'
        DATA, and the other way round."""
        from lgmt_proxy.dataplane.grpc_flow import CONNECTION_WINDOW, STREAM_WINDOW, Inflow

        flow = Inflow()
        flow.add(1, None)
        h2_left = CONNECTION_WINDOW - 100  # h2 saw 100 bytes it has not granted again
        self.assertEqual(flow.received(1, STREAM_WINDOW - 100, 0, False, h2_left), 0)
        self.assertTrue(flow.fits(CONNECTION_WINDOW - STREAM_WINDOW, h2_left))
        self.assertFalse(flow.fits(CONNECTION_WINDOW - STREAM_WINDOW + 1, h2_left))
        flow.add(3, None)
        self.assertEqual(flow.received(3, 101, 0, False, CONNECTION_WINDOW - 100), 0)
        self.assertEqual(flow.received(3, 1, 0, False, STREAM_WINDOW - CONNECTION_WINDOW), 3)

    def test_content_length(self) -> None:
        """RFC 9113, 8.1.1: the DATA of a request with ``content-length``
        sums to it; beyond it, or short of it at the end, is
        PROTOCOL_ERROR. Padding is not content."""
        from lgmt_proxy.dataplane.grpc_flow import CONNECTION_WINDOW, Inflow

        full = CONNECTION_WINDOW
        flow = Inflow()
        flow.add(1, 10)
        self.assertEqual(flow.received(1, 20, 6, False, full), 0)  # 14 bytes of padding
        self.assertEqual(flow.received(1, 4, 4, True, full), 0)
        flow.add(3, 10)
        self.assertEqual(flow.received(3, 11, 11, False, full), 1)
        flow.add(5, 10)
        self.assertEqual(flow.received(5, 9, 9, True, full), 1)
        flow.add(7, 10)
        self.assertEqual(flow.received(7, 9, 9, False, full), 0)
        self.assertFalse(flow.ended(7))  # ended by trailers, one byte short
        flow.add(9, None)
        self.assertTrue(flow.ended(9))
        self.assertFalse(flow.owns(9))
