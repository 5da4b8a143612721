"""Rollouts and listening, against the real ``twistd -n lgmt-proxy`` process.

The clients here are blocking sockets in threads with a small HTTP/1.1
response parser, as honest as a client gets: a request counts as *cut* when
it was sent whole and its response never arrived whole (EOF, reset or
timeout first). Between requests a client looks at its connection the way a
connection pool does before reusing one (closed by the peer: reconnect), and
it never reuses a connection after a response that says
``Connection: close``. A connect that is refused is not a cut: nothing was
sent, and the client has moved on to another pod.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.support.helpers import (
    ProxyProcess,
    env_for,
    listen,
    sleep,
    spawn_proxy,
    twistd_path,
    upstream_site,
)

DELAY = 1.5
GRACE = 5.0
CLIENTS = 8
#: Bounds on every client loop, whatever happens.
MAX_REQUESTS_PER_CLIENT = 3000
CLIENT_SECONDS = 20.0
SOCKET_TIMEOUT = 10.0


# -- the upstream ----------------------------------------------------------------------------


class _Echo(Resource):
    """Answers every request after ``delay_ms`` (from the query) with a body
    naming it: ``<seq> <request body bytes> <crc32 of the body>\\n`` and
    ``pad`` dots; Content-Length on even ``seq``, chunked on odd. A request
    with ``hold=<name>`` waits until the test releases it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        #: The ``seq`` of every request that reached the upstream.
        self.seqs: list[int] = []
        self._holds: dict[str, Deferred[None]] = {}
        self._arrived: dict[str, Deferred[None]] = {}

    def arrival(self, name: str) -> Deferred[None]:
        return self._arrived.setdefault(name, Deferred())

    def release(self, name: str) -> None:
        self._holds.pop(name).callback(None)

    def render(self, request: Any) -> Any:
        self.count += 1
        request.content.seek(0)
        body = request.content.read()
        args = request.args
        seq = int(args.get(b"seq", [b"0"])[0])
        self.seqs.append(seq)
        pad = int(args.get(b"pad", [b"0"])[0])
        delay = int(args.get(b"delay_ms", [b"0"])[0]) / 1000.0
        payload = b"%d %d %08x\n" % (seq, len(body), zlib.crc32(body)) + b"." * pad
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(_: object = None) -> None:
            if gone:
                return
            if seq % 2 == 0:
                request.setHeader(b"Content-Length", b"%d" % len(payload))
            request.setHeader(b"Content-Type", b"text/plain")
            half = len(payload) // 2
            request.write(payload[:half])
            request.write(payload[half:])
            request.finish()

        hold = args.get(b"hold", [b""])[0].decode()
        if hold:
            held: Deferred[None] = Deferred()
            held.addCallback(answer)
            self._holds[hold] = held
            self.arrival(hold).callback(None)
        elif delay:
            reactor.callLater(delay, answer)  # type: ignore[attr-defined]
        else:
            answer()
        return NOT_DONE_YET


# -- a raw HTTP/1.1 client ---------------------------------------------------------------------


class Incomplete(Exception):
    """The connection ended (or timed out) before the response was whole."""


class ProtocolError(Exception):
    """Bytes the client cannot make sense of (a proxy bug, never a cut)."""


@attrs.define
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def close(self) -> bool:
        return any(
            token.strip().lower() == b"close"
            for value in self.header(b"connection")
            for token in value.split(b",")
        )


