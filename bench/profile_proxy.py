#!/usr/bin/env python3
"""Where lgmt-proxy's CPU goes: py-spy on the proxy under the get50 load.

    .venv/bin/pip install py-spy                     (once; needs ptrace: root, or
                                                      sysctl kernel.yama.ptrace_scope=0)
    python3 bench/profile_proxy.py                   20 s of samples, small GETs at 50 conns
    python3 bench/profile_proxy.py --workload push   1 MiB pushes at 8 conns
    python3 bench/profile_proxy.py --workload grpc   256 KiB OTLP exports over gRPC (h2load -c8)
    python3 bench/profile_proxy.py --workload grpcio the same from grpcio (bench/grpcio_client.py)
    python3 bench/profile_proxy.py --workload budgets  small GETs of a consumer whose
                                                      budgets are shared through Redis
    python3 bench/profile_proxy.py --tls             the same against the HTTPS upstream
    python3 bench/profile_proxy.py --summarize FILE  re-read a raw profile
    python3 bench/profile_proxy.py --perf --tls --workload push
                                                     perf (on-CPU samples, C and kernel
                                                     included) instead of py-spy

Starts the same upstream and lgmt-proxy as bench/run.py, records with
``py-spy record --format raw`` (collapsed stacks, which flamegraph.pl and
speedscope read) into bench/results/, and prints the self time by area and by
function, and the inclusive time of the functions below the reactor loop.

py-spy charges a system call with the time the process waits in it, not only
the CPU it uses: under a TLS push it gave the upstream ``send`` a third of
the samples where perf, which counts CPU only, finds half that. ``--perf``
(Linux ``perf``, root or perf_event_paranoid <= 1) records the proxy's
on-CPU samples instead and prints the shares by library and by symbol, and
who calls the copies (``memmove``/``memset``): the figures for the C side
(OpenSSL, libc, the kernel); Python frames show only as the interpreter.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b  # re-executes under .venv/bin/python when psutil is missing
import egress
from run import Bench, Settings

#: (area, pattern on the frame's file or, for native frames, its name); the
#: innermost frame with an area gives the sample's (stdlib frames have none).
AREAS = [
    ("garbage collector (--native)", r"^(gc_collect|collect_with_callback)"),
    ("syscalls (--native)", r"^(epoll_wait|epoll_ctl|send|recv|__libc_send|__libc_recv|write)$"),
    ("reactor: poll, timers, dispatch", r"twisted/(internet/(epollreactor|posixbase|base)|python/(log|context))\.py"),
    ("socket I/O and write buffers", r"twisted/(internet/(tcp|abstract|main)|python/util)\.py"),
    ("Twisted HTTP (web/, protocols/)", r"twisted/(web|protocols)/"),
    ("Deferreds", r"twisted/internet/defer\.py"),
    ("logging (twisted.logger, logs.py, json)", r"(twisted/logger/|lgmt_proxy/logs\.py|^json/)"),
    ("metrics (prometheus_client, metrics.py)", r"(prometheus_client/|lgmt_proxy/metrics\.py)"),
    ("lgmt_proxy", r"lgmt_proxy/"),
    ("other Twisted / zope", r"(twisted/|zope/)"),
]  # fmt: skip
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame(text: str) -> tuple[str, str]:
    """(function, file shortened to what follows site-packages/ or the tree)."""
    m = FRAME.match(text)
    if m is None:
        return text, ""
    file = re.sub(r"^.*?(site-packages/|/lib/python3\.\d+/|(?=lgmt_proxy/))", "", m["file"])
    return m["func"], file


def area(frames: list[tuple[str, str]]) -> str:
    for func, file in [(frames[-1][0], ""), *reversed(frames)]:
        for name, pattern in AREAS:
            if re.search(pattern, file or func):
                return name
    return "other"


def summarize(raw: Path, top: int = 25) -> str:
    """A text summary of a py-spy raw (collapsed stacks) file."""
    own, inclusive, areas = (collections.Counter[str]() for _ in range(3))
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [
            frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))
        ]
        if not frames or not count.isdigit():
            continue
        n = int(count)
        own["{} ({})".format(*frames[-1])] += n
        areas[area(frames)] += n
        for key in {"{} ({})".format(*f) for f in frames}:
            inclusive[key] += n
    total = sum(own.values())
    if not total:
        return "no samples\n"
    out = [f"{total} samples (not idle)", "", "Self time by area:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in areas.most_common()]
    out += ["", f"Top {top} functions by self time:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in own.most_common(top)]
    out += ["", f"Top {top} functions by inclusive time, below the reactor loop:"]
    below = [(k, n) for k, n in inclusive.most_common() if n <= 0.9 * total][:top]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in below]
    return "\n".join(out) + "\n"


def grpc_load(
    bench: Bench, workdir: Path, seconds: int, grpcio: bool = False
) -> tuple[b.Target, Any]:
    """An lgmt-proxy with OTLP_GRPC_LISTEN, warmed up, and h2load (or,
    ``grpcio``, bench/grpcio_client.py) sending it the grpc workload's
    exports (8 connections) in the background."""
    port = b.free_port()
    target = bench.lgmt("lgmt_grpc", OTLP_GRPC_LISTEN=f"tcp:{port}:interface=127.0.0.1")
    bench.add(target)
    message = egress.bodies(Settings().grpc_bytes)["protobuf"]
    framed = workdir / "otlp.grpc"
    framed.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    url, headers = f"http://127.0.0.1:{port}{b.GRPC_EXPORT}", ["content-type: application/grpc"]
    if grpcio:
        body = workdir / "otlp.bin"
        body.write_bytes(message)
        client = [bench.grpcio_python(), str(b.BENCH / "grpcio_client.py"), f"127.0.0.1:{port}"]
        subprocess.run([*client, "8", "2", str(body)], check=True, capture_output=True)
        load = [*client, "8", str(seconds), str(body)]
        return target, subprocess.Popen(load, stdout=subprocess.PIPE, text=True)
    b.h2load(url, 8, 2, framed, headers)  # warm-up
    return target, b.h2load(url, 8, seconds, framed, headers, background=True)


#: What --perf prints: shares by library, by symbol, and the copies' callers.
PERF_REPORTS = [
    ("by library", ["--sort", "dso", "-g", "none"], 12),
    ("by symbol", ["--sort", "dso,sym", "-g", "none"], 30),
    ("who copies (callers of memmove/memset)", ["--sort", "sym", "-g", "caller,0.5,callee,function,percent", "--max-stack", "3", "-S", "__memmove_evex_unaligned_erms,__memset_evex_unaligned_erms,__memmove_avx_unaligned_erms,__memset_avx2_unaligned_erms"], 60),
]  # fmt: skip


def perf_summary(data: Path) -> str:
    """Text shares of a ``perf record -g`` file (see PERF_REPORTS)."""
    out = []
    for title, args, lines in PERF_REPORTS:
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--stdio", *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        keep = [
            line.rstrip()
            for line in report.stdout.splitlines()
            if line.strip() and not line.startswith("#") and not line.strip() == "|"
        ]
        out += ["", f"perf, {title}:", *keep[:lines]]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=int, default=20, help="sampling time (default 20)")
    p.add_argument("--rate", type=int, default=200, help="samples per second (default 200)")
    p.add_argument(
        "--workload", choices=("get", "push", "grpc", "grpcio", "budgets"), default="get"
    )
    p.add_argument("--tls", action="store_true", help="HTTPS upstream (as make bench's tls_*)")
    p.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native)")
    p.add_argument("--perf", action="store_true", help="perf's on-CPU samples instead of py-spy")
    p.add_argument("--twistd", default=str(b.ROOT / ".venv" / "bin" / "twistd"))
    p.add_argument("--summarize", metavar="RAW", help="only summarize an existing raw profile")
    args = p.parse_args(argv)  # fmt: skip
    if args.summarize:
        print(summarize(Path(args.summarize)), end="")
        return 0
    pyspy = shutil.which("py-spy", path=f"{b.ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    if args.perf:
        pyspy = shutil.which("perf")
        if not pyspy:
            sys.exit("profile: perf not found (Debian: apt-get install linux-perf)")
    elif not pyspy:
        sys.exit("profile: py-spy not found: .venv/bin/pip install py-spy")
    b.ensure_tools()
    b.raise_fd_limit()
    grpc = args.workload in ("grpc", "grpcio")
    get = args.workload in ("get", "budgets")
    conns, path, wrk_args = (50, b.GET_PATH, []) if get else (8, b.PUSH_PATH, [str(b.MiB), "1"])
    opts: list[str] = []
    out = b.BENCH / "results" / f"profile-{'tls_' * args.tls}{args.workload}{conns}"
    raw = out.with_suffix(".perf.data" if args.perf else ".txt")
    out.parent.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lgmt-profile-"))
    bench = Bench(Settings(), workdir, args.twistd, None)
    bench.tls = args.tls
    redis = b.Redis(workdir) if args.workload == "budgets" else None
    try:
        bench.start()
        lgmt = bench.targets["lgmt"]
        if redis is not None:  # bench/run.py's budgets workload: its proxy instead
            path_ = workdir / "budget-consumer.yaml"
            opts = ["-H", f"Authorization: Bearer {b.budget_auth_file(path_)}"]
            redis.start()
            env = {"CLIENT_AUTH_FILE": str(path_), "RATE_LIMIT_REDIS_URL": redis.url}
            bench.add(lgmt := bench.lgmt("lgmt_budget", **env))
        if grpc:
            lgmt, load = grpc_load(bench, workdir, args.seconds + 4, args.workload == "grpcio")
        else:
            b.wrk(lgmt.url + path, conns, 2, wrk_args, opts)  # warm-up
            load = b.wrk(lgmt.url + path, conns, args.seconds + 4, wrk_args, opts, background=True)
        cpu0 = lgmt.cpu()
        pid = str(lgmt.proc.pid)
        if args.perf:
            record = [pyspy, "record", "-F", str(args.rate), "--call-graph", "dwarf,16384"]
            record += ["-p", pid, "-o", str(raw)]
            record += ["--", "sleep", str(args.seconds)]
        else:
            record = [pyspy, "record", "--pid", pid, "--duration", str(args.seconds)]
            record += ["--rate", str(args.rate), "--format", "raw", "-o", str(raw)]
            record += ["--native"] * args.native
        subprocess.run(record, check=True, stdout=subprocess.DEVNULL)
        cpu = lgmt.cpu() - cpu0
        output = load.communicate()
        if args.workload == "grpcio":
            result = json.loads(output[0].strip().splitlines()[-1])
        else:
            result = b.parse_h2load(output[0]) if grpc else b.parse_wrk(*output)
    finally:
        bench.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    what = "small GETs" if get else "256 KiB OTLP gRPC exports" if grpc else "1 MiB pushes"
    text = (
        f"lgmt-proxy under {args.workload if grpc else 'wrk'} -c{conns} {what}"
        f"{', budgets shared through Redis' if redis is not None else ''}"
        f"{', HTTPS upstream' if args.tls else ''}: "
        f"{result['requests']} requests, {result.get('non2xx', 'n/a')} non-2xx; "
        f"proxy CPU while sampled {cpu:.1f} s over {args.seconds} s\n"
        + (perf_summary(raw) if args.perf else summarize(raw))
    )
    out.with_suffix(".summary.txt").write_text(text)
    print(text, end="")
    b.log(f"raw stacks: {raw}; summary: {out.with_suffix('.summary.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
