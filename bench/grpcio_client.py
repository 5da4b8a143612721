"""OTLP trace exports over gRPC from gRPC's C core (grpcio), as the
OpenTelemetry SDKs' and many agents' gRPC exporters send them: for the
``grpc`` workload of bench/run.py, beside h2load, whose calls are not what
real senders send (``content-length``, 16 KiB frames, the same header block
every call).

Each connection is its own channel with one call in flight, each call has
a deadline (``grpc-timeout``, a new value every call), and the message is
the file's bytes as they are (no protobuf work here). Prints one JSON line:
calls made, calls that succeeded, seconds, mean latency.

    .venv/bin/python bench/grpcio_client.py 127.0.0.1:4317 8 5 body.bin
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def main(target: str, connections: int, seconds: float, body_path: str) -> None:
    message = open(body_path, "rb").read()
    counts = {"requests": 0, "ok": 0, "latency": 0.0}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(index: int) -> None:
        # A channel per connection: grpcio shares one subchannel otherwise.
        options = [("grpc.use_local_subchannel_pool", 1), ("lgmt.bench.channel", index)]
        with grpc.insecure_channel(target, options=options) as channel:
            export = channel.unary_unary(
                EXPORT, request_serializer=None, response_deserializer=None
            )
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    export(message, timeout=10)
                    ok = 1
                except grpc.RpcError:
                    ok = 0
                with lock:
                    counts["requests"] += 1
                    counts["ok"] += ok
                    counts["latency"] += time.monotonic() - started

    began = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - began
    n = counts["requests"]
    mean_ms = counts["latency"] * 1000 / n if n else 0.0
    print(json.dumps({"requests": n, "ok": counts["ok"], "seconds": took, "mean_ms": mean_ms}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
