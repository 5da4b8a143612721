"""Reading requests off one client connection with llhttp (httptools): the
head under its limits (target 414, head size and header count 431, transfer
codings 501) into an `Incoming`, its facts gathered in the same pass, then
its body handed on as it arrives. What llhttp refuses by itself (CL with TE,
two lengths, bad chunks, obsolete line folding, bare CR, control bytes in
values) becomes a 400 by `refusal_for`.
"""

from __future__ import annotations

from collections.abc import Callable

import httptools
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.rules.routes import MAX_TARGET

_log = Logger(namespace="lgmt_proxy.server")

#: The whole request head (request line and headers), and how many headers.
MAX_HEAD = 16384
MAX_HEADERS = 500
#: The most of a refused request's path the access log shows (a 414's target
#: is over 8 KiB by definition: never logged whole).
LOGGED_PATH = 512


class _StopParsing(Exception):
    """Raised inside a parser callback to stop parsing a hostile head
    (``refusal`` holds the answer)."""


class RequestParser:
    """llhttp's callbacks for one connection (see the module docstring).
    ``head`` is called with each request once its head is read."""

    __slots__ = ("_clock", "_head", "_head_size", "_parser", "feed", "parsing", "refusal")

    def __init__(self, clock: IReactorTime, head: Callable[[Incoming], None]) -> None:
        self._clock = clock
        self._head = head
        self._parser = httptools.HttpRequestParser(self)
        #: Parse bytes (llhttp's own method, no layer of ours per read);
        #: raises httptools' errors (see `refusal_for`) and
        #: `httptools.HttpParserUpgrade` after a head asking to upgrade.
        self.feed = self._parser.feed_data
        self._head_size = 0
        #: The request being read (head or body); None between requests.
        self.parsing: Incoming | None = None
        #: Why a callback stopped the parser: the status and message to answer.
        self.refusal: tuple[int, str] | None = None

    def head_so_far(self) -> tuple[bytes, bytes]:
        """The method and path of a head refused before it was whole (414,
        431, a timeout), for the access log: empty when the request line was
        not read, the path cut to `LOGGED_PATH` bytes."""
        parsing = self.parsing
        if parsing is None or not parsing.target:
            return b"", b""  # llhttp reads the method first: no target, no method known
        path = parsing.target.partition(b"?")[0]
        return self._parser.get_method(), path[:LOGGED_PATH]

    def refusal_for(self, error: httptools.HttpParserError) -> tuple[int, str]:
        """The status and message for input the parser stopped at."""
        if isinstance(error, httptools.HttpParserCallbackError):
            refusal, self.refusal = self.refusal, None
            if refusal is None:
                _log.failure("error handling a request", Failure())
                return 500, "internal error"
            return refusal
        if isinstance(error, httptools.HttpParserInvalidMethodError):
            return 501, "request method not implemented"
        return 400, _parse_error_message(error)

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Incoming(self._clock.seconds())
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        parsing = self.parsing
        assert parsing is not None
        parsing.target += url
        if len(parsing.target) > MAX_TARGET:
            self.refusal = (414, "request target too long")
            raise _StopParsing()

    def on_header(self, name: bytes, value: bytes) -> None:
        parsing = self.parsing
        assert parsing is not None
        if not parsing.in_head:
            return  # trailers of a chunked body are not forwarded
        self._head_size += len(name) + len(value) + 4
        headers = parsing.headers
        headers.append((name, value))
        if self._head_size > MAX_HEAD:
            self.refusal = (431, "request head too large")
            raise _StopParsing()
        if len(headers) > MAX_HEADERS:
            self.refusal = (431, "too many request headers")
            raise _StopParsing()

    def on_headers_complete(self) -> None:
        parser = self._parser
        req = self.parsing
        assert req is not None
        req.in_head = False
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        refused = req.read_head()
        if refused is not None:
            self.refusal = (501, refused)
            raise _StopParsing()
        self._head(req)

    def on_body(self, data: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.body_in += len(data)
        on_body = req.on_body
        if on_body is not None:
            on_body(data)
        elif req.buffered is not None:
            req.buffered.append(data)

    def on_message_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self.parsing = None
        req.complete = True
        on_complete = req.on_complete
        if on_complete is not None:
            on_complete()


def _parse_error_message(error: Exception) -> str:
    """A short reason for what llhttp refused (its own words are for developers)."""
    text = str(error).lower()
    if "whitespace after header value" in text:
        return "obsolete line folding is not accepted"
    if "content-length" in text and "transfer-encoding" in text:
        return "both Content-Length and Transfer-Encoding"
    if "content-length" in text:
        return "invalid or repeated Content-Length"
    if "chunk" in text:
        return "malformed chunked body"
    return "malformed request"
