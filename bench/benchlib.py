"""The pieces of the benchmark harness: processes, /proc readings, wrk, and
the two small socket clients (big transfers, idle keep-alive connections).

Standard library only, so ``python3 bench/run.py`` works with any Python 3.11
(the proxy itself runs from ``.venv``). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TOKEN = "bench-token-not-a-secret"
ORG_ID = "1"
AUTHORIZATION = "Basic " + base64.b64encode(f"{ORG_ID}:{TOKEN}".encode()).decode()

GET_PATH = "/api/prom/api/v1/query?query=up"
PUSH_PATH = "/api/prom/push"
BIG_PATH = "/api/prom/big"
SMALL_ANSWER = '{"status":"success","data":{"resultType":"vector","result":[]}}'

MiB = 1024 * 1024


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- tools ---------------------------------------------------------------------


def ensure_tools(names: Iterable[str] = ("wrk", "nginx")) -> None:
    """Install the Debian packages ``wrk`` and ``nginx`` when missing (as root)."""
    missing = [n for n in names if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(
            f"bench: missing {' '.join(missing)}; install them: "
            f"sudo apt-get install -y {' '.join(missing)}"
        )
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def which(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        raise SystemExit(f"bench: {name} not found")
    return path


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's (and so its children's) open-file limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions: dict[str, str] = {}
    with contextlib.suppress(Exception):
        out = subprocess.run([which("nginx"), "-v"], capture_output=True, text=True).stderr
        versions["nginx"] = out.strip().split("/")[-1]
    with contextlib.suppress(Exception):
        out = subprocess.run([which("wrk"), "-v"], capture_output=True, text=True).stdout
        versions["wrk"] = out.split()[1]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / MiB, 1),
        "kernel": os.uname().release,
        "versions": versions,
    }


# -- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``Vm*`` line of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``, Linux 4.0+)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kib(pid, "VmHWM") <= status_kib(pid, "VmRSS") + 64


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(rest[1]) == pid:
            found.append(int(entry))
    return sorted(found)


# -- the processes -------------------------------------------------------------


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if 200 <= r.status < 300:
                    return
        except urllib.error.HTTPError as e:
            last = e
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 2xx within {timeout:.0f}s: {last}")


class Target:
    """Something wrk talks to: its base URL and the processes whose CPU and
    memory are its cost (none for the upstream reached directly)."""

    name = "?"
    label = "?"
    url = ""

    def pids(self) -> list[int]:
        return []

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def rss_kib(self) -> int:
        return sum(status_kib(p, "VmRSS") for p in self.pids())

    def hwm_kib(self) -> int:
        return sum(status_kib(p, "VmHWM") for p in self.pids())

    def fds(self) -> int:
        return sum(open_fds(p) for p in self.pids())

    def reset_peak(self) -> bool:
        return all(reset_peak_rss(p) for p in self.pids())

    def stop(self) -> None:
        pass


class Direct(Target):
    """The upstream itself, for the added-latency comparison."""

    name = "direct"
    label = "direct to upstream"

    def __init__(self, url: str) -> None:
        self.url = url


class Nginx(Target):
    """One nginx instance (master + ``worker_processes`` workers) run in the
    foreground from a private prefix directory."""

    def __init__(self, name: str, label: str, workdir: Path, conf: str, port: int) -> None:
        self.name = name
        self.label = label
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.prefix = workdir / name
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self._workers: list[int] = []

    def start(self, health_path: str) -> None:
        nginx = which("nginx")
        test = subprocess.run(
            [nginx, "-t", "-q", "-p", str(self.prefix), "-c", str(self.conf), "-e", "stderr"],
            capture_output=True,
            text=True,
        )
        if test.returncode != 0:
            raise RuntimeError(f"nginx config {self.conf} invalid:\n{test.stderr}")
        self.proc = subprocess.Popen(
            [
                nginx,
                "-p",
                str(self.prefix),
                "-c",
                str(self.conf),
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(self.prefix / "stdout.log", "wb"),
            stderr=open(self.prefix / "stderr.log", "wb"),
        )
        wait_http(self.url + health_path, proc=self.proc)
        deadline = time.monotonic() + 5
        while not self._workers and time.monotonic() < deadline:
            self._workers = children(self.proc.pid)
            time.sleep(0.05)
        if not self._workers:
            raise RuntimeError(f"nginx {self.name}: no worker process found")

    def pids(self) -> list[int]:
        # A worker that died would have been replaced: look again then.
        if self.proc is not None and not all(Path(f"/proc/{p}").exists() for p in self._workers):
            self._workers = children(self.proc.pid)
        return list(self._workers)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LgmtProxy(Target):
    """lgmt-proxy run by ``twistd`` (a path, or a command list that ends
    where twistd's own arguments begin)."""

    def __init__(
        self,
        workdir: Path,
        twistd: str | list[str],
        upstream_url: str,
        port: int,
        name: str = "lgmt",
    ) -> None:
        self.name = name
        self.command = [twistd] if isinstance(twistd, str) else list(twistd)
        self.label = "lgmt-proxy" if name == "lgmt" else f"lgmt-proxy ({' '.join(self.command)})"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.twistd = twistd
        self.upstream_url = upstream_url
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """A clean environment: only what the proxy needs, so nothing in the
        caller's shell (a .env, CLIENT_AUTH_FILE, ...) changes what is measured."""
        env = {
            k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if k in os.environ
        }
        env.update(
            GRAFANA_CLOUD_ACCESS_TOKEN=TOKEN,
            MAX_REQUEST_BODY_BYTES="0",  # the 512 MiB upload
            LOG_LEVEL="info",
            LOG_FORMAT="json",
        )
        for signal_name in ("PROMETHEUS", "LOKI", "TEMPO", "OTLP"):
            env[f"GRAFANA_CLOUD_{signal_name}_URL"] = self.upstream_url
            env[f"GRAFANA_CLOUD_{signal_name}_ORG_ID"] = ORG_ID
        return env

    def start(self) -> None:
        # The access log (one JSON line per request) goes to a file, as it
        # would go to the container runtime's pipe.
        self.proc = subprocess.Popen(
            [
                *self.command,
                "-n",
                "--pidfile=",
                "lgmt-proxy",
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1:backlog=4096",
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "stdout.log", "wb"),
            stderr=open(self.dir / "stderr.log", "wb"),
            env=self.env(),
            cwd=str(self.dir),
        )
        try:
            wait_http(self.url + "/ready", proc=self.proc)
        except RuntimeError:
            tail = (self.dir / "stderr.log").read_text(errors="replace")[-2000:]
            tail += (self.dir / "stdout.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"lgmt-proxy did not start:\n{tail}") from None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _temp_paths(prefix: Path) -> str:
    return "\n".join(
        f"    {kind}_temp_path {prefix / ('tmp-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def _user() -> str:
    # As root, nginx's workers would run as nobody and could not read the
    # private (0700) work directory.
    return "user root root;" if os.geteuid() == 0 else ""


def upstream_conf(prefix: Path, port: int, sink_port: int, big_file: Path) -> str:
    """nginx standing in for Grafana Cloud.

    - small GETs under /api/prom/api/v1/ get a short JSON answer;
    - pushes (/api/prom/push) are read whole before the answer: ``proxy_pass``
      with request buffering (the default) reads the entire body first (into
      memory up to 2 MiB, a temp file beyond), then asks a tiny second server
      (``return 204``) without forwarding the body. The access log's
      ``$request_length`` proves every byte arrived;
    - /api/prom/big is a file of the big-transfer size.

    The access log records, for every request, nginx's connection serial
    number (to count the connections a proxy opened) and whether the
    injected credentials were right.
    """
    return f"""
{_user()}
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix / "nginx.pid"};
events {{ worker_connections 16384; }}
http {{
{_temp_paths(prefix)}
    map $http_authorization $auth_ok {{ "{AUTHORIZATION}" 1; default 0; }}
    log_format bench '$connection\\t$connection_requests\\t$status\\t$request_length\\t$request_method\\t$uri\\t$http_x_scope_orgid\\t$auth_ok';
    access_log {prefix / "access.log"} bench;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    sendfile on;
    tcp_nopush on;
    upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /api/prom/api/v1/ {{
            default_type application/json;
            return 200 '{SMALL_ANSWER}';
        }}
        location = {PUSH_PATH} {{
            client_max_body_size 0;
            client_body_buffer_size 2m;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://sink;
        }}
        location = {BIG_PATH} {{
            default_type application/octet-stream;
            alias {big_file};
        }}
        location = /health {{ return 200 'ok'; }}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{sink_port};
        access_log off;
        location / {{ return 204; }}
    }}
}}
"""


def nginx_proxy_conf(prefix: Path, port: int, upstream_port: int, io_buffer: str = "64k") -> str:
    """nginx as the same credential-injecting reverse proxy: the same routes,
    the same injected headers, a keep-alive upstream pool, streaming both ways
    (no request or response buffering, as lgmt-proxy never spools), and an
    access log line per request (buffered, as lgmt-proxy batches its own).

    Unbuffered, nginx moves bodies through one buffer per direction
    (``client_body_buffer_size``, ``proxy_buffer_size``: 16k and 4k by
    default); both are set to the 64 KiB that Twisted reads at a time."""
    host = f"127.0.0.1:{upstream_port}"
    routes = "\n".join(
        f"        location {incoming} {{ proxy_pass http://grafana{outgoing}; }}"
        for incoming, outgoing in (
            ("/api/prom/", ""),
            ("/prometheus/", "/api/prom/"),
            ("/loki/", ""),
            ("/tempo/", ""),
            ("/otlp/", ""),
        )
    )
    return f"""
{_user()}
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix / "nginx.pid"};
events {{ worker_connections 16384; }}
http {{
{_temp_paths(prefix)}
    access_log {prefix / "access.log"} combined buffer=64k flush=1s;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    upstream grafana {{
        server {host};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 90s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Host {host};
        proxy_set_header Connection "";
        proxy_set_header Authorization "{AUTHORIZATION}";
        proxy_set_header X-Scope-OrgID "{ORG_ID}";
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_request_buffering off;
        proxy_buffering off;
        client_body_buffer_size {io_buffer};
        proxy_buffer_size {io_buffer};
        proxy_buffers 4 {io_buffer};
        proxy_busy_buffers_size {io_buffer};
        proxy_redirect off;
{routes}
        location = /ready {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location / {{ default_type application/json; return 404 '{{"error":"no route"}}'; }}
    }}
}}
"""


# -- the upstream's access log ----------------------------------------------------


@dataclass
class UpstreamLog:
    """Reads the upstream's access log window by window."""

    path: Path
    offset: int = 0
    seen: dict[str, set[str]] = field(default_factory=dict)

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def window(self, target: str, min_body: int = 0) -> dict[str, Any]:
        """What the upstream saw since `mark`: requests, connections used and
        newly opened, bad credentials, pushes not read whole."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        conns: set[str] = set()
        requests = bad_auth = short = cut = 0
        for raw in data.decode("latin-1").splitlines():
            parts = raw.split("\t")
            if len(parts) < 8:
                continue
            conn, _n, status, length, method, uri, orgid, auth_ok = parts[:8]
            if uri == "/health":
                continue
            requests += 1
            conns.add(conn)
            if target != "direct" and (auth_ok != "1" or orgid != ORG_ID):
                bad_auth += 1
            if method == "POST" and min_body:
                if not status.startswith("2"):
                    cut += 1  # the client (wrk stopping) cut it: never answered 2xx
                elif int(length) < min_body:
                    short += 1  # answered 2xx before the whole body arrived
        known = self.seen.setdefault(target, set())
        new = conns - known
        known |= conns
        return {
            "upstream_requests": requests,
            "upstream_connections": len(conns),
            "upstream_new_connections": len(new),
            "bad_credentials": bad_auth,
            "pushes_not_read_whole": short,
            "pushes_cut_by_client": cut,
        }


# -- wrk -------------------------------------------------------------------------


def wrk(
    url: str,
    *,
    connections: int,
    seconds: int,
    script: str,
    args: Iterable[str] = (),
    threads: int = 1,
    timeout: int = 10,
) -> dict[str, Any]:
    cmd = [
        which("wrk"),
        "-t",
        str(min(threads, connections)),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        f"{timeout}s",
        "--latency",
        "-s",
        str(LUA / script),
        url,
        "--",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    return parse_wrk(out.stdout, out.stderr, cmd)


def parse_wrk(stdout: str, stderr: str, cmd: list[str]) -> dict[str, Any]:
    match = re.search(r"^BENCH (\{.*\})$", stdout, re.M)
    if match is None:
        raise RuntimeError(f"wrk gave no result: {' '.join(cmd)}\n{stdout}\n{stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    # wrk's own count of answers >= 400, as a cross-check of the lua count.
    line = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", stdout)
    result["wrk_non2xx_line"] = int(line.group(1)) if line else 0
    result["errors"] = sum(
        result[k] for k in ("err_connect", "err_read", "err_write", "err_timeout")
    )
    result["raw"] = stdout
    return result


def wrk_popen(
    url: str, *, connections: int, seconds: int, script: str, args: Iterable[str] = ()
) -> tuple[subprocess.Popen[str], list[str]]:
    cmd = [
        which("wrk"),
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA / script),
        url,
        "--",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, cmd


# -- socket clients -------------------------------------------------------------


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        buf += chunk
    head, rest = bytes(buf).split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def _read_body(sock: socket.socket, headers: dict[str, str], rest: bytes, rate: float = 0.0) -> int:
    """Read a Content-Length body, at most ``rate`` bytes/s when given;
    returns its size (the bytes are discarded)."""
    length = int(headers.get("content-length", "0"))
    got = len(rest)
    view = bytearray(MiB)
    start = time.monotonic()
    while got < length:
        n = sock.recv_into(view, min(len(view), length - got))
        if n == 0:
            raise ConnectionError(f"body cut at {got} of {length} bytes")
        got += n
        if rate:
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0.001:
                time.sleep(ahead)
    return got


def big_upload(port: int, path: str, size: int) -> dict[str, Any]:
    """POST ``size`` bytes (Content-Length) in 1 MiB writes; the answer."""
    chunk = (b"0123456789abcdef" * (MiB // 16))[:MiB]
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        left = size
        while left:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n] if n < len(chunk) else chunk)
            left -= n
        buf = bytearray()
        status, headers, rest = _read_head(sock, buf)
        _read_body(sock, headers, rest)
    return {"status": status, "seconds": time.monotonic() - start}


def big_download(port: int, path: str, rate: float = 0.0) -> dict[str, Any]:
    """GET a big body, reading at most ``rate`` bytes/s (0: as fast as it
    comes): a reader slower than the proxy makes it hold the upstream back."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        buf = bytearray()
        status, headers, rest = _read_head(sock, buf)
        got = _read_body(sock, headers, rest, rate)
    return {"status": status, "bytes": got, "seconds": time.monotonic() - start}


@contextlib.contextmanager
def idle_connections(port: int, count: int, path: str) -> Iterator[dict[str, int]]:
    """Open ``count`` keep-alive connections, one small GET on each, and hold
    them open (idle) inside the ``with``."""
    socks: list[socket.socket] = []
    result = {"opened": 0, "non2xx": 0}
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(sock)
            sock.sendall(request)
            buf = bytearray()
            status, headers, rest = _read_head(sock, buf)
            _read_body(sock, headers, rest)
            result["opened"] += 1
            if not 200 <= status < 300:
                result["non2xx"] += 1
        yield result
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return 60 * sum((t - mx) * (v - my) for t, v in points) / den
