#!/usr/bin/env python3
"""Benchmark lgmt-proxy against nginx doing the same job, in one run.

    python3 bench/run.py                      full run (about 9 min + the soak)
    python3 bench/run.py --soak-seconds 120   shorter soak
    python3 bench/run.py --quick              CI smoke: seconds per workload, small sizes, no soak
    python3 bench/run.py --only get50,auth    some workloads
    python3 bench/run.py --only gzip --quick   compressed egress alone
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b  # re-executes under .venv/bin/python when psutil is missing
import egress
from benchlib import MiB, log

#: The workloads run again with the upstream answering over HTTPS (as Grafana
#: Cloud does): the same method, fresh proxies that talk TLS to the upstream.
TLS_WORKLOADS = {"tls_get50": "get50", "tls_get1": "get1", "tls_push": "push", "tls_big": "big"}
WORKLOADS = (
    "get50", "auth", "budgets", "get1", "push", "gzip", "grpc", "big", *TLS_WORKLOADS, "idle", "soak"
)  # fmt: skip
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
    gzip_bytes: int = MiB  # each OTLP body of the gzip workload
    grpc_bytes: int = 256 * 1024  # one OTLP trace export (~770 spans of tests/support/otlp_bodies)
    grpc_connections: int = 8
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
    #: --pin: each proxy on the first CPU, wrk and the upstream on the second.
    pin: bool = False

    @classmethod
    def quick(cls) -> Settings:
        return cls(1, 2, 1, big_bytes=32 * MiB, idle_connections=200, soak_seconds=0, settle=0.5)


# -- one bench run -------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, workdir: Path, twistd: str, compare: str | None) -> None:
        self.s, self.workdir, self.twistd, self.compare = s, workdir, twistd, compare
        self.targets: dict[str, b.Target] = {}
        #: The interpreter running bench/grpcio_client.py ("": none has grpcio).
        self.grpcio_client = ""
        #: Each target's last warm-up run (requests that counted for nothing).
        self.warmed: dict[str, dict[str, Any]] = {}
        port, sink_port, big = b.free_port(), b.free_port(), workdir / "big.bin"
        self.tls_files, self.tls_port, self.tls = b.make_tls(workdir / "tls"), b.free_port(), False
        conf = b.upstream_conf(
            workdir / "upstream", port, sink_port, big, self.tls_files, self.tls_port
        )
        self.upstream = b.Nginx("upstream", "upstream (nginx)", workdir, conf, port, "/health")
        self.log = b.UpstreamLog(self.upstream.prefix / "access.log")

    def start(self) -> None:
        with open(self.workdir / "big.bin", "wb") as f:
            f.truncate(self.s.big_bytes)  # sparse: costs no disk
        self.upstream.start()  # stopped by `stop` even if what follows fails
        if self.s.pin:
            b.place(self.upstream, 1)
            b.WRK_CPU[:] = [1]
        self.targets["direct"] = b.Direct(self.upstream.url)
        self.start_proxies()

    def start_proxies(self) -> None:
        """nginx, lgmt-proxy and the --compare-twistd build, each known to
        `stop` as soon as it is started so a failure leaves nothing running."""
        port, ca = b.free_port(), self.tls_files.ca if self.tls else None
        upstream_port = self.tls_port if self.tls else self.upstream.port
        conf = b.nginx_proxy_conf(self.workdir / "nginx", port, upstream_port, ca=ca)
        self.add(b.Nginx("nginx", "nginx proxy", self.workdir, conf, port, "/ready"))
        self.add(self.lgmt("lgmt"))
        if self.compare:
            self.add(self.lgmt("lgmt_b", self.compare))
        log(", ".join(f"{t.label} {t.url}" for t in self.targets.values()))

    def lgmt(self, name: str, twistd: str = "", **env: str) -> b.LgmtProxy:
        upstream = self.upstream.url
        if self.tls:
            upstream = f"https://127.0.0.1:{self.tls_port}"
            env = {"UPSTREAM_CA_FILE": str(self.tls_files.ca), **env}
        return b.LgmtProxy(self.workdir, twistd or self.twistd, upstream, name, **env)

    def over_tls(self, workload: str) -> dict[str, Any]:
        """``workload`` again through fresh proxies whose upstream is HTTPS;
        the direct target (get1's baseline) stays the plain upstream."""
        self.tls = True
        try:
            self.restart_proxies()
            return dict(getattr(self, workload)())
        finally:
            self.tls = False
            self.restart_proxies()

    def tls_get50(self) -> dict[str, Any]:
        return self.over_tls("get50")

    def tls_get1(self) -> dict[str, Any]:
        return self.over_tls("get1")

    def tls_push(self) -> dict[str, Any]:
        return self.over_tls("push")

    def tls_big(self) -> dict[str, Any]:
        return self.over_tls("big")

    def add(self, target: b.Target) -> None:
        self.targets[target.name] = target
        target.start()
        if self.s.pin and isinstance(target, b.Nginx | b.LgmtProxy):
            b.place(target, 0)

    def fresh_proxies(self) -> None:
        """New proxy processes, warmed up with a little of every kind of
        request: memory figures then do not depend on what ran before."""
        self.restart_proxies()
        for name in self.proxies():
            b.big_transfer(self.targets[name].port, "up", MiB, 0)
            with b.idle_connections(self.targets[name].port, 20):
                pass
        time.sleep(0.5)

    def restart_proxies(self) -> None:
        for name in self.proxies():
            self.targets.pop(name).stop()
        self.start_proxies()

    def stop(self) -> None:
        for target in [*self.targets.values(), self.upstream]:
            target.stop()

    def one_by_one(self, names: list[str]) -> Iterator[tuple[str, b.Target]]:
        """Each target in turn, checked alive and given half a second to settle."""
        for name in names:
            self.check_alive()
            time.sleep(0.5)
            yield name, self.targets[name]

    def proxies(self) -> list[str]:
        return [n for n in ("nginx", "lgmt", "lgmt_b") if n in self.targets]

    def check_alive(self) -> None:
        for t in self.targets.values():
            if not t.alive():
                raise RuntimeError(f"{t.label} exited with {t.proc and t.proc.returncode}")

    def measured(self, name: str, conns: int, seconds: int, path: str, **kw: Any) -> dict[str, Any]:
        """One wrk run against a target: its latency, its CPU, and what the
        upstream saw during it (``kw``: wrk's ``args`` and ``opts``, ``min_body``)."""
        self.check_alive()
        target, min_body = self.targets[name], kw.pop("min_body", 0)
        time.sleep(0.2)  # let the previous run's tail settle
        self.log.mark()
        machine0, upstream0 = b.machine_cpu(), self.upstream.cpu()
        cpu0, t0 = target.cpu(), time.monotonic()
        r = b.wrk(target.url + path, conns, seconds, **kw)
        elapsed, cpu = time.monotonic() - t0, target.cpu() - cpu0
        machine = {k: v - machine0[k] for k, v in b.machine_cpu().items()}
        upstream = self.upstream.cpu() - upstream0
        time.sleep(0.3)  # requests cut by wrk's stop reach the upstream's log
        return {
            **{k: r[k] for k in ("requests", "non2xx", "socket_errors")},
            "rps": r["requests"] / (r["duration_us"] / 1e6),
            **{f"p{p}_ms": r[f"p{p}_us"] / 1000 for p in (50, 90, 99)},
            "cpu_s": cpu,
            "cores": cpu / elapsed,
            "cpu_us_per_request": cpu * 1e6 / r["requests"] if r["requests"] else math.nan,
            # How busy the machine was besides this run's own processes (the
            # target, the upstream, wrk): other work on the shared cores.
            "others_cores": max(machine["busy"] - cpu - upstream - machine["children"], 0.0)
            / elapsed,
            "softirq_cores": machine["softirq"] / elapsed,
            "steal_cores": machine["steal"] / elapsed,
            **self.log.window(name, min_body),
        }

    def rounds(self, workload: str, names: list[str], conns: int, path: str, **kw: Any) -> Runs:
        """A warm-up run per target (pools filled, nothing kept), then
        alternating measured rounds (order flipped every round)."""
        for name in names:
            self.warmed[name] = self.measured(name, conns, self.s.warmup, path, **kw)
        runs: Runs = {n: [] for n in names}
        for r in range(self.s.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                runs[name].append(run := self.measured(name, conns, self.s.seconds, path, **kw))
                note(f"{workload} round {r + 1}/{self.s.rounds} {name}", run)
        return runs

    # -- workloads: each returns {"summary": {target: figures}, "runs"?, labels...} --

    def get50(self) -> dict[str, Any]:
        runs = self.rounds("get50", self.proxies(), self.s.get_connections, b.GET_PATH)
        return {"connections": self.s.get_connections, "runs": runs, "summary": summarize(runs)}

    def auth(self) -> dict[str, Any]:
        """get50 through a proxy whose CLIENT_AUTH_FILE lists N consumers,
        with the last one's Bearer token, in the same rounds as lgmt-proxy
        without client auth: does authentication cost grow with consumers?"""
        n, c, path = self.s.auth_consumers, self.s.get_connections, self.workdir / "consumers.yaml"
        header = f"Authorization: Bearer {b.client_auth_file(path, n)}"
        self.add(self.lgmt("lgmt_auth", CLIENT_AUTH_FILE=str(path)))
        try:
            runs = self.rounds(
                "auth", ["nginx", "lgmt", "lgmt_auth"], c, b.GET_PATH, opts=["-H", header]
            )
        finally:
            self.targets.pop("lgmt_auth").stop()
        summary = summarize(runs)
        on, off = summary["lgmt_auth"], summary["lgmt"]
        on["no_auth_cpu_us_per_request"] = off["cpu_us_per_request"]
        # Refused requests cost less than authenticated ones: no figure then.
        ok = on["non2xx"] == 0 and on["upstream_requests"] > 0
        on["auth_cost"] = (
            ratio(on["cpu_us_per_request"], off["cpu_us_per_request"]) if ok else math.nan
        )
        return {"connections": c, "consumers": n, "runs": runs, "summary": summary}

    def budgets(self) -> dict[str, Any]:
        """get50 through a proxy whose one consumer has request and byte
        budgets shared through a real redis-server (RATE_LIMIT_REDIS_URL),
        never exhausted, in the same rounds as lgmt-proxy without client
        auth: what a shared budget decision costs, and Redis commands per
        request. With --compare-twistd, build B's pair too (its own
        redis-server), in the same rounds."""
        c, path = self.s.get_connections, self.workdir / "budget-consumer.yaml"
        header = f"Authorization: Bearer {b.budget_auth_file(path)}"
        builds = [("", self.twistd, "lgmt")]
        if self.compare:
            builds.append(("_b", self.compare, "lgmt_b"))
        redis: dict[str, b.Redis] = {}
        names = ["nginx"]
        try:
            for suffix, twistd, plain in builds:
                redis[suffix] = b.Redis(self.workdir / f"budgets{suffix}")
                redis[suffix].start()
                env = {"CLIENT_AUTH_FILE": str(path), "RATE_LIMIT_REDIS_URL": redis[suffix].url}
                self.add(self.lgmt(f"lgmt_budget{suffix}", twistd, **env))
                names += [plain, f"lgmt_budget{suffix}"]
            before = {k: r.commands() for k, r in redis.items()}
            runs = self.rounds("budgets", names, c, b.GET_PATH, opts=["-H", header])
            commands = {k: r.commands() - before[k] for k, r in redis.items()}
        finally:
            for suffix, _, _ in builds:
                if f"lgmt_budget{suffix}" in self.targets:
                    self.targets.pop(f"lgmt_budget{suffix}").stop()
            for r in redis.values():
                r.stop()
        summary = summarize(runs)
        for suffix, _, plain in builds:
            on, off = summary[f"lgmt_budget{suffix}"], summary[plain]
            on["no_auth_cpu_us_per_request"] = off["cpu_us_per_request"]
            # Warm-up and measured runs together: every request it got.
            total = self.warmed[f"lgmt_budget{suffix}"]["requests"]
            total += sum(r["requests"] for r in runs[f"lgmt_budget{suffix}"])
            on["redis_commands_per_request"] = commands[suffix] / total if total else math.nan
            ok = on["non2xx"] == 0 and on["upstream_requests"] > 0
            on["budget_cost"] = (
                ratio(on["cpu_us_per_request"], off["cpu_us_per_request"]) if ok else math.nan
            )
        return {"connections": c, "runs": runs, "summary": summary}

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
            "push", self.proxies(), conns, b.PUSH_PATH, args=[str(size), "1"], min_body=size
        )
        for run in (run for target_runs in runs.values() for run in target_runs):
            run["cpu_us_per_mib"] = run["cpu_us_per_request"] * MiB / size
            run["mib_per_s"] = run["rps"] * size / MiB
        label = f"{size // MiB} MiB" if size % MiB == 0 else f"{size // 1024} KiB"
        return {"size": label, "connections": conns, "runs": runs, "summary": summarize(runs)}

    def gzip(self) -> dict[str, Any]:
        """OTLP trace pushes (a JSON and a protobuf body, generated) on one
        connection through lgmt-proxy as it is and through one with
        UPSTREAM_COMPRESSION=gzip, alternating rounds: the bytes sent
        upstream per byte received (the proxy's own counters) and the CPU per
        MiB received, with and without compression."""
        self.add(self.lgmt("lgmt_gzip", UPSTREAM_COMPRESSION="gzip"))
        names, summary = ["lgmt", "lgmt_gzip"], {}
        try:
            runs: Runs = {n: [] for n in names}
            for kind, body in egress.bodies(self.s.gzip_bytes).items():
                for name in names:  # warm-up, nothing kept
                    egress.push_for(self.targets[name].port, kind, body, self.s.warmup)
                for r in range(self.s.rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        runs[name].append(self.gzip_run(name, kind, body))
            for name in names:
                row: dict[str, Any] = {"non2xx": sum(x["non2xx"] for x in runs[name])}
                for kind in egress.KINDS:
                    mine = [x for x in runs[name] if x["kind"] == kind]
                    for key in ("cpu_us_per_mib", "mib_per_s", "ratio"):
                        values = [x[key] for x in mine if not math.isnan(x[key])]
                        row[f"{kind}_{key}"] = statistics.median(values) if values else math.nan
                summary[name] = row
        finally:
            self.targets.pop("lgmt_gzip").stop()
        on, off = summary["lgmt_gzip"], summary["lgmt"]
        for kind in egress.KINDS:
            on[f"{kind}_saved_pct"] = 100 * (1 - on[f"{kind}_ratio"])
            on[f"{kind}_plain_cpu_us_per_mib"] = off[f"{kind}_cpu_us_per_mib"]
            on[f"{kind}_cpu_cost"] = ratio(
                on[f"{kind}_cpu_us_per_mib"], off[f"{kind}_cpu_us_per_mib"]
            )
        note("gzip lgmt_gzip", on)
        label = f"{self.s.gzip_bytes // 1024} KiB"
        return {"size": label, "runs": runs, "summary": summary}

    def gzip_run(self, name: str, kind: str, body: bytes) -> dict[str, Any]:
        """One measured run of the gzip workload against one target."""
        self.check_alive()
        target = self.targets[name]
        time.sleep(0.2)
        counted = egress.compression_bytes(target.url)
        cpu0 = target.cpu()
        r = egress.push_for(target.port, kind, body, self.s.seconds)
        cpu = target.cpu() - cpu0
        after = egress.compression_bytes(target.url)
        before = after["before"] - counted["before"]
        mib = r["bytes"] / MiB
        return note(f"gzip {kind} {name}", {
            "kind": kind,
            "requests": r["requests"],
            "non2xx": r["non2xx"],
            "mib_per_s": mib / r["seconds"],
            "cpu_us_per_mib": cpu * 1e6 / mib if mib else math.nan,
            # Bytes upstream per byte received (NaN without compression).
            "ratio": (after["after"] - counted["after"]) / before if before else math.nan,
        })  # fmt: skip

    def grpc(self) -> dict[str, Any]:
        """The same OTLP trace export to one lgmt-proxy (OTLP_GRPC_LISTEN on)
        over OTLP/HTTP (``POST /otlp/v1/traces``, HTTP/1.1) and over OTLP/gRPC
        (``TraceService/Export``, h2c), both sent by h2load, alternating in
        the same rounds: the proxy's CPU per MiB exported each way."""
        size, conns, port = self.s.grpc_bytes, self.s.grpc_connections, b.free_port()
        body, framed = self.workdir / "otlp.bin", self.workdir / "otlp.grpc"
        message = egress.bodies(size)["protobuf"]
        body.write_bytes(message)
        framed.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
        target = self.lgmt("lgmt_grpc", OTLP_GRPC_LISTEN=f"tcp:{port}:interface=127.0.0.1")
        self.add(target)
        ways = {
            "lgmt_http": (target.url + b.OTLP_PATH, body, ["content-type: application/x-protobuf"], True),
            "lgmt_grpc": (f"http://127.0.0.1:{port}{b.GRPC_EXPORT}", framed,
                          ["content-type: application/grpc", "te: trailers"], False),
        }  # fmt: skip
        self.grpcio_client = self.grpcio_python()
        if self.grpcio_client:  # gRPC's C core as well, when the build's venv has grpcio
            ways["lgmt_grpcio"] = (f"127.0.0.1:{port}", body, [], False)
        try:
            for way in ways:  # warm-up: pools filled, nothing kept
                self.exported(target, way, *ways[way], conns, self.s.warmup, len(message))
            runs: Runs = {way: [] for way in ways}
            for r in range(self.s.rounds):
                for way in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                    run = self.exported(
                        target, way, *ways[way], conns, self.s.seconds, len(message)
                    )
                    runs[way].append(note(f"grpc round {r + 1}/{self.s.rounds} {way}", run))
        finally:
            self.targets.pop("lgmt_grpc").stop()
        summary = summarize(runs)
        over_http = summary["lgmt_http"]
        for way in ("lgmt_grpc", "lgmt_grpcio"):
            over_grpc = summary.get(way)
            if over_grpc is None:
                continue
            over_grpc["http_cpu_us_per_mib"] = over_http["cpu_us_per_mib"]
            ok = over_grpc["non2xx"] == 0 and over_grpc["upstream_requests"] > 0
            over_grpc["grpc_cost"] = (
                ratio(over_grpc["cpu_us_per_mib"], over_http["cpu_us_per_mib"]) if ok else math.nan
            )
        label = f"{size // 1024} KiB"
        return {"size": label, "connections": conns, "runs": runs, "summary": summary}

    def exported(
        self, target: b.Target, way: str, url: str, body: Any, headers: list[str], h1: bool,
        conns: int, seconds: int, size: int,
    ) -> dict[str, Any]:  # fmt: skip
        """One h2load run of the grpc workload: the proxy's CPU and what the
        upstream received. A gRPC call refused by the proxy is still HTTP
        200 to h2load, so what counts as answered is what the upstream took."""
        self.check_alive()
        time.sleep(0.2)
        self.log.mark()
        cpu0 = target.cpu()
        if way == "lgmt_grpcio":
            r = self.grpcio(url, conns, seconds, body)
        else:
            r = b.h2load(url, conns, seconds, body, headers, h1=h1)
        cpu = target.cpu() - cpu0
        time.sleep(0.3)
        seen = self.log.window(way, size)
        failed = r["requests"] - r["ok"] + r["errors"]
        if not h1:  # the gRPC status is in trailers h2load does not read
            failed += max(0, r["ok"] - seen["upstream_requests"])
        n = r["requests"]
        return {
            "requests": n,
            "non2xx": failed,
            "socket_errors": 0,
            "rps": n / r["seconds"],
            "mean_ms": r["mean_ms"],
            "cpu_s": cpu,
            "cores": cpu / r["seconds"],
            "cpu_us_per_mib": cpu * 1e6 / (n * size / MiB) if n else math.nan,
            "mib_per_s": n * size / MiB / r["seconds"],
            **seen,
        }

    def grpcio_python(self) -> str:
        """The interpreter beside the measured build's twistd, if it has
        grpcio (the e2e set); "" otherwise (the grpcio way is left out)."""
        python = str(Path(self.twistd).with_name("python"))
        found = subprocess.run([python, "-c", "import grpc"], capture_output=True, check=False)
        return python if found.returncode == 0 else ""

    def grpcio(self, target: str, conns: int, seconds: int, body: Any) -> dict[str, Any]:
        """One run of bench/grpcio_client.py: h2load's figures' names."""
        client = Path(__file__).with_name("grpcio_client.py")
        cmd = [self.grpcio_client, str(client), target, str(conns), str(seconds), str(body)]
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=seconds + 60)
        r = json.loads(out.stdout.decode().strip().splitlines()[-1])
        return {**r, "errors": 0}

    def big(self) -> dict[str, Any]:
        """One big upload, then one download read at a bounded rate, through
        fresh proxies: the peak RSS above where each one started."""
        size, summary = self.s.big_bytes, {}
        self.fresh_proxies()
        for name, target in self.one_by_one(self.proxies()):
            row = {"non2xx": 0, "bad_credentials": 0}
            for way in ("up", "down"):
                time.sleep(0.5)
                before = max(target.rss_kib(), target.peak_kib(reset=True))
                self.log.mark()
                cpu0 = target.cpu()
                r = b.big_transfer(target.port, way, size, self.s.big_read_rate)
                cpu, peak = target.cpu() - cpu0, target.peak_kib()
                time.sleep(0.2)
                seen = self.log.window(name, size if way == "up" else 0)
                ok = r["status"] // 100 == 2 and r["bytes"] == size
                row["non2xx"] += not ok or seen["pushes_not_read_whole"] > 0
                row["bad_credentials"] += seen["bad_credentials"]
                row[f"{way}_extra_peak_mib"] = max(0, peak - before) / 1024
                row[f"{way}_mib_per_s"] = size / MiB / r["seconds"]
                row[f"{way}_cpu_us_per_mib"] = cpu * 1e6 / (size / MiB)
            summary[name] = note(f"big {name}", row)
        return {"mib": size // MiB, "rate": self.s.big_read_rate // MiB, "summary": summary}

    def idle(self) -> dict[str, Any]:
        """Idle keep-alive connections held open by fresh proxies: the RSS
        and fds each costs, and whether they come back after the close."""
        count, summary = self.s.idle_connections, {}
        self.fresh_proxies()
        for name, target in self.one_by_one(self.proxies()):
            row = target.usage("before")
            with b.idle_connections(target.port, count) as opened:
                time.sleep(self.s.settle)
                row |= target.usage("open")
            time.sleep(self.s.settle)
            row |= target.usage("after")
            row["kib_per_connection"] = (row["rss_open_mib"] - row["rss_before_mib"]) * 1024 / count
            row["non2xx"] = opened["non2xx"] + count - opened["opened"]
            summary[name] = note(f"idle {name}", row)
        return {"connections": count, "summary": summary}

    def soak(self) -> dict[str, Any]:
        """Paced mixed load for a long time, RSS and fds sampled: do they grow?"""
        s, summary = self.s, {}
        mix = (s.soak_push_bytes, s.soak_push_every, s.soak_close_every, s.soak_delay_ms)
        lengths = {"nginx": min(s.soak_seconds, s.soak_baseline_seconds), "lgmt": s.soak_seconds}
        for name, target in self.one_by_one(list(lengths)):
            seconds = lengths[name]
            self.log.mark()
            cpu0, t0 = target.cpu(), time.monotonic()
            args = [*map(str, mix), b.PUSH_PATH]
            proc = b.wrk(
                target.url + b.GET_PATH, s.soak_connections, seconds, args, background=True
            )
            samples = []
            while proc.poll() is None:  # about 60 samples
                samples.append(
                    {"t": time.monotonic() - t0, "rss_kib": target.rss_kib(), "fds": target.fds()}
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(1.0, seconds / 60))
            r = b.parse_wrk(*proc.communicate())
            cpu = target.cpu() - cpu0
            time.sleep(0.3)
            summary[name] = note(f"soak {name}", {
                **soak_growth(samples),
                **{k: r[k] for k in ("requests", "non2xx", "socket_errors")},
                "rps": r["requests"] / (r["duration_us"] / 1e6),
                "cpu_us_per_request": cpu * 1e6 / r["requests"] if r["requests"] else math.nan,
                **self.log.window(name),
            })  # fmt: skip
            summary[name]["samples"] = samples
        return {**{f"{k}_seconds": v for k, v in lengths.items()}, "summary": summary}

    def run(self, only: list[str]) -> dict[str, Any]:
        results = {}
        for workload in (w for w in WORKLOADS if w in only):
            if workload != "soak" or self.s.soak_seconds > 0:
                started = time.monotonic()
                log(f"{workload} ...")
                results[workload] = getattr(self, workload)()
                results[workload]["wall_seconds"] = round(time.monotonic() - started, 1)
        return results


# -- figures ---------------------------------------------------------------------------

SUMMED = set("requests non2xx socket_errors bad_credentials pushes_not_read_whole".split())
SUMMED |= {"upstream_requests", "upstream_new_connections"}


def note(what: str, row: dict[str, Any]) -> dict[str, Any]:
    """Log a run's or a target's figures (the numbers), and return them."""
    figures = (f"{k} {v:,.4g}" for k, v in row.items() if not math.isnan(number(v)))
    log(f"{what}: {', '.join(figures)}")
    return row


#: Figures whose ratio to nginx's is also taken round by round (`paired`).
PAIRED = ("cpu_us_per_request", "cpu_us_per_mib")


def summarize(runs: Runs) -> Summary:
    """Per target: the median of each figure over the rounds, counts summed,
    the upstream connection reuse (used per run / opened while measured),
    and the `paired` ratios to nginx (and for a ``*_b`` build to its A)."""
    summary: Summary = {}
    for name, target_runs in runs.items():
        keys = [k for k, v in target_runs[0].items() if isinstance(v, int | float)]
        row = {
            k: (sum if k in SUMMED else statistics.median)(r[k] for r in target_runs) for k in keys
        }
        opened = row["upstream_new_connections"]
        per = f"{row['upstream_requests'] / opened:,.0f}" if opened else "all reused"
        row["conns"] = f"{row['upstream_connections']:,.0f} / {opened} ({per})"
        summary[name] = row
    for name, row in summary.items():
        for base, suffix in (("nginx", "vs_nginx"), (name[:-2] * name.endswith("_b"), "vs_a")):
            if base in runs and base != name:
                row.update(paired(runs[name], runs[base], suffix))
    return summary


def paired(runs: list[dict[str, Any]], base: list[dict[str, Any]], suffix: str) -> dict[str, float]:
    """The ratio of each `PAIRED` figure to ``base``'s in the same round,
    the median over the rounds and the lowest and highest. Adjacent runs
    share the machine's state of the moment (other work on the cores, the
    CPU's clock), which a ratio of the medians over every round does not
    cancel: a busy round raised nginx's figure and lgmt-proxy's by different
    amounts from round to round, and the ratio of medians moved with it."""
    out: dict[str, float] = {}
    for k in PAIRED:
        ratios = [ratio(r.get(k), b_.get(k)) for r, b_ in zip(runs, base, strict=False)]
        ratios = [x for x in ratios if not math.isnan(x)]
        if ratios:
            out[f"{k}_{suffix}"] = statistics.median(ratios)
            out[f"{k}_{suffix}_low"], out[f"{k}_{suffix}_high"] = min(ratios), max(ratios)
    return out


def soak_growth(samples: list[dict[str, float]]) -> dict[str, float]:
    """RSS and fds in the first and the last third of the samples after a
    warm-up fifth (medians), and the RSS slope; growth is more than 2 MiB or
    2 fds between the thirds."""
    steady = samples[len(samples) // 5 :]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    row = {
        "rss_first_mib": statistics.median(x["rss_kib"] for x in first) / 1024,
        "rss_last_mib": statistics.median(x["rss_kib"] for x in last) / 1024,
        "fds_first": statistics.median(x["fds"] for x in first),
        "fds_last": statistics.median(x["fds"] for x in last),
    }
    try:
        xs, ys = [x["t"] for x in steady], [x["rss_kib"] for x in steady]
        row["rss_slope_kib_per_min"] = 60 * statistics.linear_regression(xs, ys).slope
    except statistics.StatisticsError:
        row["rss_slope_kib_per_min"] = math.nan
    growth = row["rss_last_mib"] - row["rss_first_mib"], row["fds_last"] - row["fds_first"]
    row["grows"] = float(growth[0] > 2.0 or growth[1] > 2)
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
            need=(k + "extra_peak_mib",), target="< 64 MiB", check=k + "extra_peak_mib", on="lgmt", limit=64),
        Fig("big", "throughput (MiB/s) / CPU per MiB (µs)", f"{{{k}mib_per_s:,.0f}} / {{{k}cpu_us_per_mib:,.0f}}",
            ratio=(k + "mib_per_s", k + "cpu_us_per_mib")),
    ]  # fmt: skip


