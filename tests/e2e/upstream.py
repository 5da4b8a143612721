"""A small Grafana-Cloud-shaped upstream for Loki, Tempo and OTLP, in the test
process: it refuses (401) anything without the Basic credentials and
``X-Scope-OrgID`` of the signal, decodes what the real clients push (OTLP
protobuf, gzip or not; Loki JSON, gzip or not; Loki snappy protobuf) and answers the read
paths (Loki ``query_range``, Tempo search and trace by id) from what it stored.
"""

from __future__ import annotations

import gzip
import json
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.web.resource import Resource

from ..support.helpers import ORG, TOKEN, Seen, basic

_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_labels(text: str) -> dict[str, str]:
    """``{a="1",b="2"}`` (a Loki stream or an equality-only selector) to a dict."""
    inner = text.strip()
    if not (inner.startswith("{") and inner.endswith("}")):
        raise ValueError(f"not a label set: {text!r}")
    inner = inner[1:-1]
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(inner):
        m = _LABEL.match(inner, pos)
        if m is None:
            raise ValueError(f"bad label set: {text!r}")
        labels[m.group(1)] = m.group(2).replace('\\"', '"').replace("\\\\", "\\")
        pos = m.end()
    return labels


# --- the Loki push protobuf, without generated code ---------------------------

_PUSH_REQUEST: Any = None


def loki_push_request_class() -> Any:
    """``logproto.PushRequest`` (github.com/grafana/loki/pkg/push/push.proto),
    built at run time from a descriptor: just the fields clients send."""
    global _PUSH_REQUEST
    if _PUSH_REQUEST is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

        f = descriptor_pb2.FieldDescriptorProto
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
        proto = descriptor_pb2.FileDescriptorProto(
            name="lgmt_e2e/loki_push.proto",
            package="logproto",
            syntax="proto3",
            dependency=["google/protobuf/timestamp.proto"],
        )
        # message: (field, number, type: a scalar's name or a message's full name, repeated)
        messages = {
            "LabelPairAdapter": [("name", 1, "string", False), ("value", 2, "string", False)],
            "EntryAdapter": [
                ("timestamp", 1, ".google.protobuf.Timestamp", False),
                ("line", 2, "string", False),
                ("structuredMetadata", 3, ".logproto.LabelPairAdapter", True),
            ],
            "StreamAdapter": [
                ("labels", 1, "string", False),
                ("entries", 2, ".logproto.EntryAdapter", True),
                ("hash", 3, "uint64", False),
            ],
            "PushRequest": [("streams", 1, ".logproto.StreamAdapter", True)],
        }
        for message_name, fields in messages.items():
            message = proto.message_type.add(name=message_name)
            for name, number, kind, repeated in fields:
                label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
                if kind.startswith("."):
                    message.field.add(
                        name=name, number=number, type=f.TYPE_MESSAGE, type_name=kind, label=label
                    )
                else:
                    scalar = getattr(f, "TYPE_" + kind.upper())
                    message.field.add(name=name, number=number, type=scalar, label=label)
        pool.Add(proto)
        _PUSH_REQUEST = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("logproto.PushRequest")
        )
    return _PUSH_REQUEST


def decode_loki_snappy_protobuf(body: bytes) -> list[LogLine]:
    import cramjam

    raw = bytes(cramjam.snappy.decompress_raw(body))
    request = loki_push_request_class().FromString(raw)
    lines = []
    for stream in request.streams:
        labels = parse_labels(stream.labels)
        for entry in stream.entries:
            ts = entry.timestamp.seconds * 1_000_000_000 + entry.timestamp.nanos
            lines.append(LogLine(labels, ts, entry.line, "protobuf"))
    return lines


def decode_loki_json(body: bytes) -> list[LogLine]:
    doc = json.loads(body)
    lines = []
    for stream in doc["streams"]:
        labels = {str(k): str(v) for k, v in stream["stream"].items()}
        for value in stream["values"]:
            lines.append(LogLine(labels, int(value[0]), value[1], "json"))
    return lines


