"""Realistic push bodies, generated deterministically (the same for a seed):
OTLP traces as JSON and as protobuf (`ExportTraceServiceRequest`, encoded
here so the tests need no opentelemetry-proto), and a Loki JSON push. Used by
the compressed-egress tests and ``bench/run.py``'s gzip workload.

The spans look like an instrumented HTTP service's: random ids and
timestamps, attributes that repeat, as real exports do."""

from __future__ import annotations

import json
import random
import struct

_ROUTES = ("/api/items/{id}", "/api/cart", "/api/checkout", "/health", "/api/users/{id}")
_METHODS = ("GET", "GET", "GET", "POST", "PUT")
_SERVICE = {
    "service.name": "shop-frontend",
    "service.namespace": "shop",
    "deployment.environment": "production",
    "k8s.cluster.name": "eu-west-1-prod",
    "k8s.namespace.name": "shop",
    "k8s.pod.name": "shop-frontend-7d9f8b6c5-x2k4q",
    "telemetry.sdk.language": "python",
    "telemetry.sdk.name": "opentelemetry",
    "telemetry.sdk.version": "1.27.0",
}


def _spans(count: int, seed: int) -> list[dict[str, object]]:
    rnd = random.Random(seed)
    start = 1_733_000_000_000_000_000
    spans = []
    for i in range(count):
        route = rnd.randrange(len(_ROUTES))
        began = start + i * 1_000_000 + rnd.randrange(1_000_000)
        spans.append(
            {
                "trace_id": rnd.randbytes(16),
                "span_id": rnd.randbytes(8),
                "name": f"{_METHODS[route]} {_ROUTES[route]}",
                "start": began,
                "end": began + rnd.randrange(100_000, 50_000_000),
                "attributes": {
                    "http.request.method": _METHODS[route],
                    "http.route": _ROUTES[route],
                    "http.response.status_code": rnd.choice((200, 200, 200, 201, 404, 500)),
                    "url.scheme": "https",
                    "server.address": "shop.example.com",
                    "client.address": f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.7",
                    "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
                },
            }
        )
    return spans


def _any_json(value: object) -> dict[str, object]:
    if isinstance(value, int):
        return {"intValue": str(value)}
    return {"stringValue": value}


def otlp_json(spans: int, seed: int = 1) -> bytes:
    """An OTLP/HTTP JSON ``ExportTraceServiceRequest`` of ``spans`` spans."""
    doc = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": k, "value": _any_json(v)} for k, v in _SERVICE.items()]
                },
                "scopeSpans": [
                    {
                        "scope": {
                            "name": "opentelemetry.instrumentation.flask",
                            "version": "0.48b0",
                        },
                        "spans": [
                            {
                                "traceId": s["trace_id"].hex(),  # type: ignore[attr-defined]
                                "spanId": s["span_id"].hex(),  # type: ignore[attr-defined]
                                "name": s["name"],
                                "kind": 2,
                                "startTimeUnixNano": str(s["start"]),
                                "endTimeUnixNano": str(s["end"]),
                                "attributes": [
                                    {"key": k, "value": _any_json(v)}
                                    for k, v in s["attributes"].items()  # type: ignore[attr-defined]
                                ],
                                "status": {},
                            }
                            for s in _spans(spans, seed)
                        ],
                    }
                ],
            }
        ]
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# -- protobuf, by hand: varints, length-delimited fields, fixed64 --


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _key_value(key: str, value: object) -> bytes:
    if isinstance(value, int):
        any_value = _varint(3 << 3) + _varint(value)  # int_value
    else:
        any_value = _field(1, str(value).encode())  # string_value
    return _field(1, key.encode()) + _field(2, any_value)


def otlp_protobuf(spans: int, seed: int = 1) -> bytes:
    """The same request as `otlp_json`, as OTLP/HTTP protobuf."""
    encoded = bytearray()
    for s in _spans(spans, seed):
        span = bytearray()
        span += _field(1, s["trace_id"])  # type: ignore[arg-type]
        span += _field(2, s["span_id"])  # type: ignore[arg-type]
        span += _field(5, str(s["name"]).encode())
        span += _varint(6 << 3) + _varint(2)  # kind: SERVER
        span += _varint(7 << 3 | 1) + struct.pack("<Q", s["start"])
        span += _varint(8 << 3 | 1) + struct.pack("<Q", s["end"])
        for k, v in s["attributes"].items():  # type: ignore[attr-defined]
            span += _field(9, _key_value(k, v))
        span += _field(15, b"")  # status
        encoded += _field(2, bytes(span))
    scope = _field(1, b"opentelemetry.instrumentation.flask") + _field(2, b"0.48b0")
    scope_spans = _field(1, scope) + bytes(encoded)
    resource = b"".join(_field(1, _key_value(k, v)) for k, v in _SERVICE.items())
    resource_spans = _field(1, resource) + _field(2, scope_spans)
    return _field(1, resource_spans)


def loki_json(lines: int, seed: int = 1) -> bytes:
    """A Loki JSON push of ``lines`` access-log lines in one stream."""
    rnd = random.Random(seed)
    values = []
    for i in range(lines):
        route = rnd.randrange(len(_ROUTES))
        line = (
            f'level=info ts=2024-12-01T10:{i // 60 % 60:02d}:{i % 60:02d}Z msg="request served" '
            f"method={_METHODS[route]} path={_ROUTES[route]} status=200 "
            f"duration_ms={rnd.randrange(1, 900)} trace_id={rnd.randbytes(16).hex()}"
        )
        values.append([str(1_733_000_000_000_000_000 + i * 1_000_000), line])
    doc = {"streams": [{"stream": {"job": "shop-frontend", "env": "production"}, "values": values}]}
    return json.dumps(doc, separators=(",", ":")).encode()
