#!/usr/bin/env python3
"""Benchmark lgmt-proxy against nginx doing the same job, in one run.

    python3 bench/run.py                      full run (about 6 min + the soak)
    python3 bench/run.py --soak-seconds 120   shorter soak
    python3 bench/run.py --quick              CI smoke: seconds per workload, small sizes, no soak
    python3 bench/run.py --only get50         one workload (repeatable, or comma-separated)
    python3 bench/run.py --update-docs        also rewrite the results in docs/performance.md

What runs, all on 127.0.0.1 (see docs/performance.md for the why):

- an nginx upstream standing in for Grafana Cloud (one worker): small JSON
  answers to queries, pushes read whole before the 204, a big file;
- nginx as the same credential-injecting reverse proxy (one worker, keep-alive
  upstream pool, streaming both ways): the baseline;
- lgmt-proxy (`.venv/bin/twistd -n --pidfile= lgmt-proxy`).

Each workload alternates nginx and lgmt-proxy rounds (order flipped every
round) so drift of a shared machine hits both alike. The headline figure is
the proxy's own CPU time per request (utime+stime from /proc/<pid>/stat; for
nginx its worker), and every figure is also given as a ratio to nginx.

Needs wrk and nginx (Debian packages; installed with apt-get when missing
and running as root). Standard library only: any Python 3.11 can run it.
Exit status: 0 when every figure was produced (with --strict: and every
target met), 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
from benchlib import MiB, log

WORKLOADS = ("get50", "get1", "push", "big", "idle", "soak")
DOCS = b.ROOT / "docs" / "performance.md"
RESULTS = b.BENCH / "results"
START_MARK = "<!-- bench:results:start -->"
END_MARK = "<!-- bench:results:end -->"


@dataclass
class Settings:
    rounds: int = 4
    seconds: int = 10  # per measured wrk run
    warmup: int = 2  # per target, before the first round of a workload
    get_connections: int = 50
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
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            rounds=1,
            seconds=2,
            warmup=1,
            big_bytes=32 * MiB,
            idle_connections=200,
            soak_seconds=0,
            quick=True,
        )


# -- one bench run ---------------------------------------------------------------


class Bench:
    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        twistd: str,
        compare_twistd: str | list[str] | None = None,
    ) -> None:
        self.s = settings
        self.workdir = workdir
        self.twistd = twistd
        self.compare_twistd = compare_twistd
        self.targets: dict[str, b.Target] = {}
        self.upstream: b.Nginx | None = None
        self.results: dict[str, Any] = {}

    # -- processes ----------------------------------------------------------

    def start(self) -> None:
        up_port, sink_port = b.free_port(), b.free_port()
        big = self.workdir / "big.bin"
        with open(big, "wb") as f:
            f.truncate(self.s.big_bytes)  # sparse: costs no disk
        self.upstream = b.Nginx(
            "upstream",
            "upstream (nginx)",
            self.workdir,
            b.upstream_conf(self.workdir / "upstream", up_port, sink_port, big),
            up_port,
        )
        self.upstream.start("/health")  # stopped by `stop` even if what follows fails
        self.log = b.UpstreamLog(self.upstream.prefix / "access.log")
        self.targets["direct"] = b.Direct(self.upstream.url)
        self.start_proxies()

    def start_proxies(self) -> None:
        assert self.upstream is not None
        nginx_port, lgmt_port = b.free_port(), b.free_port()
        nginx = b.Nginx(
            "nginx",
            "nginx proxy",
            self.workdir,
            b.nginx_proxy_conf(
                self.workdir / "nginx",
                nginx_port,
                self.upstream.port,
                os.environ.get("BENCH_NGINX_BUFFER", "64k"),
            ),
            nginx_port,
        )
        # Each process is known to `stop` as soon as it is started, so a
        # failure further on leaves nothing running.
        self.targets["nginx"] = nginx
        nginx.start("/ready")
        lgmt = b.LgmtProxy(self.workdir, self.twistd, self.upstream.url, lgmt_port)
        self.targets["lgmt"] = lgmt
        lgmt.start()
        if self.compare_twistd:
            other = b.LgmtProxy(
                self.workdir, self.compare_twistd, self.upstream.url, b.free_port(), name="lgmt_b"
            )
            self.targets["lgmt_b"] = other
            other.start()
        log(
            f"upstream {self.upstream.url}, nginx proxy {nginx.url} (worker {nginx.pids()}), "
            f"lgmt-proxy {lgmt.url} (pid {lgmt.pids()})"
        )

    def fresh_proxies(self) -> None:
        """New proxy processes, warmed up with a little of every kind of
        request: memory figures then do not depend on what ran before."""
        for name in ("nginx", "lgmt", "lgmt_b"):
            if name in self.targets:
                self.targets.pop(name).stop()
        self.start_proxies()
        for name in self.proxies():
            target = self.targets[name]
            port = int(target.url.rsplit(":", 1)[1])
            b.big_upload(port, b.PUSH_PATH, MiB)
            with b.idle_connections(port, 20, b.GET_PATH):
                pass
        time.sleep(0.5)
        self.log.mark()

    def stop(self) -> None:
        for target in self.targets.values():
            target.stop()
        if self.upstream is not None:
            self.upstream.stop()

    def check_alive(self) -> None:
        for name in self.proxies():
            target = self.targets[name]
            proc = getattr(target, "proc", None)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{target.label} exited with {proc.returncode}")

    # -- helpers -----------------------------------------------------------------

    def proxies(self) -> list[str]:
        """nginx, lgmt-proxy, and the build compared with it (--compare-twistd)."""
        return [n for n in ("nginx", "lgmt", "lgmt_b") if n in self.targets]

    def orders(self, names: list[str]) -> list[list[str]]:
        """Target order per round: flipped every round (ABBA...)."""
        return [names if r % 2 == 0 else names[::-1] for r in range(self.s.rounds)]

    def measured_wrk(
        self,
        target: b.Target,
        *,
        connections: int,
        seconds: int,
        script: str,
        path: str,
        args: list[str] | None = None,
        min_body: int = 0,
    ) -> dict[str, Any]:
        """One wrk run against a target, with the target's CPU and what the
        upstream saw during it."""
        self.check_alive()
        time.sleep(0.2)  # let the previous run's tail settle
        self.log.mark()
        cpu0 = target.cpu()
        t0 = time.monotonic()
        result = b.wrk(
            target.url + path,
            connections=connections,
            seconds=seconds,
            script=script,
            args=args or [],
        )
        elapsed = time.monotonic() - t0
        cpu = target.cpu() - cpu0
        time.sleep(0.3)  # requests cut by wrk's stop reach the upstream's log
        upstream = self.log.window(target.name, min_body)
        requests = result["requests"]
        seconds_run = result["duration_us"] / 1e6
        run = {
            "requests": requests,
            "rps": requests / seconds_run if seconds_run else 0.0,
            "p50_ms": result["p50_us"] / 1000,
            "p90_ms": result["p90_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "max_ms": result["max_us"] / 1000,
            "cpu_s": cpu,
            "cores": cpu / elapsed if elapsed else 0.0,
            "cpu_us_per_request": cpu * 1e6 / requests if requests else float("nan"),
            "non2xx": result["non2xx"],
            "wrk_non2xx_line": result["wrk_non2xx_line"],
            "socket_errors": result["errors"],
            **upstream,
        }
        return run

    def rounds(
        self,
        workload: str,
        names: list[str],
        *,
        connections: int,
        script: str,
        path: str,
        args: list[str] | None = None,
        min_body: int = 0,
    ) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for name in names:  # warm-up: pools filled, nothing measured
            self.measured_wrk(
                self.targets[name],
                connections=connections,
                seconds=self.s.warmup,
                script=script,
                path=path,
                args=args,
                min_body=min_body,
            )
        for r, order in enumerate(self.orders(names)):
            for name in order:
                run = self.measured_wrk(
                    self.targets[name],
                    connections=connections,
                    seconds=self.s.seconds,
                    script=script,
                    path=path,
                    args=args,
                    min_body=min_body,
                )
                run["round"] = r + 1
                runs[name].append(run)
                log(
                    f"{workload} round {r + 1}/{self.s.rounds} {name:6}: "
                    f"{run['rps']:8.0f} req/s  p50 {run['p50_ms']:.3f} ms  "
                    f"p99 {run['p99_ms']:.3f} ms  cpu {run['cpu_us_per_request']:.1f} us/req  "
                    f"non-2xx {run['non2xx']}  upstream conns {run['upstream_connections']} "
                    f"(new {run['upstream_new_connections']})"
                )
        return runs

    # -- workloads ----------------------------------------------------------------

    def get50(self) -> dict[str, Any]:
        n = self.s.get_connections
        log(f"get50: small GET, {n} connections, {self.s.rounds} rounds of {self.s.seconds}s")
        runs = self.rounds(
            "get50", self.proxies(), connections=n, script="get.lua", path=b.GET_PATH
        )
        return {"connections": n, "runs": runs, "summary": summarize(runs)}

    def get1(self) -> dict[str, Any]:
        log(f"get1: small GET, 1 connection, {self.s.rounds} rounds of {self.s.seconds}s")
        runs = self.rounds(
            "get1", ["direct", *self.proxies()], connections=1, script="get.lua", path=b.GET_PATH
        )
        summary = summarize(runs)
        direct = summary["direct"]["p50_ms"]
        for name in self.proxies():
            # Added latency per round against the same round's direct run.
            added = [
                run["p50_ms"] - d["p50_ms"]
                for run, d in zip(runs[name], runs["direct"], strict=True)
            ]
            summary[name]["added_p50_ms"] = b.median(added)
            summary[name]["added_p50_ms_of_medians"] = summary[name]["p50_ms"] - direct
        return {"connections": 1, "runs": runs, "summary": summary}

    def push(self) -> dict[str, Any]:
        n, size = self.s.push_connections, self.s.push_bytes
        log(f"push: {size // 1024} KiB POSTs, {n} connections, {self.s.rounds} rounds")
        runs = self.rounds(
            "push",
            self.proxies(),
            connections=n,
            script="push.lua",
            path=b.PUSH_PATH,
            args=[str(size)],
            min_body=size,
        )
        for target_runs in runs.values():
            for run in target_runs:
                mib = run["requests"] * size / MiB
                run["cpu_us_per_mib"] = run["cpu_s"] * 1e6 / mib if mib else float("nan")
                run["mib_per_s"] = run["rps"] * size / MiB
        return {"connections": n, "body_bytes": size, "runs": runs, "summary": summarize(runs)}

    def big(self) -> dict[str, Any]:
        size = self.s.big_bytes
        log(
            f"big: {size // MiB} MiB up, then down (read at most "
            f"{self.s.big_read_rate // MiB} MiB/s), through each proxy"
        )
        out: dict[str, Any] = {"bytes": size, "read_rate": self.s.big_read_rate, "summary": {}}
        self.fresh_proxies()
        for name in self.proxies():
            self.check_alive()
            target = self.targets[name]
            port = int(target.url.rsplit(":", 1)[1])
            row: dict[str, Any] = {}
            for direction in ("up", "down"):
                time.sleep(0.5)
                reset = target.reset_peak()
                before_rss = target.rss_kib()
                before_hwm = target.hwm_kib()
                self.log.mark()
                cpu0 = target.cpu()
                if direction == "up":
                    r = b.big_upload(port, b.PUSH_PATH, size)
                    ok = r["status"] == 204
                else:
                    r = b.big_download(port, b.BIG_PATH, self.s.big_read_rate)
                    ok = r["status"] == 200 and r["bytes"] == size
                cpu = target.cpu() - cpu0
                peak = target.hwm_kib()
                time.sleep(0.2)
                seen = self.log.window(name, size if direction == "up" else 0)
                baseline = before_rss if reset else max(before_rss, before_hwm)
                row[direction] = {
                    "status": r["status"],
                    "ok": ok and seen["pushes_not_read_whole"] == 0,
                    "seconds": r["seconds"],
                    "mib_per_s": size / MiB / r["seconds"],
                    "rss_before_mib": before_rss / 1024,
                    "peak_mib": peak / 1024,
                    "extra_peak_mib": max(0, peak - baseline) / 1024,
                    "peak_reset": reset,
                    "cpu_us_per_mib": cpu * 1e6 / (size / MiB),
                    **seen,
                }
                log(
                    f"big {direction:4} {name:6}: {row[direction]['mib_per_s']:7.0f} MiB/s, "
                    f"peak RSS +{row[direction]['extra_peak_mib']:.1f} MiB "
                    f"(from {before_rss / 1024:.1f}), status {r['status']}"
                )
            out["summary"][name] = row
        return out

    def idle(self) -> dict[str, Any]:
        count = self.s.idle_connections
        log(f"idle: {count} keep-alive connections held open")
        out: dict[str, Any] = {"connections": count, "summary": {}}
        self.fresh_proxies()
        for name in self.proxies():
            self.check_alive()
            target = self.targets[name]
            port = int(target.url.rsplit(":", 1)[1])
            time.sleep(0.5)
            rss0, fds0 = target.rss_kib(), target.fds()
            settle = 0.5 if self.s.quick else 1.0
            with b.idle_connections(port, count, b.GET_PATH) as opened:
                time.sleep(settle)
                rss1, fds1 = target.rss_kib(), target.fds()
            time.sleep(settle)
            rss2, fds2 = target.rss_kib(), target.fds()
            row = {
                "opened": opened["opened"],
                "non2xx": opened["non2xx"],
                "rss_before_mib": rss0 / 1024,
                "rss_open_mib": rss1 / 1024,
                "rss_after_close_mib": rss2 / 1024,
                "kib_per_connection": (rss1 - rss0) / count,
                "fds_before": fds0,
                "fds_open": fds1,
                "fds_after_close": fds2,
            }
            out["summary"][name] = row
            log(
                f"idle {name:6}: {row['kib_per_connection']:.1f} KiB per connection "
                f"(RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} -> {rss2 / 1024:.1f} MiB after close), "
                f"fds {fds0} -> {fds1} -> {fds2}"
            )
        return out

    def soak(self) -> dict[str, Any]:
        s = self.s
        rate = s.soak_connections * 1000 / s.soak_delay_ms
        log(
            f"soak: lgmt-proxy {s.soak_seconds}s (nginx {min(s.soak_seconds, s.soak_baseline_seconds)}s "
            f"for the CPU ratio), {s.soak_connections} paced connections (at most {rate:.0f} req/s)"
        )
        out: dict[str, Any] = {
            "seconds": s.soak_seconds,
            "connections": s.soak_connections,
            "delay_ms": s.soak_delay_ms,
            "summary": {},
        }
        args = [
            b.GET_PATH,
            b.PUSH_PATH,
            str(s.soak_delay_ms),
            str(s.soak_push_every),
            str(s.soak_push_bytes),
            str(s.soak_close_every),
        ]
        for name, seconds in (
            ("nginx", min(s.soak_seconds, s.soak_baseline_seconds)),
            ("lgmt", s.soak_seconds),
        ):
            self.check_alive()
            target = self.targets[name]
            interval = max(1.0, seconds / 60)
            time.sleep(0.5)
            self.log.mark()
            cpu0 = target.cpu()
            t0 = time.monotonic()
            proc, cmd = b.wrk_popen(
                target.url,
                connections=s.soak_connections,
                seconds=seconds,
                script="soak.lua",
                args=args,
            )
            samples: list[dict[str, float]] = []
            while proc.poll() is None:
                samples.append(
                    {
                        "t": time.monotonic() - t0,
                        "rss_kib": target.rss_kib(),
                        "fds": target.fds(),
                        "cpu_s": target.cpu() - cpu0,
                    }
                )
                deadline = time.monotonic() + interval
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
            stdout, stderr = proc.communicate()
            cpu = target.cpu() - cpu0
            time.sleep(0.3)
            seen = self.log.window(name, 0)
            result = b.parse_wrk(stdout, stderr, cmd)
            row = soak_analysis(samples)
            row.update(
                seconds=seconds,
                requests=result["requests"],
                rps=result["requests"] / (result["duration_us"] / 1e6),
                cpu_us_per_request=cpu * 1e6 / result["requests"]
                if result["requests"]
                else math.nan,
                p99_ms=result["p99_us"] / 1000,
                non2xx=result["non2xx"],
                socket_errors=result["errors"],
                samples=samples,
                **seen,
            )
            out["summary"][name] = row
            log(
                f"soak {name:6}: {row['requests']} requests, RSS {row['rss_first_mib']:.1f} -> "
                f"{row['rss_last_mib']:.1f} MiB (growth {row['rss_growth_mib']:+.2f}), fds "
                f"{row['fds_first']} -> {row['fds_last']} (growth {row['fd_growth']:+.1f}), "
                f"cpu {row['cpu_us_per_request']:.1f} us/req, non-2xx {row['non2xx']}"
            )
        return out

    def run(self, only: list[str]) -> dict[str, Any]:
        for workload in WORKLOADS:
            if workload not in only:
                continue
            if workload == "soak" and self.s.soak_seconds <= 0:
                continue
            started = time.monotonic()
            self.results[workload] = getattr(self, workload)()
            self.results[workload]["wall_seconds"] = round(time.monotonic() - started, 1)
        return self.results


# -- figures -------------------------------------------------------------------------

_SUMMED = {
    "non2xx",
    "wrk_non2xx_line",
    "socket_errors",
    "bad_credentials",
    "pushes_not_read_whole",
    "pushes_cut_by_client",
    "upstream_new_connections",
    "requests",
    "upstream_requests",
}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per target: the median of each figure over the rounds (counts summed)."""
    summary: dict[str, dict[str, float]] = {}
    for name, target_runs in runs.items():
        keys = [k for k in target_runs[0] if isinstance(target_runs[0][k], int | float)]
        row: dict[str, float] = {}
        for key in keys:
            values = [run[key] for run in target_runs]
            row[key] = sum(values) if key in _SUMMED else b.median(values)
        row["upstream_connections_max"] = max(r["upstream_connections"] for r in target_runs)
        summary[name] = row
    return summary


