"""OTLP over gRPC, the pure parts: OTLP_GRPC_LISTEN, the status table, the
message framing, Retry-After and the hand-encoded RetryInfo (decoded here
by a minimal protobuf reader; tests/e2e/test_grpc.py decodes it with
googleapis' own classes)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.settings import parse_config
from lgmt_proxy.rules import grpc
from tests.pure.test_config import BASE, problems

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
