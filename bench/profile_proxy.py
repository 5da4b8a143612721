#!/usr/bin/env python3
"""Profile lgmt-proxy with py-spy under the 50-connection small-GET load.

    .venv/bin/pip install py-spy                        (once)
    python3 bench/profile_proxy.py                            20 s of samples
    python3 bench/profile_proxy.py --seconds 30 --native      with C frames too
    python3 bench/profile_proxy.py --summarize FILE           re-read a raw profile

Starts the same upstream nginx and lgmt-proxy as bench/run.py, drives wrk at
50 connections, records with ``py-spy record --format raw`` (collapsed
stacks: flamegraph.pl or speedscope read them), then prints where the CPU
goes: self time per function, time inside key functions, and a breakdown by
area (reactor, socket I/O, Agent client side, server side, logging, metrics,
lgmt_proxy's own code). Files go to bench/results/.
py-spy needs ptrace: as root it works; elsewhere try --nonblocking or
``sysctl kernel.yama.ptrace_scope=0``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
from benchlib import log

RESULTS = b.BENCH / "results"

#: (area, pattern on the frame's file) in order; the first match wins. A
#: frame of the standard library (urllib, os, ...) counts for the area of the
#: nearest caller that has one.
AREAS = [
    (
        "reactor: epoll registration + poll",
        r"twisted/internet/(epollreactor|posixbase|_signals)\.py",
    ),
    (
        "reactor: timers, dispatch (base.py, log/context wrappers)",
        r"twisted/(internet/base|python/log|python/context)\.py",
    ),
    (
        "socket I/O: send/recv + write buffers (tcp.py, abstract.py)",
        r"twisted/(internet/(tcp|abstract|main)|python/util)\.py",
    ),
    (
        "Agent client side (_newclient, client, endpoints)",
        r"twisted/web/(_newclient|client)\.py|twisted/internet/endpoints\.py",
    ),
    (
        "server side (http.py, server.py, LineReceiver)",
        r"twisted/web/(http|server|_abnf|_responses|resource)\.py|twisted/protocols/basic\.py",
    ),
    ("headers (http_headers.py)", r"twisted/web/http_headers\.py"),
    ("Deferreds", r"twisted/internet/defer\.py"),
    ("access log (twisted.logger, logs.py, json)", r"(twisted/logger/|lgmt_proxy/logs\.py|^json/)"),
    ("metrics (prometheus_client, metrics.py)", r"(prometheus_client/|lgmt_proxy/metrics\.py)"),
    ("lgmt_proxy: relay.py", r"lgmt_proxy/relay\.py"),
    ("lgmt_proxy: server.py", r"lgmt_proxy/server\.py"),
    ("lgmt_proxy: observe.py", r"lgmt_proxy/observe\.py"),
    ("lgmt_proxy: other", r"lgmt_proxy/"),
    ("other Twisted / zope", r"(twisted/|zope/)"),
]

#: Functions whose inclusive share is worth knowing (name as py-spy shows it).
KEY_FUNCTIONS = [
    "Relay._start",
    "Upstream.request",
    "Agent.request",
    "Agent._requestWithEndpoint",
    "URI.fromBytes",
    "HTTP11ClientProtocol.request",
    "forward_request_headers",
    "Relay._got_response",
    "copy_response_headers",
    "Relay.response_ended",
    "Observer.finished",
    "Logger.emit",
    "event_as_json",
    "StreamObserver.access",
    "access_as_json",
    "request_id",
    "ProxyMetrics.request",
    "ProxyRequest.__init__",
    "HTTPChannel.allHeadersReceived",
    "ProxyRequest.gotLength",
    "Request.write",
    "FileDescriptor.write",
    "FileDescriptor.writeSequence",
    "FileDescriptor.startWriting",
    "FileDescriptor.doWrite",
    "FileDescriptor.stopWriting",
    "EPollReactor._add",
    "EPollReactor._remove",
    "untilConcludes",
    "Connection.doRead",
    "_getsockname",
    "ReactorBase.callLater",
    "DelayedCall.cancel",
    "HTTPConnectionPool.getConnection",
    "HTTPConnectionPool._putConnection",
    "Deferred.callback",
    "Deferred._runCallbacks",
]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse_frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if m is None:
        return frame, ""
    return m.group("func"), short(m.group("file"))


def area_of(file: str) -> str | None:
    for name, pattern in AREAS:
        if re.search(pattern, file):
            return name
    return None


#: Native frames (``--native``) that are an area of their own.
NATIVE_AREAS = [
    ("cyclic garbage collector", r"^(gc_collect|collect_with_callback|_PyObject_GC_Alloc)"),
    ("syscall epoll_ctl (register/unregister for writing)", r"^epoll_ctl$"),
    ("syscalls send/recv/write", r"^(send|recv|__libc_send|__libc_recv|write|__GI___libc_write)$"),
    ("syscall epoll_wait", r"^epoll_wait$"),
]


def area_of_stack(frames: list[tuple[str, str]]) -> str:
    """The area of the innermost frame that has one."""
    leaf = frames[-1][0]
    for name, pattern in NATIVE_AREAS:
        if re.search(pattern, leaf):
            return name
    for _func, file in reversed(frames):
        area = area_of(file)
        if area is not None:
            return area
    return "other"


def summarize(raw: Path, top: int = 25) -> str:
    """A text summary of a py-spy raw (collapsed stacks) file."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_name: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            parse_frame(f)
            for f in stack.split(";")
            if f and not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += n
        func, file = frames[-1]
        self_time[f"{func} ({file})"] += n
        areas[area_of_stack(frames)] += n
        seen = set()
        names = set()
        for func, file in frames:
            key = f"{func} ({file})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
            if func not in names:
                names.add(func)
                by_name[func] += n
    if not total:
        return "no samples\n"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    out = [
        f"{total} samples (not idle)",
        "",
        "By area (self time; stdlib frames count for their caller's area):",
    ]
    for name, n in areas.most_common():
        out.append(f"  {pct(n)}  {name}")
    out += ["", f"Top {top} functions by self time:"]
    for key, n in self_time.most_common(top):
        out.append(f"  {pct(n)}  {key}")
    out += ["", "Key functions, inclusive (time with the function on the stack):"]
    for name in KEY_FUNCTIONS:
        if by_name[name]:
            out.append(f"  {pct(by_name[name])}  {name}")
    out += ["", f"Top {top} functions by inclusive time, below the reactor's dispatch:"]
    shown = 0
    for key, n in inclusive.most_common():
        if n > 0.9 * total:
            continue  # the run loop, doPoll, callWithLogger...
        out.append(f"  {pct(n)}  {key}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=int, default=20, help="sampling time (default 20)")
    p.add_argument("--rate", type=int, default=200, help="samples per second (default 200)")
    p.add_argument(
        "--workload",
        choices=("get", "push"),
        default="get",
        help="small GETs (default) or 1 MiB pushes",
    )
    p.add_argument(
        "--connections", type=int, help="wrk connections (default 50 for get, 8 for push)"
    )
    p.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native)")
    p.add_argument("--nonblocking", action="store_true", help="do not pause the proxy to sample")
    p.add_argument(
        "--py-spy", default=None, help="py-spy binary (default: .venv/bin/py-spy or PATH)"
    )
    p.add_argument("--twistd", default=str(b.ROOT / ".venv" / "bin" / "twistd"))
    p.add_argument("--out", help="output prefix (default bench/results/profile-<workload>)")
    p.add_argument("--summarize", metavar="RAW", help="only summarize an existing raw profile")
    args = p.parse_args(argv)

    if args.connections is None:
        args.connections = 50 if args.workload == "get" else 8
    script, path, wrk_args = (
        ("get.lua", b.GET_PATH, [])
        if args.workload == "get"
        else ("push.lua", b.PUSH_PATH, [str(b.MiB)])
    )
    if args.summarize:
        print(summarize(Path(args.summarize)), end="")
        return 0
    pyspy = args.py_spy or (
        str(b.ROOT / ".venv" / "bin" / "py-spy")
        if (b.ROOT / ".venv" / "bin" / "py-spy").exists()
        else shutil.which("py-spy")
    )
    if not pyspy:
        print("profile: py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    b.ensure_tools()
    b.raise_fd_limit()
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out or RESULTS / f"profile-{args.workload}{args.connections}")
    raw = out.with_suffix(".txt")
    speedscope = out.with_suffix(".speedscope.json")

    from run import Bench, Settings  # the same processes as the benchmark

    workdir = Path(tempfile.mkdtemp(prefix="lgmt-profile-"))
    bench = Bench(Settings(), workdir, args.twistd)
    try:
        bench.start()
        lgmt = bench.targets["lgmt"]
        pid = lgmt.pids()[0]
        b.wrk(
            lgmt.url + path, connections=args.connections, seconds=2, script=script, args=wrk_args
        )
        load_seconds = 2 * args.seconds + 6
        wrk, cmd = b.wrk_popen(
            lgmt.url + path,
            connections=args.connections,
            seconds=load_seconds,
            script=script,
            args=wrk_args,
        )
        time.sleep(2)
        flags = ["--nonblocking"] if args.nonblocking else []
        flags += ["--native"] if args.native else []
        log(f"py-spy: {args.seconds}s at {args.rate} Hz on pid {pid} (raw, then speedscope)")
        cpu0 = lgmt.cpu()
        for fmt, path in (("raw", raw), ("speedscope", speedscope)):
            subprocess.run(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(args.seconds),
                    "--rate",
                    str(args.rate),
                    "--format",
                    fmt,
                    "-o",
                    str(path),
                    *flags,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        cpu = lgmt.cpu() - cpu0
        stdout, stderr = wrk.communicate()
        result = b.parse_wrk(stdout, stderr, cmd)
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = (
        f"lgmt-proxy under wrk -c{args.connections} {'small GETs' if args.workload == 'get' else '1 MiB pushes'}: "
        f"{result['requests']} requests in "
        f"{result['duration_us'] / 1e6:.0f}s, {result['non2xx']} non-2xx; proxy CPU while "
        f"sampled {cpu:.1f}s over {2 * args.seconds}s\n" + summarize(raw)
    )
    out.with_suffix(".summary.txt").write_text(text)
    print(text, end="")
    log(f"raw stacks: {raw}; speedscope: {speedscope}; summary: {out.with_suffix('.summary.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