CPU = "CPU per request (µs)"
FIGURES = [
    Fig("get50", CPU, "{cpu_us_per_request:,.1f}", label="small GET, {connections} conns", ratio=("cpu_us_per_request",),
        need=("cpu_us_per_request", "rps"), target="≤ 5x", check="cpu_us_per_request", limit=5),
    Fig("get50", "throughput (req/s)", "{rps:,.0f}", ratio=("rps",)),
    _latency("get50"),
    Fig("get50", "CPU used (cores); other work on the machine meanwhile (cores)", "{cores:.2f}; {others_cores:.2f}"),
    _conns("get50"),
    Fig("auth", CPU, "{cpu_us_per_request:,.1f}", label="small GET, {connections} conns, Bearer of the last of {consumers:,} consumers",
        ratio=("cpu_us_per_request",), need=("cpu_us_per_request",), lgmt="lgmt_auth"),
    Fig("auth", "CPU per request without client auth (µs); with / without, same rounds",
        "{no_auth_cpu_us_per_request:,.1f}; {auth_cost:.2f}x", nginx=False, need=("auth_cost",), target="≤ 1.5x",
        check="auth_cost", on="lgmt", limit=1.5, lgmt="lgmt_auth"),
    Fig("budgets", CPU, "{cpu_us_per_request:,.1f}", label="small GET, {connections} conns, one consumer's budgets shared through Redis",
        ratio=("cpu_us_per_request",), need=("cpu_us_per_request",), lgmt="lgmt_budget"),
    Fig("budgets", "CPU per request without client auth (µs); with / without, same rounds",
        "{no_auth_cpu_us_per_request:,.1f}; {budget_cost:.2f}x", nginx=False, need=("budget_cost",), target="≤ 1.3x",
        check="budget_cost", on="lgmt", limit=1.3, lgmt="lgmt_budget"),
    Fig("budgets", "Redis commands sent per request", "{redis_commands_per_request:.2f}", nginx=False,
        need=("redis_commands_per_request",), lgmt="lgmt_budget"),
    Fig("get1", "latency p50 (ms)", "{p50_ms:.3f}", label="small GET, 1 conn", ratio=("p50_ms",), direct=True, need=("p50_ms",)),
    Fig("get1", "added p50 over direct (ms)", "{added_p50_ms:.3f}", ratio=("added_p50_ms",), target="≤ 2.5x",
        check="added_p50_ms", limit=2.5),
    Fig("get1", "latency p99 (ms)", "{p99_ms:.3f}", ratio=("p99_ms",), direct=True),
    Fig("get1", CPU, "{cpu_us_per_request:,.1f}", ratio=("cpu_us_per_request",)),
    _conns("get1"),
    Fig("push", "CPU per MiB (µs)", "{cpu_us_per_mib:,.0f}", label="{size} push, {connections} conns", ratio=("cpu_us_per_mib",),
        need=("cpu_us_per_mib",), target="≤ 1.5x", check="cpu_us_per_mib", limit=1.5),
    Fig("push", "throughput (MiB/s)", "{mib_per_s:,.0f}", ratio=("mib_per_s",)),
    _latency("push"),
    _conns("push"),
    Fig("push", "pushes not read whole by the upstream", "{pushes_not_read_whole:.0f}", target="0"),
    Fig("gzip", "OTLP JSON: bytes upstream / received (saved)", "{json_ratio:.3f} ({json_saved_pct:.0f}%)",
        label="{size} OTLP trace pushes, 1 conn, UPSTREAM_COMPRESSION=gzip (level 1)", nginx=False,
        lgmt="lgmt_gzip", need=("json_ratio",)),
    Fig("gzip", "OTLP JSON: CPU per MiB received, gzip / plain (µs)",
        "{json_cpu_us_per_mib:,.0f} / {json_plain_cpu_us_per_mib:,.0f} ({json_cpu_cost:.2f}x)", nginx=False,
        lgmt="lgmt_gzip", need=("json_cpu_us_per_mib", "json_plain_cpu_us_per_mib")),
    Fig("gzip", "OTLP protobuf: bytes upstream / received (saved)", "{protobuf_ratio:.3f} ({protobuf_saved_pct:.0f}%)",
        nginx=False, lgmt="lgmt_gzip", need=("protobuf_ratio",)),
    Fig("gzip", "OTLP protobuf: CPU per MiB received, gzip / plain (µs)",
        "{protobuf_cpu_us_per_mib:,.0f} / {protobuf_plain_cpu_us_per_mib:,.0f} ({protobuf_cpu_cost:.2f}x)", nginx=False,
        lgmt="lgmt_gzip", need=("protobuf_cpu_us_per_mib", "protobuf_plain_cpu_us_per_mib")),
    Fig("grpc", "CPU per MiB over OTLP/HTTP (µs); over OTLP/gRPC (µs); gRPC / HTTP, same rounds",
        "{http_cpu_us_per_mib:,.0f}; {cpu_us_per_mib:,.0f}; {grpc_cost:.2f}x",
        label="{size} OTLP trace export, {connections} conns, h2load", nginx=False, need=("grpc_cost",),
        target="≤ 1.5x", check="grpc_cost", on="lgmt", limit=1.5, lgmt="lgmt_grpc"),
    Fig("grpc", "throughput over gRPC (MiB/s); mean latency (ms)", "{mib_per_s:,.0f}; {mean_ms:.2f}",
        nginx=False, lgmt="lgmt_grpc"),
    Fig("grpc", "the same from grpcio (gRPC's C core: a deadline, 64 KiB frames, no content-length): CPU per MiB (µs); gRPC / HTTP",
        "{cpu_us_per_mib:,.0f}; {grpc_cost:.2f}x", nginx=False, lgmt="lgmt_grpcio"),
    *_big("up", "{mib} MiB up (POST)"),
    *_big("down", "{mib} MiB down (GET, read at ≤ {rate} MiB/s)"),
    Fig("idle", "RSS per connection (KiB)", "{kib_per_connection:.1f}", label="{connections:,} idle keep-alive conns",
        ratio=("kib_per_connection",), need=("kib_per_connection",)),
    Fig("idle", "RSS before / open / after close (MiB)", "{rss_before_mib:.1f} / {rss_open_mib:.1f} / {rss_after_mib:.1f}"),
    Fig("idle", "open fds before / open / after close", "{fds_before} / {fds_open} / {fds_after}"),
    Fig("soak", "requests / req/s", "{requests:,.0f} / {rps:,.0f}", label="soak ({lgmt_seconds} s lgmt, {nginx_seconds} s nginx)"),
    Fig("soak", CPU, "{cpu_us_per_request:,.1f}", ratio=("cpu_us_per_request",), need=("cpu_us_per_request",)),
    Fig("soak", "RSS first → last third (MiB), slope (KiB/min)", "{rss_first_mib:.1f} → {rss_last_mib:.1f}, {rss_slope_kib_per_min:,.0f}",
        need=("rss_first_mib", "rss_last_mib"), target="no growth", check="grows", on="lgmt", limit=0),
    Fig("soak", "open fds first → last third", "{fds_first:.0f} → {fds_last:.0f}", target="no growth"),
]  # fmt: skip
FIGURES += [
    replace(f, workload=tls, label=f.label and "HTTPS upstream: " + f.label)
    for tls, plain in TLS_WORKLOADS.items()
    for f in FIGURES
    if f.workload == plain
]
FIGURES.sort(key=lambda f: WORKLOADS.index(f.workload))  # stable: rows keep their order
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
    return float(value) if isinstance(value, int | float) else math.nan