class Connection:
    """One client connection: a blocking socket and what was read past the
    current response (there never should be any: no pipelining)."""

    def __init__(self, host: str, port: int, family: int = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(SOCKET_TIMEOUT)
        try:
            self.sock.connect((host, port))
        except BaseException:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.used = 0
        self.answered_at = 0.0

    def close(self) -> None:
        self.sock.close()

    def closed_by_peer(self) -> bool:
        """What a pool checks before reusing a connection: EOF (or a reset)
        waiting on it. Unread bytes between responses are a protocol error."""
        if self.buf:
            raise ProtocolError(f"bytes after the response: {bytes(self.buf[:80])!r}")
        # (MSG_DONTWAIT would not do: a socket with a timeout waits out EAGAIN.)
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        if data:
            raise ProtocolError(f"bytes between responses: {data!r}")
        return True

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise Incomplete(f"no answer in {SOCKET_TIMEOUT}s") from None
        except OSError as e:
            raise Incomplete(f"{type(e).__name__}: {e}") from None
        if not data:
            raise Incomplete("EOF")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf[:] = rest
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def request(self, method: bytes, target: bytes, host: bytes, body: bytes | None) -> Answer:
        """Send one request whole, then read its response whole.

        Raises `OSError` when sending fails, `Incomplete` when the response does."""
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: rollout-test\r\n" % (
            method,
            target,
            host,
        )
        if body is not None:
            head += b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % len(body)
        self.sock.sendall(head + b"\r\n" + (body or b""))
        self.used += 1
        return self.read_response(method)

    def read_response(self, method: bytes) -> Answer:
        status_line = self._line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"status line {status_line!r}")
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        while True:
            line = self._line()
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"header line {line!r}")
            headers.append((name.strip().lower(), value.strip()))
        answer = Answer(status, headers, b"")
        if 100 <= status < 200:
            raise ProtocolError(f"unexpected interim response {status}")
        if method == b"HEAD" or status in (204, 304):
            return answer
        chunked = any(v.lower() == b"chunked" for v in answer.header(b"transfer-encoding"))
        length = answer.header(b"content-length")
        if chunked:
            body = bytearray()
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass  # trailers
                    break
                body += self._exactly(size)
                if self._exactly(2) != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
            answer.body = bytes(body)
        elif length:
            answer.body = self._exactly(int(length[0]))
        else:
            raise ProtocolError("a response with neither length nor chunked framing")
        return answer


@attrs.define
class Record:
    """One request a client sent, and what became of it."""

    client: int
    seq: int
    method: str
    sent_at: float
    #: The request was the first on its connection.
    fresh: bool
    status: int = 0
    close: bool = False
    cut: str | None = None
    answered_at: float = 0.0
    #: When the response before this one on the same connection arrived.
    previous_at: float = 0.0


