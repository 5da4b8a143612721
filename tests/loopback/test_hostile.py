"""Hostile input on real loopback sockets: refused with the right status, never
forwarded, and the proxy keeps serving everyone else.

Each test starts a recording upstream and a real `ProxySite`, speaks raw bytes
to it, and checks three things: the status the client sees, that the upstream
saw nothing, and that a normal request still works afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import TestCase

from tests.support.helpers import (
    ProxyFixture,
    RawClient,
    Recorder,
    env_for,
    json_body,
    listen,
    raw_connect,
    raw_request,
    sleep,
    status_of,
    upstream_site,
)

#: The body limit used by every test here (small, so tests stay fast).
LIMIT = 1024

NORMAL_PATH = b"/loki/api/v1/labels"
NORMAL = b"GET " + NORMAL_PATH + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"


def now() -> float:
    return reactor.seconds()  # type: ignore[attr-defined,no-any-return]


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` on the real reactor; False if it never held in time."""
    deadline = now() + timeout
    while not predicate():
        if now() >= deadline:
            return False
        await sleep(0.01)
    return True


def response_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole final response framed by Content-Length
    (interim 1xx responses are skipped)."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        status = status_of(head)
        if 100 <= status < 200:
            data = rest
            continue
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return length is not None and len(rest) >= length


def head_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[0]


@attrs.define
class Reply:
    data: bytes
    #: The server closed the connection (rather than us, at the deadline).
    closed: bool

    @property
    def status(self) -> int:
        return status_of(self.data)


