"""Compressed egress in memory: `Gzip`'s chunk framing, and the real
`ClientConnection`, `Exchange` and pool over `StringTransport`s writing a
gzip'd, chunked body upstream (held chunks while connecting included) and
counting its bytes before and after."""

from __future__ import annotations

import gzip
import random
import zlib

import httptools
from twisted.trial.unittest import TestCase

from lgmt_proxy.io.compress import Gzip
from tests.support.memory import MemoryProxy, sent_requests

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def dechunk(raw: bytes) -> list[bytes]:
    """The chunks of a chunked body (terminator included, as an empty one),
    checking the framing as an upstream's parser would."""
    chunks: list[bytes] = []
    rest = raw
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        assert sep, raw
        size = int(size_line, 16)
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n", raw
        rest = rest[size + 2 :]
        if size == 0:
            assert rest == b"", rest
            return chunks


SPAN = (
    b'{"traceId":"%032x","spanId":"%016x","name":"GET /api/items/{id}","kind":2,'
    b'"startTimeUnixNano":"17%017d","endTimeUnixNano":"17%017d","attributes":['
    b'{"key":"http.request.method","value":{"stringValue":"GET"}},'
    b'{"key":"http.route","value":{"stringValue":"/api/items/{id}"}},'
    b'{"key":"http.response.status_code","value":{"intValue":"200"}},'
    b'{"key":"server.address","value":{"stringValue":"items.shop.svc.cluster.local"}}],'
    b'"status":{}}'
)


def json_lines(n: int, seed: int = 7) -> bytes:
    """An OTLP JSON traces body of ``n`` spans, the same for a seed."""
    rnd = random.Random(seed)
    spans = []
    for _ in range(n):
        start = rnd.getrandbits(50)
        spans.append(
            SPAN % (rnd.getrandbits(128), rnd.getrandbits(64), start, start + rnd.getrandbits(20))
        )
    return b'{"resourceSpans":[{"scopeSpans":[{"spans":[' + b",".join(spans) + b"]}]}]}"


class GzipFramingTests(TestCase):
    def test_chunks_then_trailer_decompress_to_the_body(self) -> None:
        body = json_lines(2000)
        z = Gzip(1)
        out = b"".join(z.chunk(body[i : i + 1000]) for i in range(0, len(body), 1000)) + z.end()
        chunks = dechunk(out)
        self.assertEqual(chunks[-1], b"")
        self.assertNotIn(b"", chunks[:-1], "an empty chunk would end the body early")
        zipped = b"".join(chunks)
        self.assertEqual(gzip.decompress(zipped), body)
        self.assertEqual((z.before, z.after), (len(body), len(zipped)))
        self.assertLess(z.after * 4, z.before)

    def test_small_chunk_held_by_zlib_writes_nothing(self) -> None:
        z = Gzip(1)
        header = z.chunk(b"{")  # the gzip header comes at once
        self.assertEqual(z.chunk(b"}"), b"")
        self.assertEqual(z.chunk(b""), b"")
        chunks = dechunk(header + z.end())
        self.assertEqual(gzip.decompress(b"".join(chunks)), b"{}")

    def test_level_and_gzip_header(self) -> None:
        body = json_lines(500)
        sizes = {}
        for level in (1, 9):
            z = Gzip(level)
            zipped = b"".join(dechunk(z.chunk(body) + z.end()))
            self.assertEqual(zipped[:2], b"\x1f\x8b")  # gzip, not zlib or raw deflate
            self.assertEqual(zlib.decompress(zipped, 31), body)
            sizes[level] = len(zipped)
        self.assertLess(sizes[9], sizes[1])


