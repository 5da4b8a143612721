"""The route table and the pure rules that turn a raw request target into an
upstream path, or a refusal: `RouteTable.match` finds what a path goes to
(`Proxied` or `Local`), `split_target` checks the target and `upstream_target`
rewrites it.

Everything works on the raw bytes the client sent: twisted.web's ``postpath``
is percent-decoded, which would turn ``%2e%2e`` into ``..`` and ``%2F`` into a
separator inside a segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Generic, TypeVar

import attrs

from lgmt_proxy.rules.errors import Refusal


@attrs.frozen
class Route:
    """A path prefix (whole segments), the upstream prefix it becomes, and
    the name of the upstream it goes to (a signal's name for the built-in
    table, the route's ``name`` for ROUTES_FILE)."""

    prefix: bytes
    upstream_prefix: bytes
    upstream_name: str
    #: ``X-Scope-OrgID`` is the authenticated consumer's tenant (ROUTES_FILE
    #: ``tenant: from_consumer``), not a fixed one.
    tenant_from_consumer: bool = False

    @property
    def segments(self) -> list[bytes]:
        return self.prefix[1:].split(b"/")


#: The contract's table, in match order.
DEFAULT_ROUTES = (
    Route(b"/api/prom", b"/api/prom", "prometheus"),
    Route(b"/prometheus", b"/api/prom", "prometheus"),
    Route(b"/loki", b"/loki", "loki"),
    Route(b"/tempo", b"/tempo", "tempo"),
    Route(b"/otlp", b"/otlp", "otlp"),
    # Pyroscope: /pyroscope/ingest -> /ingest, /pyroscope/querier.v1... -> /querier.v1...
    Route(b"/pyroscope", b"", "profiles"),
)


U = TypeVar("U")
R = TypeVar("R")
M = TypeVar("M")


@attrs.frozen
class Proxied(Generic[U]):
    """A path on a route: forwarded to ``upstream``."""

    route: Route
    upstream: U
    quiet = False
    consumers_only = False

    @property
    def upstream_name(self) -> str:
        return self.route.upstream_name


@attrs.frozen
class Local(Generic[R]):
    """A path the proxy answers itself, from ``resource``: the operations
    endpoints and the JSON 404s (``upstream_name`` names a signal that is
    off). ``quiet``: access-logged at debug only (probes and scrapes);
    ``consumers_only``: with client auth on, only for a consumer allowed it
    (/metrics names the consumers)."""

    resource: R
    upstream_name: str = "none"
    quiet: bool = False
    consumers_only: bool = False


class _Node(Generic[M]):
    __slots__ = ("children", "match")

    def __init__(self) -> None:
        self.children: dict[bytes, _Node[M]] = {}
        self.match: M | None = None


class RouteTable(Generic[M]):
    """Path prefixes (whole segments) to what they match; the longest prefix
    wins at every depth, and a segment that is no prefix's ends the match on
    the enclosing one (with ``/a`` and ``/a/c``, ``/a/x/c`` is ``/a``'s). Raw
    segments, never percent-decoded."""

    def __init__(self, default: M, entries: Iterable[tuple[tuple[bytes, ...], M | None]]) -> None:
        self.default = default
        self._root: _Node[M] = _Node()
        for segments, match in entries:
            node = self._root
            for segment in segments:
                node = node.children.setdefault(segment, _Node())
            node.match = match

    def match(self, path: bytes) -> M:
        """What the raw ``path`` (``/``-led, no query) goes to."""
        found = self.default
        children = self._root.children
        for segment in path[1:].split(b"/"):
            node = children.get(segment)
            if node is None:
                break
            if node.match is not None:
                found = node.match
            children = node.children
        return found


# A dot segment, literal or percent-encoded (%2e / %2E), and any encoded slash
# or backslash. Checked on the path only; the query is forwarded as sent.
_DOT_SEGMENT = re.compile(rb"(?:^|/)(?:\.|%2[eE]){1,2}(?:/|$)")
_ENCODED_SLASH = re.compile(rb"%(?:2[fF]|5[cC])")
#: Bytes never accepted in a target: controls, space, DEL, ``#`` and a
#: backslash (deleted by ``bytes.translate``: a third cheaper than a regex search).
_BAD_BYTES: Final = bytes([*range(0x21), 0x7F, ord("#"), ord("\\")])

MAX_TARGET = 8192


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """Check a raw origin-form target; return ``(path, query)`` or raise `Refusal`.

    ``query`` is None when the target has no ``?`` and the bytes after it
    otherwise (possibly empty), so the upstream sees exactly what was sent.
    """
    if len(target) > MAX_TARGET:
        raise Refusal(414, "request target too long")
    if not target.startswith(b"/"):
        # absolute-form (GET http://host/...), authority-form (CONNECT) and "*":
        # a reverse proxy never forwards to a host the client names.
        raise Refusal(400, "only origin-form request targets are accepted")
    if len(target.translate(None, _BAD_BYTES)) != len(target):  # the path and the query alike
        raise Refusal(400, "request target contains forbidden characters")
    path, sep, query = target.partition(b"?")
    # Most paths have neither a dot nor a percent sign: no search for them.
    encoded = b"%" in path
    if (encoded or b"." in path) and _DOT_SEGMENT.search(path):
        raise Refusal(400, "dot segments are not allowed in the path")
    if encoded and _ENCODED_SLASH.search(path):
        raise Refusal(400, "encoded slashes are not allowed in the path")
    return path, (query if sep else None)


def upstream_target(route: Route, base_path: bytes, path: bytes, query: bytes | None) -> bytes:
    """The origin-form target sent upstream: the route's prefix swapped, the
    rest of the path and the query byte for byte.

    ``base_path`` is the path of the upstream's URL (where that service is
    mounted; ``b""`` for none). The upstream path (the route's upstream prefix
    plus the rest of the client's path) is sent as it is when it already
    starts with ``base_path`` on whole segments, since the Grafana Cloud portal
    shows URLs ending in the upstream prefix (``.../otlp``, ``.../api/prom``);
    otherwise ``base_path`` is put in front. Either way the result lies under
    ``base_path``. A trailing ``/`` on ``base_path`` is ignored.
    """
    upstream = route.upstream_prefix + path[len(route.prefix) :]
    if base_path:
        if base_path[-1:] == b"/":  # config already strips it; cheap to be sure
            base_path = base_path.rstrip(b"/")
        n = len(base_path)
        # Whole segments: /ot is not a prefix of /otlp/v1/traces.
        if not (upstream.startswith(base_path) and upstream[n : n + 1] in (b"", b"/")):
            upstream = base_path + upstream
    target = upstream or b"/"
    if query is not None:
        target += b"?" + query
    return target