class HostileInputTests(TestCase):
    fixture: ProxyFixture
    recorder: Recorder
    port: int

    # -- scaffolding -----------------------------------------------------------

    def start(self, **extra: str) -> None:
        """A recording upstream and a proxy in front of it, torn down after the test."""
        self.recorder = Recorder()
        upstream = listen(upstream_site(self.recorder))
        self.addCleanup(upstream.stopListening)
        env = env_for(
            f"http://127.0.0.1:{upstream.getHost().port}",
            MAX_REQUEST_BODY_BYTES=str(LIMIT),
            **extra,
        )
        self.fixture = fixture = ProxyFixture(env)
        self.addCleanup(lambda: Deferred.fromCoroutine(fixture.close()))
        self.port = fixture.port.getHost().port

    async def connect(self) -> RawClient:
        client = await raw_connect(self.port)

        def cleanup() -> Deferred[bytes] | None:
            if client.closed.called:
                return None
            client.transport.abortConnection()
            return client.closed

        self.addCleanup(cleanup)
        return client

    async def exchange(
        self, data: bytes | Iterable[bytes], *, wait_close: bool = False, timeout: float = 3.0
    ) -> Reply:
        """Send ``data`` on a new connection; wait for a whole response (or, with
        ``wait_close``, for the server to close) at most ``timeout`` seconds."""
        client = await self.connect()
        if isinstance(data, bytes):
            client.transport.write(data)
        else:
            client.transport.writeSequence(list(data))

        def done() -> bool:
            if client.closed.called:
                return True
            return not wait_close and response_complete(bytes(client.data))

        await until(done, timeout)
        closed = client.closed.called
        if not closed:
            client.transport.abortConnection()
            await client.closed
        return Reply(bytes(client.data), closed)

    async def assert_serving(self) -> None:
        """A normal request still goes through, and is the only thing upstream saw."""
        before = len(self.recorder.seen)
        raw = await raw_request(self.port, NORMAL, timeout=5.0)
        self.assertEqual(status_of(raw), 200, raw[:500])
        self.assertEqual(len(self.recorder.seen), before + 1)
        self.assertEqual(self.recorder.seen[-1].uri, NORMAL_PATH)

    def assert_json_error(self, raw: bytes) -> None:
        self.assertIn(b"content-type: application/json", head_of(raw).lower(), raw[:500])
        body = json_body(raw)
        self.assertIsInstance(body, dict)
        self.assertIn("error", body)

    def assert_nothing_forwarded(self) -> None:
        self.assertEqual(self.recorder.seen, [], "a hostile request reached the upstream")

    async def refused(
        self,
        data: bytes | Iterable[bytes],
        statuses: int | tuple[int, ...],
        *,
        must_close: bool,
        timeout: float = 3.0,
    ) -> Reply:
        """Send one hostile request; check its status, that it went nowhere, that
        exactly one response came back (nothing smuggled behind it got an answer),
        and, for input that cannot be framed, that the connection was closed."""
        if isinstance(statuses, int):
            statuses = (statuses,)
        reply = await self.exchange(data, wait_close=must_close, timeout=timeout)
        self.assertIn(reply.status, statuses, reply.data[:500])
        self.assert_json_error(reply.data)
        self.assertEqual(reply.data.count(b"HTTP/1."), 1, reply.data[:500])
        if must_close:
            self.assertTrue(reply.closed, "the proxy kept a connection it cannot re-frame")
        self.assert_nothing_forwarded()
        return reply

    async def check_refused(self, case: Refused) -> None:
        """A fresh proxy; each of ``case.requests`` refused on its own
        connection (`refused`), and a normal request served afterwards."""
        self.start()
        for request in case.requests:
            await self.refused(request, case.statuses, must_close=case.must_close)
        if case.settle:
            await sleep(0.2)
            self.assert_nothing_forwarded()
        await self.assert_serving()

    # -- framing, targets and heads: most are in the REFUSED table at the end ------

    # -- request targets ---------------------------------------------------------

    async def test_dot_segments_and_encoded_slashes(self) -> None:
        self.start()
        targets = [
            b"/prometheus/../admin",
            b"/prometheus/%2e%2e/x",
            b"/prometheus/%2E%2E/x",
            b"/prometheus/.%2e/x",
            b"/prometheus/./x",
            b"/prometheus/%2e/x",
            b"/loki/..",
            b"/loki/a%2Fb",
            b"/loki/a%2fb",
        ]
        for target in targets:
            reply = await self.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")
            self.assertEqual(reply.status, 400, (target, reply.data[:500]))
            self.assert_json_error(reply.data)
            self.assertEqual(self.recorder.seen, [], target)
        await self.assert_serving()

    async def test_overlong_target(self) -> None:
        self.start()
        # Just over the 8 KiB target limit, and far over it (past the line limit).
        for size in (8193, 8300, 20000):
            target = b"/loki/" + b"a" * (size - len(b"/loki/"))
            reply = await self.exchange(b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")
            self.assertEqual(reply.status, 414, (size, reply.data[:500]))
            self.assert_json_error(reply.data)
            self.assert_nothing_forwarded()
        await self.assert_serving()

    async def test_long_query_within_limit_passes(self) -> None:
        # The control for the test above: a long but legal target is forwarded.
        self.start()
        target = b"/loki/api/v1/query?q=" + b"x" * 7000
        raw = await raw_request(
            self.port, b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status_of(raw), 200, raw[:500])
        self.assertEqual([s.uri for s in self.recorder.seen], [target])

    # -- request heads -----------------------------------------------------------

    async def test_too_many_headers(self) -> None:
        self.start()
        headers = b"".join(b"X-%d: v\r\n" % i for i in range(501))
        self.assertLess(len(headers), 16 * 1024)  # the count, not the size, is what is wrong
        await self.refused(
            b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: proxy\r\n" + headers + b"\r\n",
            (400, 431),
            must_close=True,
        )
        await self.assert_serving()

    # -- request bodies ------------------------------------------------------------

    async def test_body_over_limit_with_content_length(self) -> None:
        self.start()
        body = b"b" * (LIMIT + 1)
        reply = await self.refused(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body,
            413,
            must_close=False,
        )
        self.assertEqual(json_body(reply.data)["upstream"], "loki")
        await self.assert_serving()

    async def test_body_at_limit_passes(self) -> None:
        # The control: exactly MAX_REQUEST_BODY_BYTES is allowed.
        self.start()
        body = b"b" * LIMIT
        raw = await raw_request(
            self.port,
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body,
        )
        self.assertEqual(status_of(raw), 200, raw[:500])
        self.assertEqual([s.body for s in self.recorder.seen], [body])

    async def test_body_over_limit_with_expect_continue(self) -> None:
        self.start()
        client = await self.connect()
        client.transport.write(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (LIMIT * 100)
        )
        # The body is never sent: the answer must come without it.
        answered = await until(lambda: response_complete(bytes(client.data)), 2.0)
        data = bytes(client.data)
        self.assertTrue(answered, data[:500])
        self.assertFalse(data.startswith(b"HTTP/1.1 100"), "100 Continue sent for a refused body")
        self.assertEqual(status_of(data), 413, data[:500])
        self.assert_json_error(data)
        closed = await until(lambda: client.closed.called, 2.0)
        self.assertTrue(closed, "connection left open with an unread body announced")
        self.assert_nothing_forwarded()
        await self.assert_serving()

    async def test_declared_body_over_limit_answered_before_it_is_sent(self) -> None:
        """Issue 20 item 14: a client that waits for an answer before
        sending a body declared over the limit gets 413 at once (not after
        up to 64 MiB read and dropped), then the connection closes."""
        self.start()
        for declared in (LIMIT * 2, 60 * 1024 * 1024, 2**32 + 42):
            client = await self.connect()
            client.transport.write(
                b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\n"
                b"Content-Length: %d\r\n\r\n" % declared
            )
            answered = await until(lambda c=client: response_complete(bytes(c.data)), 2.0)
            data = bytes(client.data)
            self.assertTrue(answered, (declared, data[:500]))
            self.assertEqual(status_of(data), 413, data[:500])
            self.assertIn(b"Connection: close", data)
            self.assert_json_error(data)
            # It lingers briefly for a body that may be on its way, then closes.
            closed = await until(lambda c=client: c.closed.called, 5.0)
            self.assertTrue(closed, "connection left open after the 413")
        self.assert_nothing_forwarded()
        await self.assert_serving()

    async def test_declared_body_over_limit_sent_anyway_reads_the_answer(self) -> None:
        """A client already streaming the body reads the 413, not a reset:
        what it sends meanwhile is dropped, and the connection closes once
        the declared body is in."""
        self.start()
        body = b"p" * (LIMIT * 512)  # 512 KiB, far beyond the limit
        client = await self.connect()
        client.transport.write(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for start in range(0, len(body), 65536):
            client.transport.write(body[start : start + 65536])
            await sleep(0.001)
        closed = await until(lambda: client.closed.called, 5.0)
        data = bytes(client.data)
        self.assertTrue(closed, "connection left open")
        self.assertEqual(status_of(data), 413, data[:500])
        self.assertTrue(response_complete(data), data[:500])
        # Closed with a FIN once the declared body was in, not reset under the answer.
        assert client.reason is not None
        self.assertTrue(client.reason.check(ConnectionDone), client.reason)
        self.assert_nothing_forwarded()
        await self.assert_serving()

    async def test_chunked_body_over_limit(self) -> None:
        self.start()
        piece = b"0123456789abcdef" * 32  # 512 bytes
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(6)]  # 3 KiB in all
        reply = await self.exchange(
            [
                b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n",
                *chunks,
                b"0\r\n\r\n",
            ]
        )
        if reply.data:
            self.assertEqual(reply.status, 413, reply.data[:500])
            self.assert_json_error(reply.data)
        else:
            self.assertTrue(reply.closed, "no answer and the connection left open")
        await sleep(0.2)
        self.assert_nothing_forwarded()
        await self.assert_serving()

    async def test_chunked_body_over_limit_sent_slowly(self) -> None:
        # The upstream call has started streaming by the time the limit is
        # crossed: it must be cut, not completed with a truncated body.
        self.start()
        piece = b"z" * 400
        client = await self.connect()
        client.transport.write(
            b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(4):  # 1600 bytes > LIMIT
            await sleep(0.05)
            if client.closed.called:
                break
            client.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if not client.closed.called:
            client.transport.write(b"0\r\n\r\n")
        await until(lambda: client.closed.called or response_complete(bytes(client.data)), 3.0)
        data = bytes(client.data)
        if data:
            self.assertEqual(status_of(data), 413, data[:500])
            self.assert_json_error(data)
        else:
            self.assertTrue(client.closed.called, "no answer and the connection left open")
        await sleep(0.2)
        self.assert_nothing_forwarded()
        await self.assert_serving()

    # -- slow and idle clients -------------------------------------------------------

    async def dribble(self, client: RawClient, head: bytes) -> None:
        """Send ``head`` a byte every 50 ms (over 3 s in all), each byte
        keeping the connection busy; the proxy must cut it before the head is
        whole, however fast the machine (its timer counts from the start)."""
        sent = 0
        while sent < len(head) and not client.closed.called:
            client.transport.write(head[sent : sent + 1])
            sent += 1
            await sleep(0.05)
        closed = await until(lambda: client.closed.called, 1.0)
        self.assertTrue(closed, "a client dribbling its head was never disconnected")
        self.assertLess(sent, len(head), "the proxy waited for the whole dribbled head")

    async def test_slow_head_is_disconnected(self) -> None:
        self.start(CLIENT_HEADER_TIMEOUT_SECONDS="0.5")
        head = b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: proxy\r\nX-Slow: yes\r\n\r\n"
        client = await self.connect()
        await self.dribble(client, head)
        data = bytes(client.data)
        self.assertEqual(status_of(data), 408, data[:500])
        self.assert_json_error(data)
        self.assert_nothing_forwarded()
        await self.assert_serving()

    async def test_slow_head_on_a_keepalive_connection(self) -> None:
        self.start(CLIENT_HEADER_TIMEOUT_SECONDS="0.5")
        client = await self.connect()
        client.transport.write(b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertTrue(await until(lambda: response_complete(bytes(client.data)), 3.0))
        self.assertEqual(status_of(bytes(client.data)), 200)
        first = len(client.data)
        await self.dribble(client, b"GET /loki/api/v1/second HTTP/1.1\r\nHost: proxy\r\n\r\n")
        data = bytes(client.data)[first:]
        self.assertEqual(status_of(data), 408, data[:500])
        self.assertEqual([s.uri for s in self.recorder.seen], [b"/loki/api/v1/labels"])

    async def test_idle_keepalive_connection_is_closed(self) -> None:
        self.start(CLIENT_IDLE_TIMEOUT_SECONDS="0.5")
        client = await self.connect()
        client.transport.write(b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: proxy\r\n\r\n")
        open_when_whole: list[bool] = []

        def whole() -> bool:
            if not response_complete(bytes(client.data)):
                return False
            open_when_whole.append(not client.closed.called)  # in the same look
            return True

        self.assertTrue(await until(whole, 3.0))
        self.assertEqual(status_of(bytes(client.data)), 200)
        # Kept alive past the response (it is keep-alive), then closed as idle.
        self.assertNotIn(b"connection: close", head_of(bytes(client.data)).lower())
        self.assertEqual(open_when_whole, [True], "closed with the response, not after idling")
        closed = await until(lambda: client.closed.called, 3.0)
        self.assertTrue(closed, "an idle keep-alive connection was never closed")
        self.assertEqual(len(self.recorder.seen), 1)
        await self.assert_serving()

    async def test_silent_connection_is_closed(self) -> None:
        self.start(CLIENT_IDLE_TIMEOUT_SECONDS="0.5")
        client = await self.connect()
        closed = await until(lambda: client.closed.called, 3.0)
        self.assertTrue(closed, "a connection that never sent anything was kept open")
        self.assert_nothing_forwarded()
        await self.assert_serving()

    # -- connection limit ------------------------------------------------------------

    async def test_max_connections(self) -> None:
        self.start(MAX_CONNECTIONS="3")
        held = [await self.connect() for _ in range(3)]
        self.assertTrue(await until(lambda: len(self.fixture.factory.connections) == 3, 2.0))

        reply = await self.exchange(NORMAL, wait_close=True)
        self.assertEqual(reply.status, 503, reply.data[:500])
        self.assert_json_error(reply.data)
        self.assertTrue(reply.closed, "a connection past MAX_CONNECTIONS was kept open")
        self.assert_nothing_forwarded()
        # The held connections are unaffected.
        self.assertFalse(any(c.closed.called for c in held))

        held[0].transport.loseConnection()
        self.assertTrue(await until(lambda: len(self.fixture.factory.connections) == 2, 2.0))
        await self.assert_serving()

        # And one of the connections that were held open is served too.
        client = held[1]
        client.transport.write(NORMAL)
        self.assertTrue(await until(lambda: client.closed.called, 3.0))
        self.assertEqual(status_of(bytes(client.data)), 200, bytes(client.data)[:500])
        self.assertEqual(len(self.recorder.seen), 2)


# -- the table-driven cases: one test each, named after its key ----------------------


@attrs.frozen
class Refused:
    """Hostile requests (each on its own connection) and the status they get."""

    requests: tuple[bytes, ...]
    statuses: tuple[int, ...]
    #: Input that cannot be framed: the connection must be closed after the answer.
    must_close: bool
    #: The request may have started an upstream call before it went bad: look
    #: again a moment later that the call was abandoned, never completed.
    settle: bool = False


PUSH = b"POST /loki/api/v1/push HTTP/1.1\r\nHost: proxy\r\n"
LABELS = b"GET /loki/api/v1/labels HTTP/1.1\r\nHost: proxy\r\n"
SMUGGLED = b"GET /loki/smuggled HTTP/1.1\r\nHost: proxy\r\n\r\n"

REFUSED = {
    # -- message framing
    "content_length_and_transfer_encoding": Refused(
        (PUSH + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,),
        (400,),
        must_close=True,
    ),
    "transfer_encoding_then_content_length": Refused(
        (
            PUSH + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        ),
        (400,),
        must_close=True,
    ),
    "two_different_content_lengths": Refused(
        (PUSH + b"Content-Length: 5\r\nContent-Length: 45\r\n\r\nhello" + SMUGGLED,),
        (400,),
        must_close=True,
    ),
    "two_content_lengths_in_one_header": Refused(
        (PUSH + b"Content-Length: 5, 45\r\n\r\nhello",), (400,), must_close=True
    ),
    "malformed_chunk_size": Refused(
        (PUSH + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",),
        (400,),
        must_close=True,
    ),
    "malformed_chunk_after_a_good_one": Refused(
        (PUSH + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-3\r\nabc\r\n0\r\n\r\n",),
        (400,),
        must_close=True,
        settle=True,
    ),
    "chunk_data_longer_than_its_size": Refused(
        (PUSH + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",),
        (400,),
        must_close=True,
        settle=True,
    ),
    "obsolete_line_folding": Refused(
        (
            LABELS + b"X-Folded: first\r\n  second\r\n\r\n",
            LABELS + b"X-Folded: first\r\n\tsecond\r\n\r\n",
        ),
        (400,),
        must_close=True,
    ),
    # -- request targets
    "absolute_form_target": Refused(
        (
            b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            # Even one whose path would match a route.
            b"GET http://evil.example/loki/api/v1/labels HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        ),
        (400,),
        must_close=False,
    ),
    "connect": Refused(
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",),
        (400,),
        must_close=False,
    ),
    "asterisk_form": Refused(
        (b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\n\r\n",), (400,), must_close=False
    ),
    # -- request heads
    "overlong_head": Refused(
        (LABELS + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 480) for i in range(40)) + b"\r\n",),
        (431,),
        must_close=True,
    ),
    "overlong_single_header_line": Refused(
        (LABELS + b"X-Big: " + b"v" * 20000 + b"\r\n\r\n",), (431,), must_close=True
    ),
}


def _refused_test(case: Refused) -> Callable[[HostileInputTests], Coroutine[Any, Any, None]]:
    async def test(self: HostileInputTests) -> None:
        await self.check_refused(case)

    return test


for _name, _case in REFUSED.items():
    setattr(HostileInputTests, f"test_{_name}", _refused_test(_case))