# --- what was pushed ----------------------------------------------------------


@attrs.define
class LogLine:
    labels: dict[str, str]
    ts: int
    line: str
    encoding: str  # "json" or "protobuf"


@attrs.define
class Span:
    trace_id: str  # 32 hex digits
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start: int
    end: int


@attrs.define
class Otlp:
    """One OTLP export request as received and decoded."""

    kind: str  # traces, metrics or logs
    content_encoding: bytes | None
    raw: bytes  # the body exactly as it arrived (compressed, if it was)
    message: Any  # the parsed Export*ServiceRequest


def _attr(attributes: Any, key: str) -> str:
    for kv in attributes:
        if kv.key == key:
            return str(kv.value.string_value)
    return ""


class FakeCloud(Resource):
    """Loki, Tempo and OTLP of a Grafana Cloud stack, on one loopback port."""

    isLeaf = True

    def __init__(self, token: str = TOKEN) -> None:
        super().__init__()
        self.token = token
        self.seen: list[Seen] = []
        self.rejected: list[Seen] = []
        self.logs: list[LogLine] = []
        self.spans: list[Span] = []
        self.otlp: list[Otlp] = []

    # -- plumbing --

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        seen = Seen(
            request.method,
            request.uri,
            list(request.requestHeaders.getAllRawHeaders()),
            request.content.read(),
        )
        path = urlsplit(request.uri).path.decode()
        signal = path.split("/")[1] if path.count("/") >= 1 else ""
        if signal not in ("loki", "tempo", "otlp"):
            return self._json(request, 404, {"error": f"no such path {path}"})
        authorization = seen.header(b"Authorization")
        tenant = seen.header(b"X-Scope-OrgID")
        if authorization != [basic(ORG[signal], self.token)] or tenant != [ORG[signal].encode()]:
            self.rejected.append(seen)
            return self._json(request, 401, {"error": "authentication error: invalid credentials"})
        self.seen.append(seen)
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.uri).query.decode()).items()}
        try:
            return self._route(request, seen, path, query)
        except Exception as e:  # a body the real service would refuse
            return self._json(request, 400, {"error": f"{type(e).__name__}: {e}"})

    def _json(self, request: Any, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(doc).encode()

    def _route(self, request: Any, seen: Seen, path: str, query: dict[str, str]) -> bytes:
        method = seen.method
        if method == b"POST" and path == "/loki/api/v1/push":
            return self._loki_push(request, seen)
        if method == b"GET" and path == "/loki/api/v1/query_range":
            return self._loki_query_range(request, query)
        if method == b"POST" and path in ("/otlp/v1/traces", "/otlp/v1/metrics", "/otlp/v1/logs"):
            return self._otlp(request, seen, path.rsplit("/", 1)[1])
        if method == b"GET" and path == "/tempo/api/search":
            return self._tempo_search(request, query)
        if method == b"GET" and path.startswith("/tempo/api/traces/"):
            return self._tempo_trace(request, unquote(path.rsplit("/", 1)[1]))
        return self._json(request, 404, {"error": f"no such path {path}"})

    # -- Loki --

    def _loki_push(self, request: Any, seen: Seen) -> bytes:
        content_type = (seen.header(b"Content-Type") or [b""])[0].split(b";")[0].strip()
        body = seen.body
        if seen.header(b"Content-Encoding") == [b"gzip"]:  # as Loki takes it
            body = gzip.decompress(body)
        if content_type == b"application/x-protobuf":
            self.logs.extend(decode_loki_snappy_protobuf(body))
        elif content_type == b"application/json":
            self.logs.extend(decode_loki_json(body))
        else:
            return self._json(request, 415, {"error": f"unsupported {content_type!r}"})
        request.setResponseCode(204)  # what Loki answers; python-logging-loki wants exactly it
        return b""

    def _loki_query_range(self, request: Any, query: dict[str, str]) -> bytes:
        selector = parse_labels(query["query"])
        start = int(query.get("start", "0"))
        end = int(query.get("end", str(2**63)))
        limit = int(query.get("limit", "100"))
        streams: dict[tuple[tuple[str, str], ...], list[list[str]]] = {}
        for log in self.logs:
            if all(log.labels.get(k) == v for k, v in selector.items()) and start <= log.ts <= end:
                key = tuple(sorted(log.labels.items()))
                streams.setdefault(key, []).append([str(log.ts), log.line])
        result = [{"stream": dict(k), "values": v[:limit]} for k, v in streams.items()]
        return self._json(
            request,
            200,
            {"status": "success", "data": {"resultType": "streams", "result": result}},
        )

    # -- OTLP and Tempo --

    def _otlp(self, request: Any, seen: Seen, kind: str) -> bytes:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        classes: dict[str, tuple[Any, Any]] = {
            "traces": (
                trace_service_pb2.ExportTraceServiceRequest,
                trace_service_pb2.ExportTraceServiceResponse,
            ),
            "metrics": (
                metrics_service_pb2.ExportMetricsServiceRequest,
                metrics_service_pb2.ExportMetricsServiceResponse,
            ),
            "logs": (
                logs_service_pb2.ExportLogsServiceRequest,
                logs_service_pb2.ExportLogsServiceResponse,
            ),
        }
        request_class, response_class = classes[kind]
        encodings = seen.header(b"Content-Encoding")
        encoding = encodings[0] if encodings else None
        body = gzip.decompress(seen.body) if encoding == b"gzip" else seen.body
        message = request_class.FromString(body)
        self.otlp.append(Otlp(kind, encoding, seen.body, message))
        if kind == "traces":
            for resource_spans in message.resource_spans:
                service = _attr(resource_spans.resource.attributes, "service.name")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            Span(
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                span.name,
                                service,
                                span.start_time_unix_nano,
                                span.end_time_unix_nano,
                            )
                        )
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/x-protobuf")
        return bytes(response_class().SerializeToString())

    def _tempo_search(self, request: Any, query: dict[str, str]) -> bytes:
        wanted: dict[str, str] = {}
        for pair in query.get("tags", "").split():
            key, _, value = pair.partition("=")
            wanted[key] = value.strip('"')
        limit = int(query.get("limit", "20"))
        traces = []
        for trace_id in dict.fromkeys(s.trace_id for s in self.spans):
            spans = [s for s in self.spans if s.trace_id == trace_id]
            root = next((s for s in spans if not s.parent_span_id), spans[0])
            if "service.name" in wanted and root.service != wanted["service.name"]:
                continue
            if "name" in wanted and root.name != wanted["name"]:
                continue
            start = min(s.start for s in spans)
            traces.append(
                {
                    "traceID": trace_id,
                    "rootServiceName": root.service,
                    "rootTraceName": root.name,
                    "startTimeUnixNano": str(start),
                    "durationMs": (max(s.end for s in spans) - start) // 1_000_000,
                }
            )
        return self._json(
            request, 200, {"traces": traces[:limit], "metrics": {"inspectedTraces": len(traces)}}
        )

    def _tempo_trace(self, request: Any, trace_id: str) -> bytes:
        spans = [s for s in self.spans if s.trace_id == trace_id.lower()]
        if not spans:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"trace not found"
        batches = [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": s.trace_id,
                                "spanId": s.span_id,
                                "parentSpanId": s.parent_span_id,
                                "name": s.name,
                                "startTimeUnixNano": str(s.start),
                                "endTimeUnixNano": str(s.end),
                            }
                            for s in spans
                            if s.service == service
                        ]
                    }
                ],
            }
            for service in dict.fromkeys(s.service for s in spans)
        ]
        return self._json(request, 200, {"batches": batches})
