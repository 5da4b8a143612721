#!/usr/bin/env python3
"""The Python work of one small GET, in memory: CPU time per request through
the real factory, dispatcher, exchange and pool on ``StringTransport``s, one
keep-alive client connection and one pooled upstream connection (no sockets,
no reactor, no wrk or nginx). Far less noisy than `make bench` on a shared
machine, and blind to what the kernel and the reactor cost, so it is an A/B
of our own code only, e.g. the pure package against the compiled one:

    .venv/bin/python bench/memory_get.py          the pure package (editable)
    .venv-mypyc/bin/python bench/memory_get.py    the mypyc build (make venv-compiled)

It prints the best of five runs of N requests (default 20,000) and which
build ran (``py`` or ``so``: the suffix of lgmt_proxy.dataplane.inbound).
"""

from __future__ import annotations

import sys
import time

import lgmt_proxy.dataplane.inbound as inbound
from tests.support.memory import MemoryProxy

REQUEST = b"GET /api/prom/api/v1/query?query=up HTTP/1.1\r\nHost: proxy\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def main(n: int) -> None:
    proxy = MemoryProxy()
    proto, client = proxy.connect()

    def one() -> None:
        proto.dataReceived(REQUEST)
        upstream, upstream_transport = proxy.upstream("prometheus")
        upstream_transport.clear()
        upstream.dataReceived(RESPONSE)
        proxy.clock.advance(0)
        if not client.value().startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected answer: {client.value()[:200]!r}")
        client.clear()

    for _ in range(2000):  # warm up: pools, caches, the first upstream connection
        one()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            one()
        best = min(best, (time.process_time() - start) / n * 1e6)
    build = str(inbound.__file__).rsplit(".", 1)[-1]
    print(f"{build}: {best:.1f} µs CPU per small GET (best of 5 x {n:,})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
