"""What the head of an OTLP/gRPC call decides, before any of its message:
the facts the rules read (`read_headers`), then its route, decision and
deadline, or the refusal it is answered with (`admit_call`): the same
policy, consumers and tenants as an HTTP POST to its OTLP path. Nothing here
writes; `grpc_stream.GrpcStream` acts on it."""

from __future__ import annotations

from typing import Any, NamedTuple

from lgmt_proxy.dataplane.dispatcher import Shared
from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.rules import grpc
from lgmt_proxy.rules.dispatch import Proxy, Refuse, decide
from lgmt_proxy.rules.errors import Refusal
from lgmt_proxy.rules.headers import RawHeaders
from lgmt_proxy.rules.routes import Proxied

_FORWARDED = frozenset({b"user-agent", b"x-request-id"})


class CallHead(NamedTuple):
    """What a call's headers say beyond the facts the rules read."""

    path: bytes
    content_type: bytes
    encoding: bytes
    #: grpc-timeout as sent (None: no deadline).
    timeout: bytes | None
    #: The metadata forwarded upstream.
    forwarded: RawHeaders


def read_headers(req: Incoming, headers: RawHeaders) -> CallHead:
    """The facts the rules read, noted on ``req`` (``:authority`` as the
    Host, the ``authorization`` and ``x-scope-orgid`` metadata), and the
    rest of the call's head."""
    path = content_type = encoding = b""
    timeout: bytes | None = None
    forwarded: RawHeaders = []
    for name, value in headers:
        if name == b":method":
            req.method = value
        elif name == b":path":
            path = value
        elif name == b":authority":
            req.host, req.host_count = value, 1
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-encoding":
            encoding = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b"authorization":
            req.authorization = [*(req.authorization or []), value]
        elif name == b"x-scope-orgid":
            req.orgids = [*(req.orgids or []), value]
        elif name in _FORWARDED:
            forwarded.append((name, value))
            if name == b"user-agent":
                req.user_agent = value
            else:
                req.request_id = value
    req.target = req.path = path
    return CallHead(path, content_type, encoding, timeout, forwarded)


class CallRefusal(NamedTuple):
    """A call the proxy answers itself: the HTTP status (for the log and the
    metrics), the gRPC status, the message and RetryInfo's seconds."""

    status: int
    code: int
    message: str
    retry: int | None = None


def route_call(
    shared: Shared, req: Incoming, path: bytes
) -> tuple[Proxied[Any], Proxy] | CallRefusal:
    """The call's route and decision, those of an HTTP POST to its OTLP path
    (the same policy, consumers, tenants), or why it is refused. The access
    log keeps the gRPC method as the path."""
    mapped = grpc.METHODS[path]
    match = shared.routes.match(mapped)
    req.upstream_name = match.upstream_name
    if not isinstance(match, Proxied):
        return CallRefusal(404, grpc.UNIMPLEMENTED, f"the {match.upstream_name} upstream is off")
    req.path = mapped  # the rules see the OTLP/HTTP path
    auth = shared.client_auth
    decision = decide(req, match, shared.policy, None if auth is None else auth().authenticate)
    req.path = path
    req.counted = True
    req.consumer = decision.consumer
    if isinstance(decision, Refuse | Proxy):
        req.tenant = decision.tenant
    if isinstance(decision, Refuse):
        return call_refusal(decision.refusal)
    assert isinstance(decision, Proxy)
    return match, decision


def admit_call(
    shared: Shared, req: Incoming, path: bytes, encoding: bytes, timeout: bytes | None
) -> tuple[Proxied[Any], Proxy, float | None] | CallRefusal:
    """A call whose head is gRPC: its route, decision and deadline (seconds,
    None: none), or why it is answered without going upstream (an unknown
    method or encoding, a refusal, a malformed or zero ``grpc-timeout``)."""
    problem = grpc.call_problem(req.method, path, encoding)
    if problem is not None:
        return CallRefusal(*problem)
    routed = route_call(shared, req, path)
    if isinstance(routed, CallRefusal):
        return routed
    seconds = None
    if timeout is not None:
        seconds = grpc.parse_timeout(timeout)
        if seconds is None:
            return CallRefusal(400, grpc.INTERNAL, "malformed grpc-timeout")
        if seconds <= 0:
            return CallRefusal(408, grpc.DEADLINE_EXCEEDED, "deadline exceeded")
    return (*routed, seconds)


def call_refusal(refusal: Refusal) -> CallRefusal:
    """An HTTP refusal as a call's answer: its gRPC status, and RetryInfo
    from its ``Retry-After``."""
    retry = grpc.retry_seconds(dict(refusal.headers).get(b"Retry-After"))
    return CallRefusal(refusal.status, grpc.grpc_status(refusal.status), refusal.message, retry)
