#!/usr/bin/env python3
"""Benchmark lgmt-proxy against nginx doing the same job, in one run.

    python3 bench/run.py                      full run (about 7 min + the soak)
    python3 bench/run.py --soak-seconds 120   shorter soak
    python3 bench/run.py --quick              CI smoke: seconds per workload, small sizes, no soak
    python3 bench/run.py --only get50,auth    some workloads
    python3 bench/run.py --compare-twistd ../other/.venv/bin/twistd   A/B two builds
    python3 bench/run.py --update-docs        also rewrite the results in docs/performance.md

All on 127.0.0.1: an nginx upstream standing in for Grafana Cloud, nginx as
the same credential-injecting reverse proxy (the baseline) and lgmt-proxy
(``.venv/bin/twistd -n lgmt-proxy``). Each workload alternates the targets
(order flipped every round) so drift of a shared machine hits all alike. The
headline figure is each proxy's own CPU time per request (user + system, of
nginx's worker), also given as a ratio to nginx. The table is data: FIGURES,
one row each (see docs/performance.md for what each workload does and why).

Exit status: 0 when every figure was produced (with --strict: and every
target met), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b  # re-executes under .venv/bin/python when psutil is missing
from benchlib import MiB, log

WORKLOADS = ("get50", "auth", "get1", "push", "big", "idle", "soak")
DOCS = b.ROOT / "docs" / "performance.md"
RESULTS = b.BENCH / "results"
MARKS = ("<!-- bench:results:start -->", "<!-- bench:results:end -->")
Runs = dict[str, list[dict[str, Any]]]
Summary = dict[str, dict[str, Any]]


@dataclass
class Settings:
    rounds: int = 4
    seconds: int = 10  # per measured wrk run
    warmup: int = 2  # per target, before the first round of a workload
    get_connections: int = 50
    auth_consumers: int = 10_000
    push_connections: int = 8
    push_bytes: int = MiB
    big_bytes: int = 512 * MiB
    big_read_rate: int = 256 * MiB  # bytes/s the big download's reader takes at most
    idle_connections: int = 2000
    soak_seconds: int = 600
    soak_baseline_seconds: int = 60  # nginx's soak, for the CPU ratio only
    soak_connections: int = 10
    soak_delay_ms: int = 10  # per connection between requests: about 1,000 req/s
    soak_push_every: int = 10
    soak_push_bytes: int = 64 * 1024
    soak_close_every: int = 50
    settle: float = 1.0  # seconds for RSS to settle after idle connections open/close

    @classmethod
    def quick(cls) -> Settings:
        return cls(1, 2, 1, big_bytes=32 * MiB, idle_connections=200, soak_seconds=0, settle=0.5)


# -- one bench run -------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, workdir: Path, twistd: str, compare: str | None) -> None:
        self.s, self.workdir, self.twistd, self.compare = s, workdir, twistd, compare
        self.targets: dict[str, b.Target] = {}
        self.upstream: b.Nginx | None = None

    def start(self) -> None:
        up_port, sink_port = b.free_port(), b.free_port()
        big = self.workdir / "big.bin"
        with open(big, "wb") as f:
            f.truncate(self.s.big_bytes)  # sparse: costs no disk
        conf = b.upstream_conf(self.workdir / "upstream", up_port, sink_port, big)
        self.upstream = b.Nginx(
            "upstream", "upstream (nginx)", self.workdir, conf, up_port, "/health"
        )
        self.upstream.start()  # stopped by `stop` even if what follows fails
        self.log = b.UpstreamLog(self.upstream.prefix / "access.log")
        self.targets["direct"] = b.Direct(self.upstream.url)
        self.start_proxies()

    def start_proxies(self) -> None:
        """nginx, lgmt-proxy and the --compare-twistd build, each known to
        `stop` as soon as it is started so a failure leaves nothing running."""
        assert self.upstream is not None
        port = b.free_port()
        conf = b.nginx_proxy_conf(
            self.workdir / "nginx",
            port,
            self.upstream.port,
            os.environ.get("BENCH_NGINX_BUFFER", "64k"),
        )
        self.add(b.Nginx("nginx", "nginx proxy", self.workdir, conf, port, "/ready"))
        self.add(b.LgmtProxy(self.workdir, self.twistd, self.upstream.url))
        if self.compare:
            self.add(b.LgmtProxy(self.workdir, self.compare, self.upstream.url, "lgmt_b"))
        log(", ".join(f"{t.label} {t.url}" for t in self.targets.values()))

    def add(self, target: b.Target) -> None:
        self.targets[target.name] = target
        target.start()

    def fresh_proxies(self) -> None:
        """New proxy processes, warmed up with a little of every kind of
        request: memory figures then do not depend on what ran before."""
        for name in self.proxies():
            self.targets.pop(name).stop()
        self.start_proxies()
        for name in self.proxies():
            b.big_upload(self.targets[name].port, MiB)
            with b.idle_connections(self.targets[name].port, 20):
                pass
        time.sleep(0.5)

    def stop(self) -> None:
        for target in [*self.targets.values(), self.upstream]:
            if target is not None:
                target.stop()

    def proxies(self) -> list[str]:
        return [n for n in ("nginx", "lgmt", "lgmt_b") if n in self.targets]

    def check_alive(self) -> None:
        for t in self.targets.values():
            if not t.alive():
                raise RuntimeError(f"{t.label} exited with {t.proc and t.proc.returncode}")

    def measured(
        self,
        name: str,
        connections: int,
        seconds: int,
        path: str,
        args: Sequence[str] = (),
        headers: Sequence[str] = (),
        min_body: int = 0,
    ) -> dict[str, Any]:
        """One wrk run against a target: its latency, its CPU, and what the
        upstream saw during it."""
        self.check_alive()
        target = self.targets[name]
        time.sleep(0.2)  # let the previous run's tail settle
        self.log.mark()
        cpu0, t0 = target.cpu(), time.monotonic()
        r = b.wrk(target.url + path, connections, seconds, args, headers)
        elapsed, cpu = time.monotonic() - t0, target.cpu() - cpu0
        time.sleep(0.3)  # requests cut by wrk's stop reach the upstream's log
        requests, run_s = r["requests"], r["duration_us"] / 1e6
        return {
            "requests": requests,
            "rps": requests / run_s if run_s else math.nan,
            **{f"p{p}_ms": r[f"p{p}_us"] / 1000 for p in (50, 90, 99)},
            "max_ms": r["max_us"] / 1000,
            "cpu_s": cpu,
            "cores": cpu / elapsed,
            "cpu_us_per_request": cpu * 1e6 / requests if requests else math.nan,
            "non2xx": r["non2xx"],
            "socket_errors": r["errors"],
            **self.log.window(name, min_body),
        }

    def rounds(
        self,
        workload: str,
        names: list[str],
        connections: int,
        path: str,
        args: Sequence[str] = (),
        **kw: Any,
    ) -> Runs:
        """A warm-up run per target (pools filled, nothing kept), then
        alternating measured rounds; the median of each figure is the result."""
        for name in names:
            self.measured(name, connections, self.s.warmup, path, args, **kw)
        runs: Runs = {n: [] for n in names}
        for r in range(self.s.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                run = self.measured(name, connections, self.s.seconds, path, args, **kw)
                runs[name].append(run)
                log(
                    f"{workload} round {r + 1}/{self.s.rounds} {name:9}: {run['rps']:8.0f} req/s  "
                    f"p50 {run['p50_ms']:.3f} ms  p99 {run['p99_ms']:.3f} ms  "
                    f"cpu {run['cpu_us_per_request']:.1f} us/req  non-2xx {run['non2xx']}"
                )
        return runs

    # -- workloads: each returns {"runs"?, "summary": {target: figures}, ...labels} --

    def get50(self) -> dict[str, Any]:
        runs = self.rounds("get50", self.proxies(), self.s.get_connections, b.GET_PATH)
        return {"connections": self.s.get_connections, "runs": runs, "summary": summarize(runs)}

    def auth(self) -> dict[str, Any]:
        """get50 again, with a proxy whose CLIENT_AUTH_FILE lists N consumers,
        driven with the last one's Bearer token: is authentication's cost
        independent of the number of consumers?"""
        n, c = self.s.auth_consumers, self.s.get_connections
        token = b.client_auth_file(self.workdir / "consumers.yaml", n)
        assert self.upstream is not None
        proxy = b.LgmtProxy(
            self.workdir,
            self.twistd,
            self.upstream.url,
            "lgmt_auth",
            CLIENT_AUTH_FILE=str(self.workdir / "consumers.yaml"),
        )
        self.add(proxy)
        try:
            names = ["nginx", "lgmt", "lgmt_auth"]
            runs = self.rounds(
                "auth", names, c, b.GET_PATH, headers=[f"Authorization: Bearer {token}"]
            )
        finally:
            self.targets.pop("lgmt_auth").stop()
        summary = summarize(runs)
        with_auth, without = summary["lgmt_auth"], summary["lgmt"]
        with_auth["no_auth_cpu_us_per_request"] = without["cpu_us_per_request"]
        # Refused requests would cost less than authenticated ones: no figure then.
        ok = with_auth["non2xx"] == 0 and with_auth["upstream_requests"] > 0
        with_auth["auth_cost"] = (
            ratio(with_auth["cpu_us_per_request"], without["cpu_us_per_request"])
            if ok
            else math.nan
        )
        return {"connections": c, "consumers": n, "runs": runs, "summary": summary}

    def get1(self) -> dict[str, Any]:
        runs = self.rounds("get1", ["direct", *self.proxies()], 1, b.GET_PATH)
        summary = summarize(runs)
        for name in self.proxies():  # added latency against the same round's direct run
            added = [
                r["p50_ms"] - d["p50_ms"] for r, d in zip(runs[name], runs["direct"], strict=True)
            ]
            summary[name]["added_p50_ms"] = statistics.median(added)
        return {"connections": 1, "runs": runs, "summary": summary}

    def push(self) -> dict[str, Any]:
        size, conns = self.s.push_bytes, self.s.push_connections
        runs = self.rounds(
            "push", self.proxies(), conns, b.PUSH_PATH, [str(size), "1"], min_body=size
        )
        for run in (run for target_runs in runs.values() for run in target_runs):
            mib = run["requests"] * size / MiB
            run["cpu_us_per_mib"] = run["cpu_s"] * 1e6 / mib if mib else math.nan
            run["mib_per_s"] = run["rps"] * size / MiB
        size_label = f"{size // MiB} MiB" if size % MiB == 0 else f"{size // 1024} KiB"
        return {"size": size_label, "connections": conns, "runs": runs, "summary": summarize(runs)}

    def big(self) -> dict[str, Any]:
        """One big upload, then one download read at a bounded rate, through
        fresh proxies: the peak RSS above where each started."""
        size, summary = self.s.big_bytes, {}
        self.fresh_proxies()
        for name in self.proxies():
            target, row = self.targets[name], {"non2xx": 0, "bad_credentials": 0}
            for way in ("up", "down"):
                self.check_alive()
                time.sleep(0.5)
                before = max(target.rss_kib(), target.peak_kib(reset=True))
                self.log.mark()
                cpu0 = target.cpu()
                if way == "up":
                    r = b.big_upload(target.port, size)
                else:
                    r = b.big_download(target.port, self.s.big_read_rate)
                cpu, peak = target.cpu() - cpu0, target.peak_kib()
                time.sleep(0.2)
                seen = self.log.window(name, size if way == "up" else 0)
                row["non2xx"] += (
                    r["status"] // 100 != 2
                    or r["bytes"] != size
                    or seen["pushes_not_read_whole"] > 0
                )
                row["bad_credentials"] += seen["bad_credentials"]
                row[f"{way}_extra_peak_mib"] = max(0, peak - before) / 1024
                row[f"{way}_mib_per_s"] = size / MiB / r["seconds"]
                row[f"{way}_cpu_us_per_mib"] = cpu * 1e6 / (size / MiB)
                log(
                    f"big {way:4} {name:6}: {row[f'{way}_mib_per_s']:6.0f} MiB/s, peak RSS +{row[f'{way}_extra_peak_mib']:.1f} MiB, status {r['status']}"
                )
            summary[name] = row
        return {"mib": size // MiB, "rate": self.s.big_read_rate // MiB, "summary": summary}

    def idle(self) -> dict[str, Any]:
        count, summary = self.s.idle_connections, {}
        self.fresh_proxies()
        for name in self.proxies():
            self.check_alive()
            target = self.targets[name]
            time.sleep(0.5)
            rss0, fds0 = target.rss_kib(), target.fds()
            with b.idle_connections(target.port, count) as opened:
                time.sleep(self.s.settle)
                rss1, fds1 = target.rss_kib(), target.fds()
            time.sleep(self.s.settle)
            rss2, fds2 = target.rss_kib(), target.fds()
            summary[name] = row = {
                "non2xx": opened["non2xx"] + count - opened["opened"],
                "kib_per_connection": (rss1 - rss0) / count,
                **{
                    f"rss_{k}_mib": v / 1024
                    for k, v in (("before", rss0), ("open", rss1), ("after", rss2))
                },
                **{f"fds_{k}": v for k, v in (("before", fds0), ("open", fds1), ("after", fds2))},
            }
            log(
                f"idle {name:6}: {row['kib_per_connection']:.1f} KiB per connection, RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} -> {rss2 / 1024:.1f} MiB, fds {fds0} -> {fds1} -> {fds2}"
            )
        return {"connections": count, "summary": summary}

    def soak(self) -> dict[str, Any]:
        """Paced mixed load for a long time, RSS and fds sampled: do they grow?"""
        s, summary = self.s, {}
        args = [
            str(s.soak_push_bytes),
            str(s.soak_push_every),
            str(s.soak_close_every),
            str(s.soak_delay_ms),
            b.PUSH_PATH,
        ]
        lengths = {"nginx": min(s.soak_seconds, s.soak_baseline_seconds), "lgmt": s.soak_seconds}
        for name, seconds in lengths.items():
            self.check_alive()
            target = self.targets[name]
            log(f"soak {name}: {seconds} s, {s.soak_connections} paced connections")
            time.sleep(0.5)
            self.log.mark()
            cpu0, t0 = target.cpu(), time.monotonic()
            cmd = b.wrk_command(target.url + b.GET_PATH, s.soak_connections, seconds, args)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            samples = []
            while proc.poll() is None:
                samples.append(
                    {"t": time.monotonic() - t0, "rss_kib": target.rss_kib(), "fds": target.fds()}
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(1.0, seconds / 60))
            r = b.parse_wrk(*proc.communicate())
            cpu = target.cpu() - cpu0
            time.sleep(0.3)
            summary[name] = row = {
                **soak_growth(samples),
                "requests": r["requests"],
                "rps": r["requests"] / (r["duration_us"] / 1e6),
                "cpu_us_per_request": cpu * 1e6 / r["requests"] if r["requests"] else math.nan,
                "non2xx": r["non2xx"],
                "socket_errors": r["errors"],
                "samples": samples,
                **self.log.window(name),
            }
            log(
                f"soak {name:6}: {row['requests']} requests, RSS {row['rss_first_mib']:.1f} -> {row['rss_last_mib']:.1f} MiB, fds {row['fds_first']} -> {row['fds_last']}, non-2xx {row['non2xx']}"
            )
        return {
            "nginx_seconds": lengths["nginx"],
            "lgmt_seconds": s.soak_seconds,
            "summary": summary,
        }

    def run(self, only: list[str]) -> dict[str, Any]:
        results = {}
        for workload in WORKLOADS:
            if workload in only and (workload != "soak" or self.s.soak_seconds > 0):
                log(workload)
                started = time.monotonic()
                results[workload] = getattr(self, workload)()
                results[workload]["wall_seconds"] = round(time.monotonic() - started, 1)
        return results


# -- figures ---------------------------------------------------------------------------

SUMMED = {
    "requests",
    "non2xx",
    "socket_errors",
    "bad_credentials",
    "pushes_not_read_whole",
    "upstream_requests",
    "upstream_new_connections",
}


def summarize(runs: Runs) -> Summary:
    """Per target: the median of each figure over the rounds, counts summed,
    and the upstream connection reuse (used per run / opened while measured)."""
    summary: Summary = {}
    for name, target_runs in runs.items():
        row = {
            k: (sum if k in SUMMED else statistics.median)(r[k] for r in target_runs)
            for k, v in target_runs[0].items()
            if isinstance(v, int | float)
        }
        opened = row["upstream_new_connections"]
        per = f"{row['upstream_requests'] / opened:,.0f}" if opened else "all reused"
        row["conns"] = f"{row['upstream_connections']:,.0f} / {opened} ({per})"
        summary[name] = row
    return summary


def soak_growth(samples: list[dict[str, float]]) -> dict[str, float]:
    """RSS and fds in the first and the last third of the samples after a
    warm-up fifth (medians), and the RSS slope; growth is more than 2 MiB or
    2 fds between the thirds."""
    steady = samples[len(samples) // 5 :]
    third = max(1, len(steady) // 3)
    if len(samples) < 4:
        return {
            k: math.nan
            for k in (
                "rss_first_mib",
                "rss_last_mib",
                "rss_slope_kib_per_min",
                "fds_first",
                "fds_last",
                "grows",
            )
        }

    def med(part: list[dict[str, float]], key: str) -> float:
        return statistics.median(x[key] for x in part)

    row = {
        "rss_first_mib": med(steady[:third], "rss_kib") / 1024,
        "rss_last_mib": med(steady[-third:], "rss_kib") / 1024,
        "fds_first": med(steady[:third], "fds"),
        "fds_last": med(steady[-third:], "fds"),
    }
    try:
        xs, ys = [x["t"] for x in steady], [x["rss_kib"] for x in steady]
        row["rss_slope_kib_per_min"] = 60 * statistics.linear_regression(xs, ys).slope
    except statistics.StatisticsError:
        row["rss_slope_kib_per_min"] = math.nan
    rss_growth, fd_growth = (
        row["rss_last_mib"] - row["rss_first_mib"],
        row["fds_last"] - row["fds_first"],
    )
    row["grows"] = float(rss_growth > 2.0 or fd_growth > 2)
    return row


@dataclass(frozen=True)
class Fig:
    """One row of the results table.

    ``cell`` formats one target's summary (``{key:spec}``; a missing or NaN
    value shows as n/a). The first row of a workload names it with ``label``,
    formatted from the workload's results. ``ratio`` keys are shown as
    lgmt-proxy / nginx. ``need`` keys must be numbers for nginx and lgmt-proxy
    or the figure counts as missing. ``limit`` makes ``target`` a check:
    the lgmt / nginx ratio of ``check`` (``on="ratio"``) or lgmt-proxy's own
    value (``on="lgmt"``) must be at most the limit."""

    workload: str
    figure: str
    cell: str
    label: str = ""
    ratio: tuple[str, ...] = ()
    direct: bool = False
    need: tuple[str, ...] = ()
    target: str = ""
    check: str = ""
    on: str = "ratio"
    limit: float = math.nan
    name: str = ""  # the check's name
    lgmt: str = "lgmt"  # the target shown as lgmt-proxy
    nginx: bool = True  # False: a figure of lgmt-proxy's alone


def _conns(w: str) -> Fig:
    return Fig(
        w, "upstream conns used per run / opened while measured (requests per opened)", "{conns}"
    )


def _latency(w: str) -> Fig:
    return Fig(
        w, "latency p50 / p99 (ms)", "{p50_ms:.2f} / {p99_ms:.2f}", ratio=("p50_ms", "p99_ms")
    )


def _big(way: str, label: str) -> list[Fig]:
    k = f"{way}_"
    return [
        Fig("big", "extra peak RSS (MiB)", f"{{{k}extra_peak_mib:.1f}}", label=label, ratio=(k + "extra_peak_mib",),
            need=(k + "extra_peak_mib",), target="< 64 MiB", check=k + "extra_peak_mib", on="lgmt", limit=64,
            name=f"big {way}: extra RSS < 64 MiB"),
        Fig("big", "throughput (MiB/s) / CPU per MiB (µs)", f"{{{k}mib_per_s:,.0f}} / {{{k}cpu_us_per_mib:,.0f}}",
            ratio=(k + "mib_per_s", k + "cpu_us_per_mib")),
    ]  # fmt: skip


CPU = "CPU per request (µs)"
FIGURES = [
    Fig("get50", CPU, "{cpu_us_per_request:,.1f}", label="small GET, {connections} conns", ratio=("cpu_us_per_request",),
        need=("cpu_us_per_request", "rps"), target="≤ 5x", check="cpu_us_per_request", limit=5,
        name="get50 CPU/request ≤ 5x nginx"),
    Fig("get50", "throughput (req/s)", "{rps:,.0f}", ratio=("rps",)),
    _latency("get50"),
    Fig("get50", "CPU used (cores)", "{cores:.2f}"),
    _conns("get50"),
    Fig("auth", CPU, "{cpu_us_per_request:,.1f}", label="small GET, {connections} conns, Bearer of the last of {consumers:,} consumers",
        ratio=("cpu_us_per_request",), need=("cpu_us_per_request",), lgmt="lgmt_auth"),
    Fig("auth", "CPU per request without client auth (µs); with / without, same rounds",
        "{no_auth_cpu_us_per_request:,.1f}; {auth_cost:.2f}x", nginx=False, need=("auth_cost",), target="≤ 1.5x",
        check="auth_cost", on="lgmt", limit=1.5, name="auth: CPU/request ≤ 1.5x without auth", lgmt="lgmt_auth"),
    Fig("get1", "latency p50 (ms)", "{p50_ms:.3f}", label="small GET, 1 conn", ratio=("p50_ms",), direct=True, need=("p50_ms",)),
    Fig("get1", "added p50 over direct (ms)", "{added_p50_ms:.3f}", ratio=("added_p50_ms",), target="≤ 2.5x",
        check="added_p50_ms", limit=2.5, name="get1 added p50 ≤ 2.5x nginx's"),
    Fig("get1", "latency p99 (ms)", "{p99_ms:.3f}", ratio=("p99_ms",), direct=True),
    Fig("get1", CPU, "{cpu_us_per_request:,.1f}", ratio=("cpu_us_per_request",)),
    _conns("get1"),
    Fig("push", "CPU per MiB (µs)", "{cpu_us_per_mib:,.0f}", label="{size} push, {connections} conns", ratio=("cpu_us_per_mib",),
        need=("cpu_us_per_mib",), target="≤ 1.5x", check="cpu_us_per_mib", limit=1.5, name="push CPU/MiB ≤ 1.5x nginx"),
    Fig("push", "throughput (MiB/s)", "{mib_per_s:,.0f}", ratio=("mib_per_s",)),
    _latency("push"),
    _conns("push"),
    Fig("push", "pushes not read whole by the upstream", "{pushes_not_read_whole:.0f}", target="0"),
    *_big("up", "{mib} MiB up (POST)"),
    *_big("down", "{mib} MiB down (GET, read at ≤ {rate} MiB/s)"),
    Fig("idle", "RSS per connection (KiB)", "{kib_per_connection:.1f}", label="{connections:,} idle keep-alive conns",
        ratio=("kib_per_connection",), need=("kib_per_connection",)),
    Fig("idle", "RSS before / open / after close (MiB)", "{rss_before_mib:.1f} / {rss_open_mib:.1f} / {rss_after_mib:.1f}"),
    Fig("idle", "open fds before / open / after close", "{fds_before} / {fds_open} / {fds_after}"),
    Fig("soak", "requests / req/s", "{requests:,.0f} / {rps:,.0f}", label="soak ({lgmt_seconds} s lgmt, {nginx_seconds} s nginx)"),
    Fig("soak", CPU, "{cpu_us_per_request:,.1f}", ratio=("cpu_us_per_request",), need=("cpu_us_per_request",)),
    Fig("soak", "RSS first → last third (MiB), slope (KiB/min)", "{rss_first_mib:.1f} → {rss_last_mib:.1f}, {rss_slope_kib_per_min:,.0f}",
        need=("rss_first_mib", "rss_last_mib"), target="no growth", check="grows", on="lgmt", limit=0,
        name="soak: no RSS/fd growth"),
    Fig("soak", "open fds first → last third", "{fds_first:.0f} → {fds_last:.0f}", target="no growth"),
]  # fmt: skip
TOTALS = ("non2xx", "socket_errors", "bad_credentials", "pushes_not_read_whole")


class _Values(dict[str, Any]):
    """Figures for str.format_map: NaN, None and missing keys show as n/a."""

    class NA:
        def __format__(self, spec: str) -> str:
            return "n/a"

    def __missing__(self, key: str) -> Any:
        return self.NA()

    def __getitem__(self, key: str) -> Any:
        v = super().__getitem__(key)
        return self.NA() if v is None or (isinstance(v, float) and math.isnan(v)) else v


def number(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    )


def ratio(a: Any, b_: Any) -> float:
    a, b_ = number(a), number(b_)
    return a / b_ if b_ and not math.isnan(a + b_) else math.nan


def fx(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def evaluate(results: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]], list[str]]:
    """The table rows, the target checks, and the figures that are missing."""
    rows, checks, missing = [], [], []
    for f in FIGURES:
        if f.workload not in results:
            continue
        s = results[f.workload]["summary"]
        d, n, lg = (s.get(k, {}) for k in ("direct", "nginx", f.lgmt))
        label = f.label.format_map(_Values(results[f.workload]))
        if any(math.isnan(number(t.get(k))) for k in f.need for t in (n, lg)[not f.nginx :]):
            missing.append(f"{f.workload}: {f.figure}")
        verdict = ""
        if f.check:
            value = (
                ratio(lg.get(f.check), n.get(f.check))
                if f.on == "ratio"
                else number(lg.get(f.check))
            )
            ok = None if math.isnan(value) else value <= f.limit
            checks.append({"target": f.name, "value": value, "limit": f.limit, "ok": ok})
            missing += [f.name] if ok is None else []
            verdict = "n/a" if ok is None else ("**met**" if ok else "**MISSED**")
        cells = [
            f.cell.format_map(_Values(n)) if n and f.nginx else "",
            f.cell.format_map(_Values(lg)),
        ]
        rows.append([
            label, f.figure, f.cell.format_map(_Values(d)) if f.direct else "", *cells,
            " / ".join(fx(ratio(lg.get(k), n.get(k))) for k in f.ratio), f.target, verdict,
        ])  # fmt: skip
    every = [t for r in results.values() for t in r["summary"].values()]
    totals = [int(sum(number(t.get(k, 0)) for t in every)) for k in TOTALS]
    ok = sum(totals) == 0
    checks.append({"target": "zero non-2xx", "value": float(sum(totals)), "limit": 0, "ok": ok})
    figure = "non-2xx answers / socket errors / bad upstream requests"
    cell = f"{totals[0]} / {totals[1]} / {totals[2] + totals[3]}"
    rows.append(["all", figure, "", "", cell, "", "0", "**met**" if ok else "**MISSED**"])
    return rows, checks, missing


#: What --compare-twistd prints: B (the other build) against A (lgmt-proxy).
COMPARED = {
    "get50": ("cpu_us_per_request", "rps", "p50_ms", "p99_ms"),
    "get1": ("cpu_us_per_request", "added_p50_ms", "p99_ms"),
    "push": ("cpu_us_per_mib", "mib_per_s", "p50_ms"),
    "big": ("up_extra_peak_mib", "up_cpu_us_per_mib", "down_extra_peak_mib", "down_cpu_us_per_mib"),
    "idle": ("kib_per_connection", "rss_before_mib"),
}


def compare_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for workload, keys in COMPARED.items():
        s = results.get(workload, {}).get("summary", {})
        if "lgmt_b" in s:
            for k in keys:
                a, b_ = number(s["lgmt"].get(k)), number(s["lgmt_b"].get(k))
                lines.append(
                    f"  A/B {workload:6} {k:22} A {a:>10,.3f}  B {b_:>10,.3f}  B/A {fx(ratio(b_, a))}"
                )
    return lines


def markdown(meta: dict[str, Any], rows: list[list[str]]) -> str:
    m, v = meta["machine"], meta["machine"]["versions"]
    lines = [
        f"Run {meta['date']} on {m['nproc']} x {m['cpu_model']} ({m['mem_gib']} GiB, "
        f"Linux {m['kernel']}), nginx {v.get('nginx', '?')}, wrk {v.get('wrk', '?')}, "
        f"lgmt-proxy at {meta['git']}.",
        f"Command: `{meta['command']}`; {meta['rounds']} alternating rounds of "
        f"{meta['seconds']} s per workload; medians of the rounds.",
        "",
        "| workload | figure | direct | nginx proxy | lgmt-proxy | lgmt / nginx | target | |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def git_describe() -> str:
    cmd = ["git", "-C", str(b.ROOT), "describe", "--always", "--dirty"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def update_docs(table: str) -> None:
    start, end = MARKS
    text, block = DOCS.read_text(), f"{start}\n{table}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Results\n\n{block}\n"
    DOCS.write_text(text)
    log(f"wrote the results into {DOCS}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="CI smoke: 2 s per workload, small sizes, no soak"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="WORKLOAD",
        help=f"repeatable or comma-separated: {', '.join(WORKLOADS)}",
    )
    p.add_argument("--soak-seconds", type=int, help="soak length (default 600; 0 skips it)")
    p.add_argument("--rounds", type=int, help="rounds per workload (default 4, --quick 1)")
    p.add_argument(
        "--seconds", type=int, help="seconds per measured wrk run (default 10, --quick 2)"
    )
    p.add_argument("--big-mib", type=int, help="size of the big transfer each way (default 512)")
    p.add_argument(
        "--idle-connections", type=int, help="idle keep-alive connections (default 2000)"
    )
    p.add_argument(
        "--consumers",
        type=int,
        help="consumers in the auth workload's CLIENT_AUTH_FILE (default 10000)",
    )
    p.add_argument(
        "--twistd",
        default=str(b.ROOT / ".venv" / "bin" / "twistd"),
        help="twistd with lgmt-proxy installed",
    )
    p.add_argument(
        "--compare-twistd",
        metavar="TWISTD",
        help="also run this build (another worktree's .venv/bin/twistd) in the same rounds: A/B",
    )
    p.add_argument("--workdir", help="where configs and logs go (default: a temp dir, removed)")
    p.add_argument("--json", help="also write the results here (always: bench/results/latest.json)")
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the results table in docs/performance.md",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str]) -> int:
    args, wall0 = parse_args(argv), time.monotonic()
    s = Settings.quick() if args.quick else Settings()
    for key, value in (
        ("soak_seconds", args.soak_seconds), ("rounds", args.rounds), ("seconds", args.seconds),
        ("big_bytes", args.big_mib and args.big_mib * MiB), ("idle_connections", args.idle_connections),
        ("auth_consumers", args.consumers),
    ):  # fmt: skip
        if value is not None:
            setattr(s, key, value)
    only = [w for item in args.only for w in item.split(",") if w] or list(WORKLOADS)
    if unknown := set(only) - set(WORKLOADS):
        sys.exit(f"bench: unknown workload {', '.join(unknown)}; one of {', '.join(WORKLOADS)}")
    for twistd in (args.twistd, args.compare_twistd or args.twistd):
        if not shutil.which(twistd):
            sys.exit(f"bench: no {twistd}: run `make venv` first (or pass --twistd)")
    b.ensure_tools()
    if (limit := b.raise_fd_limit()) < s.idle_connections + 200:
        log(f"open-file limit is {limit}: idle connections cut to {limit - 200}")
        s.idle_connections = max(10, limit - 200)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lgmt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(s, workdir, args.twistd, args.compare_twistd)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": b.machine(),
        "git": git_describe(),
        "command": "python3 bench/run.py " + " ".join(argv),
        "rounds": s.rounds,
        "seconds": s.seconds,
        "settings": asdict(s),
        "loadavg_start": os.getloadavg(),
    }
    try:
        bench.start()
        results = bench.run(only)
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}\nlogs kept in {workdir}")
        return 1
    finally:
        bench.stop()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    meta.update(loadavg_end=os.getloadavg(), wall_seconds=round(time.monotonic() - wall0, 1))
    if (now := git_describe()) != meta["git"]:
        log(f"the working tree changed during the run: {meta['git']} -> {now}")

    rows, checks, missing = evaluate(results)
    table = markdown(meta, rows)
    print(f"\n{table}")
    for c in checks:
        verdict = "n/a" if c["ok"] is None else ("met" if c["ok"] else "MISSED")
        print(f"  target {c['target']}: {c['value']:.3f} -> {verdict}")
    print("\n".join([*compare_lines(results), f"  wall time {meta['wall_seconds']} s"]))

    RESULTS.mkdir(exist_ok=True)
    payload = json.dumps(
        {"meta": meta, "results": results, "checks": checks, "table": table}, indent=1, default=str
    )
    for path in [RESULTS / "latest.json", *([Path(args.json)] if args.json else [])]:
        path.write_text(payload)
    (RESULTS / "latest.md").write_text(table)
    if args.update_docs:
        update_docs(table)
    if missing:
        print(f"bench: figures missing: {'; '.join(sorted(set(missing)))}", file=sys.stderr)
        return 1
    if args.strict and any(c["ok"] is False for c in checks):
        print("bench: targets missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