def ratio(a: Any, b_: Any) -> float:
    a, b_ = number(a), number(b_)
    return a / b_ if b_ and not math.isnan(a + b_) else math.nan


def fx(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def pair_or_ratio(lg: dict[str, Any], n: dict[str, Any], key: str) -> float:
    """lgmt-proxy / nginx for ``key``: the median of the per-round ratios
    where the rounds paired them (`paired`), else the ratio of the medians."""
    pair = number(lg.get(f"{key}_vs_nginx"))
    return pair if not math.isnan(pair) else ratio(lg.get(key), n.get(key))


def ratio_cell(lg: dict[str, Any], n: dict[str, Any], key: str) -> str:
    """A ratio cell; for a paired figure with its range over the rounds."""
    low, high = (number(lg.get(f"{key}_vs_nginx_{end}")) for end in ("low", "high"))
    text = fx(pair_or_ratio(lg, n, key))
    return text if math.isnan(low + high) or low == high else f"{text} ({low:.2f}-{high:.2f})"


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
            value = pair_or_ratio(lg, n, f.check) if f.on == "ratio" else number(lg.get(f.check))
            # nginx adding no measurable latency (a 0 or negative difference
            # at wrk's resolution) leaves a ratio undefined, not a figure missing.
            base = number(n.get(f.check))
            undefined = f.on == "ratio" and not math.isnan(base) and base <= 0
            ok = None if undefined or math.isnan(value) else value <= f.limit
            name = f"{f.workload} {f.check}{' lgmt / nginx' * (f.on == 'ratio')} {f.target}"
            checks.append({"target": name, "value": value, "limit": f.limit, "ok": ok})
            missing += [name] if ok is None and not undefined else []
            verdict = "n/a" if ok is None else ("**met**" if ok else "**MISSED**")
        cells = [
            f.cell.format_map(_Values(n)) if n and f.nginx else "",
            f.cell.format_map(_Values(lg)),
        ]
        rows.append([
            label, f.figure, f.cell.format_map(_Values(d)) if f.direct else "", *cells,
            " / ".join(ratio_cell(lg, n, k) for k in f.ratio), f.target, verdict,
        ])  # fmt: skip
    every = [t for r in results.values() for t in r["summary"].values()]
    totals = [int(sum(number(t.get(k, 0)) for t in every)) for k in TOTALS]
    ok = sum(totals) == 0
    checks.append({"target": "zero non-2xx", "value": float(sum(totals)), "limit": 0, "ok": ok})
    figure = "non-2xx answers / socket errors / bad upstream requests"
    cell = f"{totals[0]} / {totals[1]} / {totals[2] + totals[3]}"
    rows.append(["all", figure, "", "", cell, "", "0", "**met**" if ok else "**MISSED**"])
    return rows, checks, missing


def compare_lines(results: dict[str, Any]) -> list[str]:
    """--compare-twistd: each ratio figure of the other build (B) against
    lgmt-proxy's (A), and checks on lgmt-proxy's own value (budget_cost)."""
    lines: list[str] = []
    for w, r in results.items():
        for f in (f for f in FIGURES if f.workload == w):
            a, b_ = r["summary"].get(f.lgmt, {}), r["summary"].get(f"{f.lgmt}_b")
            if b_ is None:
                continue
            for k in (*f.ratio, *((f.check,) if f.on == "lgmt" else ())):
                va, vb = number(a.get(k)), number(b_.get(k))
                line = f"  A/B {w:6} {k:22} A {va:>10,.3f}  B {vb:>10,.3f}  B/A {fx(ratio(vb, va))}"
                low, high = (number(b_.get(f"{k}_vs_a{end}")) for end in ("_low", "_high"))
                if not math.isnan(low + high):
                    by_round = fx(number(b_.get(f"{k}_vs_a")))
                    line += f", by round {by_round} ({low:.2f}-{high:.2f})"
                if line not in lines:
                    lines.append(line)
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


#: (option, type, help); a bool type is a flag.
OPTIONS = [
    ("--quick", bool, "CI smoke: 2 s per workload, small sizes, no soak"),
    ("--only", str, f"these workloads, comma-separated: {','.join(WORKLOADS)}"),
    ("--soak-seconds", int, "soak length (default 600; 0 skips it)"),
    ("--rounds", int, "rounds per workload (default 4, --quick 1)"),
    ("--seconds", int, "seconds per measured wrk run (default 10, --quick 2)"),
    ("--big-mib", int, "size of the big transfer each way (default 512)"),
    ("--idle-connections", int, "idle keep-alive connections (default 2000)"),
    ("--consumers", int, "consumers in the auth workload's CLIENT_AUTH_FILE (default 10000)"),
    ("--grpc-kib", int, "size of the grpc workload's OTLP export (default 256)"),
    ("--twistd", str, "twistd with lgmt-proxy installed (default .venv/bin/twistd)"),
    ("--compare-twistd", str, "also run this build (another worktree's twistd) in the same rounds: A/B"),
    ("--workdir", str, "where configs and logs go (default: a temp dir, removed)"),
    ("--json", str, "also write the results here (always: bench/results/latest.json)"),
    ("--update-docs", bool, "rewrite the results table in docs/performance.md"),
    ("--strict", bool, "exit 1 when a target is missed"),
    ("--pin", bool, "pin each proxy (nginx's and lgmt-proxy's alike) to CPU 0, wrk and the upstream to CPU 1"),
]  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for option, kind, text in OPTIONS:
        p.add_argument(
            option, help=text, **({"action": "store_true"} if kind is bool else {"type": kind})
        )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args, wall0 = parse_args(argv), time.monotonic()
    s = Settings.quick() if args.quick else Settings()
    for key, value in (
        ("soak_seconds", args.soak_seconds), ("rounds", args.rounds), ("seconds", args.seconds),
        ("big_bytes", args.big_mib and args.big_mib * MiB), ("idle_connections", args.idle_connections),
        ("auth_consumers", args.consumers), ("grpc_bytes", args.grpc_kib and args.grpc_kib * 1024),
        ("pin", args.pin or None),
    ):  # fmt: skip
        if value is not None:
            setattr(s, key, value)
    only = (args.only or ",".join(WORKLOADS)).split(",")
    if unknown := set(only) - set(WORKLOADS):
        sys.exit(f"bench: unknown workload {', '.join(unknown)}; one of {', '.join(WORKLOADS)}")
    args.twistd = args.twistd or str(b.ROOT / ".venv" / "bin" / "twistd")
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
