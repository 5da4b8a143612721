"""One client request: its head, the facts the rules read (gathered once, in
the header pass), the parser's progress through its body and what became of
it (for the access log and the metrics at the end)."""

from __future__ import annotations

from collections.abc import Callable

from lgmt_proxy.io.compress import Gzip
from lgmt_proxy.rules.headers import RawHeaders

#: Header names the header pass notes (one set lookup for any other).
_NOTED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"origin",
        b"authorization",
        b"x-scope-orgid",
        b"connection",
        b"user-agent",
        b"x-request-id",
    }
)


class Incoming:
    """One client request (see the module docstring); provides
    `facts.RequestFacts`. One object per request (its fields are set in four groups below)."""

    __slots__ = (
        "authorization",
        "body_in",
        "body_out",
        "buffered",
        "chunked",
        "complete",
        "connection",
        "consumer",
        "counted",
        "error",
        "expect_continue",
        "from_upstream",
        "gzip",
        "headers",
        "host",
        "host_count",
        "in_flight",
        "in_head",
        "keep_alive",
        "length",
        "method",
        "on_body",
        "on_complete",
        "orgids",
        "origins",
        "path",
        "query",
        "quiet",
        "request_id",
        "started",
        "status",
        "target",
        "tenant",
        "upgrade",
        "upstream_name",
        "user_agent",
        "version",
        "websocket",
    )

    def __init__(self, started: float) -> None:
        # the head
        self.method = b""
        self.target = b""
        self.path = b""
        self.query: bytes | None = None
        self.version = "1.1"
        self.headers: RawHeaders = []
        self.keep_alive = True
        self.expect_continue = False
        self.chunked = False
        self.length: int | None = None
        self.upgrade = False
        # the facts (RequestFacts) and what the access log names
        self.host_count = 0
        self.host: bytes | None = None
        self.origins: list[bytes] | None = None
        self.authorization: list[bytes] | None = None
        self.orgids: list[bytes] | None = None
        self.connection: list[bytes] | None = None
        self.websocket = False
        self.user_agent: bytes | None = None
        self.request_id: bytes | None = None
        # the parser's progress
        self.in_head = True
        self.complete = False
        self.buffered: list[bytes] | None = None
        self.on_body: Callable[[bytes], None] | None = None
        self.on_complete: Callable[[], None] | None = None
        # what became of it
        self.started = started
        self.upstream_name = "none"
        self.body_in = 0
        self.body_out = 0
        self.status = 0
        self.error: str | None = None
        self.consumer: str | None = None
        #: The consumer's tenant sent on a ``from_consumer`` route.
        self.tenant: bytes | None = None
        #: Counted in proxy_requests_in_flight (a proxy route).
        self.in_flight = False
        #: Counted in proxy_requests_total (a proxy route).
        self.counted = False
        #: Probes and scrapes: logged at debug only.
        self.quiet = False
        #: The status came from the upstream (not a refusal or failure of ours).
        self.from_upstream = False
        #: Its body went up gzip'd (UPSTREAM_COMPRESSION): the bytes before and after.
        self.gzip: Gzip | None = None

    def read_head(self) -> str | None:
        """The header pass: note framing and every fact the rules read, in
        one walk over the headers. Returns why the head is refused (501), or
        None."""
        websocket_asked = False
        for name, value in self.headers:
            low = name.lower()
            if low not in _NOTED:
                continue
            if low == b"host":
                self.host_count += 1
                if self.host is None:
                    self.host = value
            elif low == b"content-length":
                self.length = int(value)
            elif low == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    return "only the chunked transfer coding is accepted"
                self.chunked = True
            elif low == b"expect":
                self.expect_continue = value.strip().lower() == b"100-continue"
            elif low == b"upgrade":
                self.upgrade = True
                if b"websocket" in value.lower():
                    websocket_asked = True
            elif low == b"origin":
                self.origins = _add(self.origins, value)
            elif low == b"authorization":
                self.authorization = _add(self.authorization, value)
            elif low == b"x-scope-orgid":
                self.orgids = _add(self.orgids, value)
            elif low == b"connection":
                self.connection = _add(self.connection, value)
            elif low == b"user-agent":
                self.user_agent = value
            else:  # x-request-id
                self.request_id = value
        self.websocket = websocket_asked and self.method == b"GET"
        return None

    def note_error(self, reason: str) -> None:
        if self.error is None:
            self.error = reason


def _add(values: list[bytes] | None, value: bytes) -> list[bytes]:
    if values is None:
        return [value]
    values.append(value)
    return values
