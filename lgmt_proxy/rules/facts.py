"""What the pure rules read of a request: its facts, gathered once while the
parser's header pass runs (`dataplane.request.Incoming.read_head`), so no
rule scans the headers again."""

from __future__ import annotations

from typing import Protocol


class RequestFacts(Protocol):
    """The request as the rules see it (`Incoming` provides it)."""

    method: bytes
    #: The raw path (no query), once the target passed `routes.split_target`.
    path: bytes
    #: How many ``Host`` headers, and the first one's value.
    host_count: int
    host: bytes | None
    #: Every ``Origin``, ``Authorization`` and ``X-Scope-OrgID`` value, in
    #: order (None: the header is absent).
    origins: list[bytes] | None
    authorization: list[bytes] | None
    orgids: list[bytes] | None
    #: A GET whose ``Upgrade`` asks for WebSocket (RFC 6455 section 4.1).
    websocket: bool
