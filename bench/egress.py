"""The compressed-egress workload's pieces (``run.py``'s ``gzip``): realistic
OTLP bodies (JSON and protobuf, generated deterministically by
``tests/support/otlp_bodies.py``), a keep-alive client that pushes one for a
while, and the proxy's own count of the bytes before and after compression.

wrk cannot be the client here: its bodies are built from a repeated string,
which gzip shrinks a thousandfold; the figure would say nothing.
"""

from __future__ import annotations

import re
import socket
import sys
import time
import urllib.request
from typing import Any

import benchlib as b

sys.path.insert(0, str(b.ROOT))

from tests.support.otlp_bodies import otlp_json, otlp_protobuf

OTLP_PATH = "/otlp/v1/traces"
KINDS = ("json", "protobuf")
_TYPES = {"json": "application/json", "protobuf": "application/x-protobuf"}


def bodies(size: int) -> dict[str, bytes]:
    """An OTLP traces body of each kind, of about ``size`` bytes (whole spans)."""
    out = {}
    for kind, make in (("json", otlp_json), ("protobuf", otlp_protobuf)):
        per_span = len(make(100)) / 100
        out[kind] = make(max(1, int(size / per_span)))
    return out


def push_for(port: int, kind: str, body: bytes, seconds: float) -> dict[str, Any]:
    """POST ``body`` again and again on one keep-alive connection for
    ``seconds``, each answer read before the next push."""
    head = (
        f"POST {OTLP_PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: {_TYPES[kind]}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    requests = non2xx = 0
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        while time.monotonic() - start < seconds:
            sock.sendall(head)
            sock.sendall(body)
            status, _ = b._answer(sock)
            requests += 1
            non2xx += not 200 <= status < 300
    elapsed = time.monotonic() - start
    return {
        "requests": requests,
        "non2xx": non2xx,
        "seconds": elapsed,
        "bytes": requests * len(body),
    }


_SAMPLE = re.compile(
    r'^proxy_upstream_compression_bytes_total\{stage="(before|after)",upstream="otlp"\} (\S+)$',
    re.M,
)


def compression_bytes(url: str) -> dict[str, float]:
    """The proxy's ``proxy_upstream_compression_bytes_total`` for otlp, by stage."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {"before": 0.0, "after": 0.0}
    for stage, value in _SAMPLE.findall(text):
        found[stage] = float(value)
    return found