class KeepAliveClient(threading.Thread):
    """Sends GETs and POSTs on one persistent connection at a time, in a loop
    bounded in count and time. After ``Connection: close`` (or a connection
    the server closed between requests) it reconnects, unless ``moved`` is
    set (the endpoints have propagated: it goes to another pod and stops
    here); a refused connect also ends it."""

    def __init__(self, number: int, port: int, moved: threading.Event, stop: threading.Event):
        super().__init__(name=f"keep-alive-client-{number}", daemon=True)
        self.number = number
        self.port = port
        self.moved = moved
        self.stop = stop
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.connects = 0
        self.refused = False
        self.ended_by = ""
        self.rng = random.Random(number)

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # anything unexpected fails the test, with its reason
            self.problems.append(f"client {self.number}: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        conn: Connection | None = None
        deadline = time.monotonic() + CLIENT_SECONDS
        host = b"127.0.0.1:%d" % self.port
        seq = self.number * 1_000_000
        try:
            while len(self.records) < MAX_REQUESTS_PER_CLIENT:
                if self.stop.is_set() or time.monotonic() > deadline:
                    self.ended_by = "stopped"
                    return
                if conn is not None and conn.closed_by_peer():
                    conn.close()
                    conn = None
                if conn is None:
                    if self.moved.is_set():
                        self.ended_by = "moved"
                        return
                    try:
                        conn = Connection("127.0.0.1", self.port)
                    except (ConnectionRefusedError, ConnectionResetError):
                        # A connect racing the listener's close can be reset
                        # rather than refused (the kernel drops what it had
                        # queued): either way no request was sent, nothing cut.
                        self.refused = True
                        self.ended_by = "refused"
                        return
                    self.connects += 1
                seq += 1
                post = seq % 3 == 0
                query = b"seq=%d&pad=%d&delay_ms=%d" % (
                    seq,
                    self.rng.choice((0, 100, 3000, 40000)),
                    self.rng.choice((0, 0, 1, 5, 20)),
                )
                if post:
                    method, target = b"POST", b"/loki/api/v1/push?" + query
                    body: bytes | None = self.rng.randbytes(self.rng.choice((10, 2000, 70000)))
                else:
                    method, target = b"GET", b"/loki/api/v1/query_range?query=x&" + query
                    body = None
                record = Record(
                    self.number,
                    seq,
                    method.decode(),
                    time.monotonic(),
                    fresh=conn.used == 0,
                    previous_at=conn.answered_at,
                )
                self.records.append(record)
                try:
                    answer = conn.request(method, target, host, body)
                except (OSError, Incomplete) as e:
                    record.cut = f"{type(e).__name__}: {e}"
                    conn.close()
                    conn = None
                    continue
                record.answered_at = conn.answered_at = time.monotonic()
                record.status = answer.status
                record.close = answer.close
                if answer.status == 200:
                    sent = body or b""
                    expected = b"%d %d %08x\n" % (seq, len(sent), zlib.crc32(sent))
                    if not answer.body.startswith(expected):
                        self.problems.append(
                            f"client {self.number} seq {seq}: body {answer.body[:60]!r}, "
                            f"expected {expected!r}"
                        )
                if answer.close:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()


def _run_clients(port: int, moved: threading.Event, stop: threading.Event) -> list[KeepAliveClient]:
    clients = [KeepAliveClient(n, port, moved, stop) for n in range(CLIENTS)]
    for client in clients:
        client.start()
    return clients


async def _join(threads: Sequence[threading.Thread], timeout: float) -> None:
    """Wait (without blocking the reactor) for threads that are bounded anyway."""
    end = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < end:
        await sleep(0.05)


async def _ready_status(port: int) -> int:
    """GET /ready on a fresh connection (in a thread): its status."""

    def get() -> int:
        conn = Connection("127.0.0.1", port)
        try:
            return conn.request(b"GET", b"/ready", b"127.0.0.1", None).status
        finally:
            conn.close()

    status: int = await deferToThread(get)
    return status


async def _until_draining(port: int) -> float:
    """Poll /ready until 503; the monotonic time it was seen. From then on
    the process has set the proxy draining (both flags are set together)."""
    for _ in range(200):
        if await _ready_status(port) == 503:
            return time.monotonic()
        await sleep(0.01)
    raise AssertionError("/ready never answered 503 after SIGTERM")


async def _until_refused(port: int, timeout: float) -> float:
    """Probe connects until one is refused (the listener closed)."""
    end = time.monotonic() + timeout

    def probe() -> bool:
        try:
            Connection("127.0.0.1", port).close()
        except ConnectionRefusedError:
            return True
        return False

    while time.monotonic() < end:
        if await deferToThread(probe):
            return time.monotonic()
        await sleep(0.02)
    raise AssertionError(f"the listener still accepted connections {timeout}s on")


def _summary(cut: list[Record], total: int, signalled: float) -> str:

    def where(r: Record) -> str:
        if r.fresh:
            return "first on its connection"
        return f"reused {(r.sent_at - r.previous_at) * 1000:.2f} ms after the previous response"

    return f"{total} requests, {len(cut)} cut: " + "; ".join(
        f"client {r.client} seq {r.seq} {r.method} sent {r.sent_at - signalled:+.3f}s "
        f"from SIGTERM, {where(r)}: {r.cut}"
        for r in cut[:10]
    )


class RolloutTests(TestCase):
    timeout = 120

    async def _proxy(self, **extra: str) -> tuple[_Echo, ProxyProcess]:
        up = _Echo()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            SHUTDOWN_DELAY_SECONDS=str(DELAY),
            SHUTDOWN_GRACE_SECONDS=str(GRACE),
            **extra,
        )
        proc = await spawn_proxy(env)

        async def reap() -> None:
            if not proc.ended.called:
                proc.signal("KILL")
                await proc.ended

        self.addCleanup(reap)
        self.assertFalse(proc.ended.called, proc.output.decode())
        return up, proc

    async def _through_sigterm(self, *, move_after: float | None) -> None:
        """Eight keep-alive clients through a SIGTERM; ``move_after`` seconds
        after it the endpoints have propagated and clients that reconnect go
        elsewhere (None: they come back until their connect is refused)."""
        up, proc = await self._proxy()
        moved, stop = threading.Event(), threading.Event()
        clients = _run_clients(proc.port, moved, stop)
        self.addCleanup(stop.set)
        await sleep(1.0)
        before = sum(len(c.records) for c in clients)
        proc.signal("TERM")
        signalled = time.monotonic()
        drained = await _until_draining(proc.port)
        if move_after is not None:
            await sleep(max(0.0, signalled + move_after - time.monotonic()))
            moved.set()
        await _join(clients, CLIENT_SECONDS + SOCKET_TIMEOUT + 5)
        code = await proc.ended
        out = proc.output.decode()
        self.assertFalse(any(c.is_alive() for c in clients), "a client never ended")

        records = [r for c in clients for r in c.records]
        problems = [p for c in clients for p in c.problems]
        self.assertEqual(problems, [])
        # Traffic really ran on both sides of the signal, on reused connections.
        self.assertGreater(before, 50, "too little traffic before SIGTERM")
        for client in clients:
            self.assertTrue(
                any(r.sent_at > drained for r in client.records),
                f"client {client.number} sent nothing while draining",
            )
        self.assertTrue(any(not r.fresh for r in records if r.sent_at < signalled))

        self.assertEqual(sorted({r.status for r in records if not r.cut and r.status != 200}), [])
        # The upstream saw each answered request once, and no cut one.
        self.assertEqual(sorted(up.seqs), sorted(r.seq for r in records if not r.cut))
        # From the moment /ready said 503 every request was answered with
        # Connection: close (and the client therefore reconnected).
        late = [r for r in records if r.sent_at > drained and not r.cut]
        self.assertTrue(late)
        self.assertEqual(
            [(r.client, r.seq) for r in late if not r.close],
            [],
            "responses to requests sent while draining without Connection: close",
        )
        if move_after is not None:
            self.assertTrue(all(c.ended_by == "moved" for c in clients))
            allowed: list[Record] = []
        else:
            self.assertTrue(all(c.ended_by == "refused" for c in clients))
            # A connection opened in the instant the listener closes is lost
            # whatever the server: reset by the kernel if it was still in the
            # accept queue, or closed as idle by the drain before its first
            # request arrived (EOF). A request sent on one is lost, but it
            # never reached the upstream (checked above), so it is safe to
            # send again; any other cut is not allowed.
            allowed = [
                r for r in records if r.cut and r.fresh and r.sent_at > signalled + DELAY * 0.8
            ]
        # It ended by itself, cutting nothing (when the listener closes and
        # that no grace period is waited out are checked on a fake clock:
        # test_ops.DrainClockTests).
        self.assertEqual(code, 0, out)
        self.assertNotIn("were cut", out)
        # A request routed before SIGTERM and answered after it must say
        # "Connection: close" too, or a client reusing the connection at
        # once has its next request cut (the build before this test cut 1 to
        # 6 per run, sent within ~20 ms of the SIGTERM).
        cut = [r for r in records if r.cut and r not in allowed]
        self.assertEqual(cut, [], _summary(cut, len(records), signalled))

    async def test_keepalive_clients_through_sigterm_none_cut(self) -> None:
        """Clients keep coming back for half the delay (endpoints propagating),
        then go to other pods: no request cut, every answer 200, Connection:
        close on each from the drain on, exit 0."""
        await self._through_sigterm(move_after=DELAY / 2)

    async def test_keepalive_clients_until_refused_none_cut(self) -> None:
        """The worst case: endpoints never propagate within the delay, so the
        clients reconnect to this process until the connect is refused. No
        request cut but on a connection opened in the instant the listener
        closed (and those never reached the upstream)."""
        await self._through_sigterm(move_after=None)

    async def test_response_in_flight_at_sigterm_says_connection_close(self) -> None:
        """A request on a reused keep-alive connection, held by the upstream
        across the SIGTERM: its response (sent after /ready said 503) says
        Connection: close, and the connection closes after it."""
        up, proc = await self._proxy()
        conn = Connection("127.0.0.1", proc.port)
        self.addCleanup(conn.close)
        host = b"127.0.0.1:%d" % proc.port
        first = await deferToThread(conn.request, b"GET", b"/loki/api/v1/labels?seq=2", host, None)
        self.assertEqual((first.status, first.close), (200, False))
        held = deferToThread(conn.request, b"GET", b"/loki/api/v1/labels?seq=4&hold=a", host, None)
        await up.arrival("a")
        proc.signal("TERM")
        await _until_draining(proc.port)
        up.release("a")
        answer = await held
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.body.startswith(b"4 0 "))
        # The connection is closed right after the response.
        eof = await deferToThread(conn.sock.recv, 1)
        self.assertEqual(eof, b"")
        self.assertEqual(await proc.ended, 0, proc.output.decode())
        # The drain decides at the response head, not when the request came
        # in: told keep-alive, the client would reuse a closing connection.
        self.assertTrue(
            answer.close,
            f"response head after SIGTERM without Connection: close: {answer.headers}",
        )

    async def test_in_flight_request_finishes_and_idle_connection_closes(self) -> None:
        """After the delay the listener closes; a request still in flight then
        finishes (with Connection: close), an idle keep-alive connection is
        closed cleanly (EOF, not a reset) and the process exits 0, cutting
        nothing (the timing itself: test_ops.DrainClockTests)."""
        up, proc = await self._proxy()
        host = b"127.0.0.1:%d" % proc.port
        idle = Connection("127.0.0.1", proc.port)
        self.addCleanup(idle.close)
        busy = Connection("127.0.0.1", proc.port)
        self.addCleanup(busy.close)
        for conn in (idle, busy):
            answer = await deferToThread(conn.request, b"GET", b"/loki/x?seq=2", host, None)
            self.assertEqual((answer.status, answer.close), (200, False))
        proc.signal("TERM")
        await _until_draining(proc.port)
        body = b"z" * 100000
        held = deferToThread(busy.request, b"POST", b"/loki/api/v1/push?seq=6&hold=b", host, body)
        await up.arrival("b")
        await _until_refused(proc.port, DELAY + 3)
        # The idle connection was closed when the listener closed: EOF.
        eof = await deferToThread(idle.sock.recv, 1)
        self.assertEqual(eof, b"")
        await sleep(0.5)
        self.assertFalse(proc.ended.called, "exited with a request in flight")
        up.release("b")
        answer = await held
        self.assertEqual((answer.status, answer.close), (200, True))
        self.assertTrue(answer.body.startswith(b"6 100000 %08x\n" % zlib.crc32(body)))
        code = await proc.ended
        self.assertEqual(code, 0, proc.output.decode())
        self.assertNotIn("were cut", proc.output.decode())