def push(path: bytes, body: bytes, *headers: bytes, chunked: bool = False) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: p\r\n%s" % (path, b"".join(h + b"\r\n" for h in headers))
    if chunked:
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class ExchangeTests(TestCase):
    def test_push_goes_up_gzipd_and_chunked(self) -> None:
        proxy = MemoryProxy(UPSTREAM_COMPRESSION="gzip")
        body = json_lines(300)
        for chunked in (False, True):
            _, client = proxy.send(
                push(b"/otlp/v1/traces", body, b"Content-Type: application/json", chunked=chunked)
            )
            up, transport = proxy.upstream("otlp")
            raw = transport.value()
            head, _, wire = raw.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            self.assertIn(b"transfer-encoding: chunked", lines)
            self.assertIn(b"content-encoding: gzip", lines)
            self.assertFalse([x for x in lines if x.startswith(b"content-length")], head)
            self.assertEqual(gzip.decompress(b"".join(dechunk(wire))), body)
            up.dataReceived(OK)
            self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK"), client.value())
            transport.clear()
        zipped = proxy.sample(
            "proxy_upstream_compression_bytes_total", upstream="otlp", stage="after"
        )
        self.assertEqual(
            proxy.sample("proxy_upstream_compression_bytes_total", upstream="otlp", stage="before"),
            2 * len(body),
        )
        self.assertTrue(0 < zipped < len(body) / 2, zipped)
        # What the client sent is what proxy_request_body_bytes_total counts.
        self.assertEqual(
            proxy.sample("proxy_request_body_bytes_total", upstream="otlp"), 2 * len(body)
        )

    def test_body_held_while_connecting_is_compressed_once_connected(self) -> None:
        proxy = MemoryProxy(UPSTREAM_COMPRESSION="gzip")
        proxy.endpoints["loki"].hold = True
        body = b'{"streams":[{"stream":{"job":"a"},"values":[["1","%s"]]}]}' % (b"line " * 2000)
        client, _ = proxy.send(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:5000])
        )
        client.dataReceived(body[5000:])
        self.assertEqual(proxy.calls(), [])
        transport = proxy.endpoints["loki"].release()
        ((method, target, headers, sent),) = sent_requests(transport.value())
        self.assertEqual((method, target), (b"POST", b"/loki/api/v1/push"))
        self.assertEqual(headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(gzip.decompress(sent), body)

    def test_untouched_when_off_encoded_or_not_a_push(self) -> None:
        cases = [
            ({}, b"/otlp/v1/traces", []),
            ({"UPSTREAM_COMPRESSION": "gzip"}, b"/api/prom/push", []),
            ({"UPSTREAM_COMPRESSION": "gzip"}, b"/otlp/v1/traces", [b"Content-Encoding: gzip"]),
            (
                {"UPSTREAM_COMPRESSION": "gzip"},
                b"/loki/api/v1/push",
                [b"Content-Type: application/x-protobuf"],
            ),
            ({"UPSTREAM_COMPRESSION": "otlp=gzip,loki=none"}, b"/loki/api/v1/push", []),
        ]
        for env, path, headers in cases:
            proxy = MemoryProxy(**env)
            body = b"x" * 3000
            proxy.send(push(path, body, *headers))
            signal = {b"/a": "prometheus", b"/o": "otlp", b"/l": "loki"}[path[:2]]
            ((_, _, sent_headers, sent),) = sent_requests(proxy.upstream(signal)[1].value())
            self.assertEqual(sent, body, (env, path))
            self.assertEqual(sent_headers.getRawHeaders(b"content-length"), [b"3000"])
            self.assertEqual(
                sent_headers.getRawHeaders(b"content-encoding"),
                [h.split(b": ")[1] for h in headers if h.startswith(b"Content-Encoding")] or None,
            )
            self.assertEqual(
                proxy.sample(
                    "proxy_upstream_compression_bytes_total", upstream=signal, stage="before"
                ),
                0,
            )

    def test_upstream_framing_parses(self) -> None:
        # What goes up is one well-formed request an HTTP parser reads whole.
        proxy = MemoryProxy(UPSTREAM_COMPRESSION="gzip", UPSTREAM_COMPRESSION_LEVEL="9")
        body = json_lines(1000)
        proxy.send(push(b"/otlp/v1/logs", body, b"Content-Encoding: identity"))
        raw = proxy.upstream("otlp")[1].value()
        done: list[bytes] = []
        parts: list[bytes] = []

        class Sink:
            def on_body(self, data: bytes) -> None:
                parts.append(data)

            def on_message_complete(self) -> None:
                done.append(b"".join(parts))

        httptools.HttpRequestParser(Sink()).feed_data(raw)
        self.assertEqual(len(done), 1)
        self.assertEqual(gzip.decompress(done[0]), body)
