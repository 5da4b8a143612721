"""Which request bodies are gzip'd on the way upstream (``UPSTREAM_COMPRESSION``):
a pure decision, taken once per request on an upstream that has compression
on.

Only push bodies that shrink and that Grafana Cloud takes gzip'd: OTLP
(``.../v1/traces``, ``/v1/metrics``, ``/v1/logs``, JSON or protobuf) and
Loki's push (``.../loki/api/v1/push``) in JSON. Never Prometheus remote write
or a Loki protobuf push (snappy already), never a query, never a body the
client encoded itself.
"""

from __future__ import annotations

from typing import Final

from lgmt_proxy.rules.headers import RawHeaders

#: The upstream paths' endings (whole segments) of OTLP/HTTP exports.
OTLP_PUSH: Final = (b"/v1/traces", b"/v1/metrics", b"/v1/logs")
#: Loki's push API.
LOKI_PUSH: Final = b"/loki/api/v1/push"
#: Loki's protobuf push body is snappy-compressed already.
_SNAPPY: Final = b"application/x-protobuf"


def compress_request(method: bytes, target: bytes, headers: RawHeaders, has_body: bool) -> bool:
    """Gzip this request's body? ``target`` is the upstream's (path and
    query), ``headers`` the client's."""
    if method != b"POST" or not has_body:
        return False
    path = target.split(b"?", 1)[0]
    loki = path.endswith(LOKI_PUSH)
    if not loki and not path.endswith(OTLP_PUSH):
        return False
    for name, value in headers:
        low = name.lower()
        if low == b"content-encoding":
            if value.strip().lower() not in (b"", b"identity"):
                return False
        elif loki and low == b"content-type":
            if value.split(b";", 1)[0].strip().lower() == _SNAPPY:
                return False
    return True