# -- listening -------------------------------------------------------------------------------


def _free_dual_stack_port() -> int:
    """A port free on both ``::`` and 0.0.0.0 (one dual-stack socket)."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        port: int = s.getsockname()[1]
    finally:
        s.close()
    return port


def _ipv6_loopback() -> str | None:
    """Why this host cannot test IPv6 (None: it can)."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        return f"no IPv6 loopback on this host (binding ::1: {e})"
    return None


def _get(host: str, port: int, path: bytes, family: int) -> Answer:
    conn = Connection(host, port, family)
    try:
        name = f"[{host}]" if family == socket.AF_INET6 else host
        return conn.request(b"GET", path, b"%s:%d" % (name.encode(), port), None)
    finally:
        conn.close()


class ListenTests(TestCase):
    timeout = 60

    async def test_default_listen_answers_on_ipv6_and_ipv4(self) -> None:
        """With PORT and no --listen the process answers on [::1] and on
        127.0.0.1 (the same port), health and a proxied request alike."""
        reason = _ipv6_loopback()
        if reason:
            raise SkipTest(reason)
        up = _Echo()
        upstream = listen(upstream_site(up))
        self.addCleanup(upstream.stopListening)
        proc = ProxyProcess()
        proc.port = _free_dual_stack_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            **env_for(
                f"http://127.0.0.1:{upstream.getHost().port}",
                PORT=str(proc.port),
                SHUTDOWN_DELAY_SECONDS="0",
            ),
        }
        argv = [twistd_path(), "-n", "--pidfile=", "lgmt-proxy"]
        proc.start(argv, env)

        async def stop() -> None:
            if not proc.ended.called:
                proc.signal("TERM")
                await proc.ended

        self.addCleanup(stop)
        for _ in range(200):
            if proc.ended.called:
                break
            try:
                await deferToThread(_get, "127.0.0.1", proc.port, b"/health", socket.AF_INET)
                break
            except (OSError, Incomplete):
                await sleep(0.05)
        self.assertFalse(proc.ended.called, proc.output.decode())

        for host, family in (("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)):
            health = await deferToThread(_get, host, proc.port, b"/health", family)
            self.assertEqual(
                (health.status, json.loads(health.body)), (200, {"status": "ok"}), host
            )
            proxied = await deferToThread(_get, host, proc.port, b"/loki/x?seq=8", family)
            self.assertEqual((proxied.status, proxied.body), (200, b"8 0 00000000\n"), host)
        self.assertEqual(up.count, 2)
        proc.signal("TERM")
        self.assertEqual(await proc.ended, 0, proc.output.decode())
