"""A Content-Length request body across client reads, in memory: whatever
way the bytes are cut into reads, the upstream gets the body whole, the
request after it is read and answered in turn, ``proxy_request_body_bytes``
counts the body once, and a client gone mid-body is a client abort."""

from __future__ import annotations

import httptools
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.memory import MemoryProxy, sent_requests

BODY = b"0123456789"
PUSH = b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\n" + BODY
SECOND = b"GET /loki/api/v1/second HTTP/1.1\r\nHost: p\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def upstream_requests(proxy: MemoryProxy) -> list[tuple[bytes, bytes]]:
    """Target and body of every request sent to the Loki upstream, in order."""
    return [
        (target, body)
        for _, transport in proxy.endpoints["loki"].connections
        for _, target, _, body in sent_requests(transport.value())
    ]


def answer_all(proxy: MemoryProxy) -> None:
    """Answer each upstream request once (the pipelined one goes up only
    after the first is answered)."""
    answered: dict[int, int] = {}
    for _ in range(10):
        for index, (proto, transport) in enumerate(proxy.endpoints["loki"].connections):
            waiting = len(sent_requests(transport.value())) - answered.get(index, 0)
            for _ in range(waiting):
                proto.dataReceived(OK)
            answered[index] = answered.get(index, 0) + waiting


class SplitBodyTests(TestCase):
    def test_body_cut_at_every_offset_with_a_request_behind_it(self) -> None:
        stream = PUSH + SECOND
        for cut in range(1, len(stream)):
            proxy = MemoryProxy()
            proto, client = proxy.connect()
            proto.dataReceived(stream[:cut])
            proto.dataReceived(stream[cut:])
            answer_all(proxy)
            self.assertEqual(
                upstream_requests(proxy),
                [(b"/loki/api/v1/push", BODY), (b"/loki/api/v1/second", b"")],
                f"cut at {cut}",
            )
            self.assertEqual(client.value().count(b"HTTP/1.1 200 OK"), 2, f"cut at {cut}")
            self.assertFalse(client.disconnecting, f"cut at {cut}")
            self.assertEqual(proxy.sample("proxy_request_body_bytes_total", upstream="loki"), 10)

    def test_body_in_many_reads_then_the_next_head_in_its_last_read(self) -> None:
        proxy = MemoryProxy()
        proto, client = proxy.connect()
        head = PUSH[: -len(BODY)]
        proto.dataReceived(head)
        for byte in range(len(BODY) - 1):
            proto.dataReceived(BODY[byte : byte + 1])
        proto.dataReceived(BODY[-1:] + SECOND)
        answer_all(proxy)
        self.assertEqual(
            upstream_requests(proxy),
            [(b"/loki/api/v1/push", BODY), (b"/loki/api/v1/second", b"")],
        )
        self.assertEqual(client.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_garbage_after_the_body_is_refused(self) -> None:
        # What follows a body is still parsed at once, whatever read it came
        # in: a broken request line refuses the connection (501, the request
        # in progress is not answered) and nothing of it goes upstream.
        proxy = MemoryProxy()
        proto, client = proxy.connect()
        proto.dataReceived(PUSH[:-4])
        proto.dataReceived(PUSH[-4:] + b"\x01\x02 nonsense\r\n\r\n")
        answer_all(proxy)
        self.assertEqual([target for target, _ in upstream_requests(proxy)], [b"/loki/api/v1/push"])
        value = client.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 501 "), value)
        self.assertEqual(value.count(b"HTTP/1.1 "), 1, value)
        self.assertTrue(client.disconnecting)

    def test_content_length_zero_then_a_pipelined_request(self) -> None:
        proxy = MemoryProxy()
        proto, client = proxy.connect()
        empty = b"POST /loki/api/v1/push HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n"
        proto.dataReceived(empty)
        proto.dataReceived(SECOND)
        answer_all(proxy)
        self.assertEqual(
            upstream_requests(proxy),
            [(b"/loki/api/v1/push", b""), (b"/loki/api/v1/second", b"")],
        )
        self.assertEqual(client.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_client_closing_mid_body_is_a_client_abort(self) -> None:
        proxy = MemoryProxy()
        proto, _client = proxy.connect()
        proto.dataReceived(PUSH[:-6])
        proto.dataReceived(BODY[4:6])
        upstream = proxy.endpoints["loki"].connections[-1][1]
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(upstream.disconnecting)  # a half body never looks whole
        self.assertEqual(
            proxy.sample("proxy_upstream_errors_total", upstream="loki", reason="client_abort"),
            1,
        )
        self.assertEqual(
            proxy.sample("proxy_requests_total", upstream="loki", method="POST", status="499"),
            1,
        )
        self.assertEqual(proxy.sample("proxy_request_body_bytes_total", upstream="loki"), 6)

    def test_error_in_a_body_callback_is_a_500(self) -> None:
        proxy = MemoryProxy()
        proto, client = proxy.connect()
        proto.dataReceived(PUSH[:-6])
        upstream = proxy.endpoints["loki"].connections[-1][1]

        def broken(data: bytes) -> None:
            raise RuntimeError("broken")

        proto._reader.parsing.on_body = broken
        proto.dataReceived(BODY[4:])
        self.assertEqual(len(self.flushLoggedErrors(httptools.HttpParserCallbackError)), 1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 "), client.value())
        self.assertTrue(client.disconnecting)
        self.assertTrue(upstream.disconnecting)