def soak_analysis(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Growth of RSS and open fds over the soak, after a warm-up (the first
    fifth of the samples): median of the last third minus median of the first
    third, and the least-squares slope per minute."""
    if len(samples) < 4:
        return {
            "rss_first_mib": math.nan,
            "rss_last_mib": math.nan,
            "rss_growth_mib": math.nan,
            "rss_slope_kib_per_min": math.nan,
            "fds_first": math.nan,
            "fds_last": math.nan,
            "fd_growth": math.nan,
            "grows": None,
        }
    steady = samples[len(samples) // 5 :]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    rss_first = b.median([x["rss_kib"] for x in first]) / 1024
    rss_last = b.median([x["rss_kib"] for x in last]) / 1024
    fds_first = b.median([x["fds"] for x in first])
    fds_last = b.median([x["fds"] for x in last])
    rss_growth = rss_last - rss_first
    fd_growth = fds_last - fds_first
    slope = b.slope_per_minute([(x["t"], x["rss_kib"]) for x in steady])
    return {
        "rss_first_mib": rss_first,
        "rss_last_mib": rss_last,
        "rss_max_mib": max(x["rss_kib"] for x in samples) / 1024,
        "rss_growth_mib": rss_growth,
        "rss_slope_kib_per_min": slope,
        "fds_first": fds_first,
        "fds_last": fds_last,
        "fds_max": max(x["fds"] for x in samples),
        "fd_growth": fd_growth,
        # "Growth": more than 2 MiB of RSS or 2 fds between the first and the
        # last third of the steady part.
        "grows": rss_growth > 2.0 or fd_growth > 2,
    }


def conns(row: dict[str, float]) -> str:
    """Connection reuse: connections a run used, those opened during all
    measured rounds, and upstream requests per connection opened."""
    opened = int(row["upstream_new_connections"])
    per = f"{row['upstream_requests'] / opened:,.0f}" if opened else "all reused"
    return f"{fmt(row['upstream_connections'], 0)} / {opened} ({per})"


def latency_row(n: dict[str, float], lg: dict[str, float]) -> list[str]:
    """The p50 / p99 row of a workload: nginx, lgmt-proxy and their ratios."""
    return [
        "",
        "latency p50 / p99 (ms)",
        "",
        f"{fmt(n['p50_ms'], 2)} / {fmt(n['p99_ms'], 2)}",
        f"{fmt(lg['p50_ms'], 2)} / {fmt(lg['p99_ms'], 2)}",
        f"{fx(ratio(lg['p50_ms'], n['p50_ms']))} / {fx(ratio(lg['p99_ms'], n['p99_ms']))}",
        "",
        "",
    ]


def conns_row(n: dict[str, float], lg: dict[str, float]) -> list[str]:
    """The upstream-connection reuse row of a workload."""
    return [
        "",
        "upstream conns used per run / opened while measured (requests per opened)",
        "",
        conns(n),
        conns(lg),
        "",
        "",
        "",
    ]


def ratio(a: float, b_: float) -> float:
    if not b_ or math.isnan(a) or math.isnan(b_):
        return math.nan
    return a / b_


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fx(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**MISSED**")


def evaluate(results: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]], list[str]]:
    """The results table rows, the target checks, and the figures that are missing."""
    rows: list[list[str]] = []
    checks: list[dict[str, Any]] = []
    missing: list[str] = []

    def check(name: str, value: float, limit: float, unit: str, below: bool = True) -> str:
        ok = None if math.isnan(value) else (value <= limit if below else value >= limit)
        checks.append({"target": name, "value": value, "limit": limit, "unit": unit, "ok": ok})
        if ok is None:
            missing.append(name)
        return verdict(ok)

    def need(name: str, *values: float) -> None:
        for v in values:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                missing.append(name)
                return

    non2xx_total = 0
    errors_total = 0
    bad_total = 0

    if "get50" in results:
        s = results["get50"]["summary"]
        n, lg = s["nginx"], s["lgmt"]
        c = results["get50"]["connections"]
        r = ratio(lg["cpu_us_per_request"], n["cpu_us_per_request"])
        need("get50", n["cpu_us_per_request"], lg["cpu_us_per_request"], n["rps"], lg["rps"])
        rows += [
            [
                f"small GET, {c} conns",
                "CPU per request (µs)",
                "",
                fmt(n["cpu_us_per_request"]),
                fmt(lg["cpu_us_per_request"]),
                fx(r),
                "≤ 5x",
                check("get50 CPU/request ≤ 5x nginx", r, 5, "x"),
            ],
            [
                "",
                "throughput (req/s)",
                "",
                fmt(n["rps"], 0),
                fmt(lg["rps"], 0),
                fx(ratio(lg["rps"], n["rps"])),
                "",
                "",
            ],
            latency_row(n, lg),
            ["", "CPU used (cores)", "", fmt(n["cores"], 2), fmt(lg["cores"], 2), "", "", ""],
            conns_row(n, lg),
        ]
        for t in (n, lg):
            non2xx_total += int(t["non2xx"])
            errors_total += int(t["socket_errors"])
            bad_total += int(t["bad_credentials"])

    if "get1" in results:
        s = results["get1"]["summary"]
        d, n, lg = s["direct"], s["nginx"], s["lgmt"]
        need("get1", d["p50_ms"], n["p50_ms"], lg["p50_ms"])
        rows += [
            [
                "small GET, 1 conn",
                "latency p50 (ms)",
                fmt(d["p50_ms"], 3),
                fmt(n["p50_ms"], 3),
                fmt(lg["p50_ms"], 3),
                fx(ratio(lg["p50_ms"], n["p50_ms"])),
                "",
                "",
            ],
            [
                "",
                "added p50 over direct (ms)",
                "",
                fmt(n["added_p50_ms"], 3),
                fmt(lg["added_p50_ms"], 3),
                fx(ratio(lg["added_p50_ms"], n["added_p50_ms"])),
                "≤ 2.5x",
                check(
                    "get1 added p50 ≤ 2.5x nginx's",
                    ratio(lg["added_p50_ms"], n["added_p50_ms"]),
                    2.5,
                    "x",
                ),
            ],
            [
                "",
                "latency p99 (ms)",
                fmt(d["p99_ms"], 3),
                fmt(n["p99_ms"], 3),
                fmt(lg["p99_ms"], 3),
                fx(ratio(lg["p99_ms"], n["p99_ms"])),
                "",
                "",
            ],
            [
                "",
                "CPU per request (µs)",
                "",
                fmt(n["cpu_us_per_request"]),
                fmt(lg["cpu_us_per_request"]),
                fx(ratio(lg["cpu_us_per_request"], n["cpu_us_per_request"])),
                "",
                "",
            ],
            conns_row(n, lg),
        ]
        for t in (d, n, lg):
            non2xx_total += int(t["non2xx"])
            errors_total += int(t["socket_errors"])
        bad_total += int(n["bad_credentials"]) + int(lg["bad_credentials"])

    if "push" in results:
        p = results["push"]
        s = p["summary"]
        n, lg = s["nginx"], s["lgmt"]
        size = p["body_bytes"]
        r = ratio(lg["cpu_us_per_mib"], n["cpu_us_per_mib"])
        need("push", n["cpu_us_per_mib"], lg["cpu_us_per_mib"])
        label = f"{size // MiB} MiB push" if size % MiB == 0 else f"{size // 1024} KiB push"
        rows += [
            [
                f"{label}, {p['connections']} conns",
                "CPU per MiB (µs)",
                "",
                fmt(n["cpu_us_per_mib"], 0),
                fmt(lg["cpu_us_per_mib"], 0),
                fx(r),
                "≤ 1.5x",
                check("push CPU/MiB ≤ 1.5x nginx", r, 1.5, "x"),
            ],
            [
                "",
                "throughput (MiB/s)",
                "",
                fmt(n["mib_per_s"], 0),
                fmt(lg["mib_per_s"], 0),
                fx(ratio(lg["mib_per_s"], n["mib_per_s"])),
                "",
                "",
            ],
            latency_row(n, lg),
            conns_row(n, lg),
            [
                "",
                "pushes not read whole by the upstream",
                "",
                fmt(n["pushes_not_read_whole"], 0),
                fmt(lg["pushes_not_read_whole"], 0),
                "",
                "0",
                "",
            ],
        ]
        for t in (n, lg):
            non2xx_total += int(t["non2xx"])
            errors_total += int(t["socket_errors"])
            bad_total += int(t["bad_credentials"]) + int(t["pushes_not_read_whole"])

    if "big" in results:
        bg = results["big"]
        s = bg["summary"]
        mib = bg["bytes"] // MiB
        rate = bg.get("read_rate", 0) // MiB
        for direction, word in (
            ("up", "up (POST)"),
            ("down", f"down (GET, read at ≤ {rate} MiB/s)"),
        ):
            n, lg = s["nginx"][direction], s["lgmt"][direction]
            need("big", n["extra_peak_mib"], lg["extra_peak_mib"])
            rows += [
                [
                    f"{mib} MiB {word}",
                    "extra peak RSS (MiB)",
                    "",
                    fmt(n["extra_peak_mib"]),
                    fmt(lg["extra_peak_mib"]),
                    fx(ratio(lg["extra_peak_mib"], n["extra_peak_mib"])),
                    "< 64 MiB",
                    check(
                        f"{mib} MiB {direction}: extra RSS < 64 MiB",
                        lg["extra_peak_mib"],
                        64,
                        "MiB",
                    ),
                ],
                [
                    "",
                    "throughput (MiB/s) / CPU per MiB (µs)",
                    "",
                    f"{fmt(n['mib_per_s'], 0)} / {fmt(n['cpu_us_per_mib'], 0)}",
                    f"{fmt(lg['mib_per_s'], 0)} / {fmt(lg['cpu_us_per_mib'], 0)}",
                    f"{fx(ratio(lg['mib_per_s'], n['mib_per_s']))} / {fx(ratio(lg['cpu_us_per_mib'], n['cpu_us_per_mib']))}",
                    "",
                    "",
                ],
            ]
            for t in (n, lg):
                if not t["ok"]:
                    non2xx_total += 1
                bad_total += int(t["bad_credentials"])

    if "idle" in results:
        s = results["idle"]["summary"]
        n, lg = s["nginx"], s["lgmt"]
        c = results["idle"]["connections"]
        need("idle", n["kib_per_connection"], lg["kib_per_connection"])
        rows += [
            [
                f"{c:,} idle keep-alive conns",
                "RSS per connection (KiB)",
                "",
                fmt(n["kib_per_connection"]),
                fmt(lg["kib_per_connection"]),
                fx(ratio(lg["kib_per_connection"], n["kib_per_connection"])),
                "",
                "",
            ],
            [
                "",
                "RSS before / open / after close (MiB)",
                "",
                f"{fmt(n['rss_before_mib'])} / {fmt(n['rss_open_mib'])} / {fmt(n['rss_after_close_mib'])}",
                f"{fmt(lg['rss_before_mib'])} / {fmt(lg['rss_open_mib'])} / {fmt(lg['rss_after_close_mib'])}",
                "",
                "",
                "",
            ],
            [
                "",
                "open fds before / open / after close",
                "",
                f"{n['fds_before']} / {n['fds_open']} / {n['fds_after_close']}",
                f"{lg['fds_before']} / {lg['fds_open']} / {lg['fds_after_close']}",
                "",
                "",
                "",
            ],
        ]
        non2xx_total += int(n["non2xx"]) + int(lg["non2xx"])

    if "soak" in results:
        sk = results["soak"]
        s = sk["summary"]
        n, lg = s["nginx"], s["lgmt"]
        need("soak", lg["rss_growth_mib"], lg["cpu_us_per_request"])
        grows = lg["grows"]
        ok = None if grows is None else not grows
        checks.append(
            {
                "target": "soak: no RSS/fd growth",
                "value": lg["rss_growth_mib"],
                "limit": 2.0,
                "unit": "MiB",
                "ok": ok,
            }
        )
        rows += [
            [
                f"soak ({lg['seconds']} s lgmt, {n['seconds']} s nginx)",
                "requests / req/s",
                "",
                f"{fmt(n['requests'], 0)} / {fmt(n['rps'], 0)}",
                f"{fmt(lg['requests'], 0)} / {fmt(lg['rps'], 0)}",
                "",
                "",
                "",
            ],
            [
                "",
                "CPU per request (µs)",
                "",
                fmt(n["cpu_us_per_request"]),
                fmt(lg["cpu_us_per_request"]),
                fx(ratio(lg["cpu_us_per_request"], n["cpu_us_per_request"])),
                "",
                "",
            ],
            [
                "",
                "RSS first → last third (MiB), slope (KiB/min)",
                "",
                f"{fmt(n['rss_first_mib'])} → {fmt(n['rss_last_mib'])}, {fmt(n['rss_slope_kib_per_min'], 0)}",
                f"{fmt(lg['rss_first_mib'])} → {fmt(lg['rss_last_mib'])}, {fmt(lg['rss_slope_kib_per_min'], 0)}",
                "",
                "no growth",
                verdict(ok),
            ],
            [
                "",
                "open fds first → last third",
                "",
                f"{fmt(n['fds_first'], 0)} → {fmt(n['fds_last'], 0)}",
                f"{fmt(lg['fds_first'], 0)} → {fmt(lg['fds_last'], 0)}",
                "",
                "no growth",
                "",
            ],
        ]
        for t in (n, lg):
            non2xx_total += int(t["non2xx"])
            errors_total += int(t["socket_errors"])
            bad_total += int(t["bad_credentials"])

    rows.append(
        ["all", "non-2xx answers / socket errors / bad upstream requests", "", "", "", "", "0", ""]
    )
    rows[-1][4] = f"{non2xx_total} / {errors_total} / {bad_total}"
    rows[-1][7] = check("zero non-2xx", float(non2xx_total), 0, "answers")
    return rows, checks, missing


def compare_lines(results: dict[str, Any]) -> list[str]:
    """A/B of the build given by --compare-twistd (B) against lgmt-proxy (A)."""
    lines = []
    figures = {
        "get50": ["cpu_us_per_request", "rps", "p50_ms", "p99_ms"],
        "get1": ["cpu_us_per_request", "added_p50_ms", "p99_ms"],
        "push": ["cpu_us_per_mib", "mib_per_s", "p50_ms"],
    }
    for workload, keys in figures.items():
        summary = results.get(workload, {}).get("summary", {})
        if "lgmt_b" not in summary:
            continue
        a, b_ = summary["lgmt"], summary["lgmt_b"]
        for key in keys:
            lines.append(
                f"  A/B {workload:6} {key:20} A {fmt(a[key], 3):>10}  B {fmt(b_[key], 3):>10}  "
                f"B/A {fx(ratio(b_[key], a[key]))}"
            )
    for workload in ("big", "idle"):
        summary = results.get(workload, {}).get("summary", {})
        if "lgmt_b" not in summary:
            continue
        if workload == "big":
            for d in ("up", "down"):
                a, b_ = summary["lgmt"][d], summary["lgmt_b"][d]
                lines.append(
                    f"  A/B big {d:4} extra peak MiB A {fmt(a['extra_peak_mib'], 1)} "
                    f"B {fmt(b_['extra_peak_mib'], 1)}; CPU per MiB A {fmt(a['cpu_us_per_mib'], 0)} "
                    f"B {fmt(b_['cpu_us_per_mib'], 0)}"
                )
        else:
            a, b_ = summary["lgmt"], summary["lgmt_b"]
            lines.append(
                f"  A/B idle KiB per connection A {fmt(a['kib_per_connection'], 2)} "
                f"B {fmt(b_['kib_per_connection'], 2)}"
            )
    return lines


def markdown(results: dict[str, Any], meta: dict[str, Any], rows: list[list[str]]) -> str:
    m = meta["machine"]
    lines = [
        f"Run {meta['date']} on {m['nproc']} x {m['cpu_model']} ({m['mem_gib']} GiB, "
        f"Linux {m['kernel']}), nginx {m['versions'].get('nginx', '?')}, "
        f"wrk {m['versions'].get('wrk', '?')}, lgmt-proxy at {meta['git']}.",
        f"Command: `{meta['command']}`; {meta['rounds']} alternating rounds of "
        f"{meta['seconds']} s per workload; medians of the rounds.",
        "",
        "| workload | figure | direct | nginx proxy | lgmt-proxy | lgmt / nginx | target | |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def git_describe() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(b.ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return "unknown"


def update_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else ""
    block = f"{START_MARK}\n{table}{END_MARK}"
    if START_MARK in text and END_MARK in text:
        text = re.sub(
            re.escape(START_MARK) + r".*?" + re.escape(END_MARK), lambda _: block, text, flags=re.S
        )
    else:
        text += f"\n## Results\n\n{block}\n"
    DOCS.write_text(text)
    log(f"wrote the results into {DOCS}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: a few seconds per workload, small sizes, no soak",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="WORKLOAD",
        help=f"run only these workloads (repeatable or comma-separated): {', '.join(WORKLOADS)}",
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
    p.add_argument("--twistd", help="twistd with lgmt-proxy installed (default .venv/bin/twistd)")
    p.add_argument(
        "--compare-twistd",
        metavar="TWISTD",
        help="also run this lgmt-proxy build (another venv's twistd, or a wrapper) "
        "in the same rounds, and print it against the first (A/B)",
    )
    p.add_argument(
        "--compare-experiment",
        metavar="NAME[,NAME]",
        help="compare with lgmt-proxy plus these bench/experiments/ modules "
        "(e.g. turn_flush,pool_lifo), run as B",
    )
    p.add_argument("--workdir", help="where configs and logs go (default: a new temp dir, removed)")
    p.add_argument("--json", help="also write the results here (always: bench/results/latest.json)")
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the results table in docs/performance.md",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    wall0 = time.monotonic()
    s = Settings.quick_settings() if args.quick else Settings()
    if args.soak_seconds is not None:
        s.soak_seconds = args.soak_seconds
    if args.rounds:
        s.rounds = args.rounds
    if args.seconds:
        s.seconds = args.seconds
    if args.big_mib:
        s.big_bytes = args.big_mib * MiB
    if args.idle_connections:
        s.idle_connections = args.idle_connections
    only = [w for item in args.only for w in item.split(",") if w] or list(WORKLOADS)
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        print(
            f"bench: unknown workload {', '.join(unknown)}; one of {', '.join(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2

    twistd = args.twistd or str(b.ROOT / ".venv" / "bin" / "twistd")
    if not Path(twistd).exists():
        found = shutil.which("twistd")
        if found is None:
            print("bench: no twistd: run `make venv` first (or pass --twistd)", file=sys.stderr)
            return 2
        twistd = found
    b.ensure_tools()
    limit = b.raise_fd_limit()
    if limit < s.idle_connections + 200:
        log(f"open-file limit is {limit}: idle connections cut to {limit - 200}")
        s.idle_connections = max(10, limit - 200)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lgmt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    compare: str | list[str] | None = args.compare_twistd
    if args.compare_experiment:
        python = str(Path(twistd).parent / "python")
        names = [n for n in args.compare_experiment.split(",") if n]
        compare = [python, str(b.BENCH / "experiments" / "run_with.py"), *names, "--"]
    bench = Bench(s, workdir, twistd, compare)
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
        log(f"FAILED: {type(e).__name__}: {e}")
        log(f"logs kept in {workdir}")
        bench.stop()
        return 1
    bench.stop()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()
    if git_describe() != meta["git"]:
        meta["git_end"] = git_describe()
        log(f"the working tree changed during the run: {meta['git']} -> {meta['git_end']}")
    meta["wall_seconds"] = round(time.monotonic() - wall0, 1)

    rows, checks, missing = evaluate(results)
    table = markdown(results, meta, rows)
    print()
    print(table)
    for c in checks:
        print(
            f"  target {c['target']}: {fmt(c['value'], 3)} -> {'n/a' if c['ok'] is None else ('met' if c['ok'] else 'MISSED')}"
        )
    for line in compare_lines(results):
        print(line)
    print(f"  wall time {meta['wall_seconds']} s")

    RESULTS.mkdir(exist_ok=True)
    payload = {"meta": meta, "results": results, "checks": checks, "table": table}
    for path in [RESULTS / "latest.json", *([Path(args.json)] if args.json else [])]:
        path.write_text(json.dumps(payload, indent=1, default=str))
    (RESULTS / "latest.md").write_text(table)
    if args.update_docs:
        update_docs(table)

    if missing:
        print(f"bench: figures missing: {', '.join(sorted(set(missing)))}", file=sys.stderr)
        return 1
    if args.strict and any(c["ok"] is False for c in checks):
        print("bench: targets missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
