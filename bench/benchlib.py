"""The pieces of the benchmark harness: the processes and what they cost
(psutil), the nginx configurations, wrk, and the two socket clients wrk cannot
be (one big transfer at a paced read rate, thousands of idle connections).

Everything listens on 127.0.0.1. psutil comes from the dev venv: run as
``python3 bench/run.py``, this module re-executes under ``.venv/bin/python``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

try:
    import psutil
except ImportError:  # system python3: the venv has psutil (requirements-dev)
    if VENV_PYTHON.exists() and not os.environ.get("LGMT_BENCH_REEXEC"):
        os.environ["LGMT_BENCH_REEXEC"] = "1"
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])
    raise SystemExit("bench: needs psutil: run `make venv` first") from None

TOKEN = "bench-token-not-a-secret"
ORG_ID = "1"
AUTHORIZATION = "Basic " + base64.b64encode(f"{ORG_ID}:{TOKEN}".encode()).decode()
GET_PATH = "/api/prom/api/v1/query?query=up"
PUSH_PATH = "/api/prom/push"
OTLP_PATH = "/otlp/v1/traces"
GRPC_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
BIG_PATH = "/api/prom/big"
SMALL_ANSWER = '{"status":"success","data":{"resultType":"vector","result":[]}}'
MiB = 1024 * 1024


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- tools and the machine ---------------------------------------------------------


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"bench: {name} not found: apt-get install -y nginx-light wrk")
    return path


#: The tools the harness runs, by the Debian package that has them.
TOOLS = {"wrk": "wrk", "nginx": "nginx", "h2load": "nghttp2-client"}


def ensure_tools() -> None:
    """Install Debian's nginx, wrk and h2load when missing and running as root."""
    missing = [n for n in TOOLS if not shutil.which(n, path="/usr/bin:/usr/sbin")]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(TOOLS[n] for n in missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        packages = [TOOLS[n] for n in missing]
        for cmd in (
            ["update", "-q"],
            ["install", "-y", "-q", "--no-install-recommends", *packages],
        ):
            subprocess.run(["apt-get", *cmd], check=True, env=env, stdout=subprocess.DEVNULL)
    for name in missing:
        which(name)


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's (and so its children's) open-file limit."""
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
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    nginx = subprocess.run([which("nginx"), "-v"], capture_output=True, text=True).stderr
    wrk = subprocess.run([which("wrk"), "-v"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": os.uname().release,
        "versions": {"nginx": nginx.strip().split("/")[-1], "wrk": [*wrk.split(), "?", "?"][1]},
    }


# -- the processes -----------------------------------------------------------------


#: With ``--pin``, the CPU wrk runs on (``taskset``); None: wherever the
#: scheduler puts it.
WRK_CPU: list[int] = []


def place(target: Target, cpu: int) -> None:
    """Pin every process of ``target`` (an nginx's master too) to ``cpu``."""
    procs = target.processes()
    if target.proc is not None:
        procs = [psutil.Process(target.proc.pid), *procs]
    for proc in procs:
        proc.cpu_affinity([cpu])


def machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine spent so far: ``busy`` (user, system,
    irq and softirq: everything but idle, iowait and steal), ``softirq``
    alone (loopback TCP is mostly that, and the kernel may or may not charge
    it to the process that sent) and ``steal`` (the hypervisor ran someone
    else), plus ``children``: what the bench's reaped children (wrk) used."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - t.iowait - t.steal - t.guest - t.guest_nice
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "busy": busy,
        "softirq": t.softirq,
        "steal": t.steal,
        "children": kids.ru_utime + kids.ru_stime,
    }


def peak_rss_kib(pid: int, reset: bool = False) -> int:
    """VmHWM, the peak RSS (psutil has none); ``reset`` first sets it back to
    the current RSS (``clear_refs`` 5, Linux 4.0+) where the kernel allows."""
    if reset:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if 200 <= r.status < 300:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 2xx within {timeout:.0f}s")


class Target:
    """Something wrk talks to: its URL and the processes whose CPU and memory
    are its cost (for nginx its workers, for the upstream reached directly none)."""

    name = label = url = ""
    port = 0
    proc: subprocess.Popen[bytes] | None = None

    def processes(self) -> list[psutil.Process]:
        return []

    def cpu(self) -> float:
        """user + system CPU seconds of all its processes."""
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def rss_kib(self) -> int:
        return sum(p.memory_info().rss for p in self.processes()) // 1024

    def fds(self) -> int:
        return sum(p.num_fds() for p in self.processes())

    def usage(self, when: str) -> dict[str, float]:
        return {f"rss_{when}_mib": self.rss_kib() / 1024, f"fds_{when}": self.fds()}

    def peak_kib(self, reset: bool = False) -> int:
        return sum(peak_rss_kib(p.pid, reset) for p in self.processes())

    def start(self) -> None:
        pass

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _spawn(self, cmd: list[str], logs: Path, health: str, **kw: Any) -> None:
        with open(logs / "stdout.log", "wb") as out, open(logs / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, **kw
            )
        try:
            wait_http(self.url + health, self.proc)
        except RuntimeError as e:
            tail = "".join(
                (logs / n).read_text(errors="replace")[-2000:] for n in ("stderr.log", "stdout.log")
            )
            raise RuntimeError(f"{self.label} did not start: {e}\n{tail}") from None


class Direct(Target):
    """The upstream itself, for the added-latency comparison."""

    name, label = "direct", "direct to upstream"

    def __init__(self, url: str) -> None:
        self.url = url


class Nginx(Target):
    """One nginx (master + one worker) in the foreground from a private prefix."""

    def __init__(
        self, name: str, label: str, workdir: Path, conf: str, port: int, health: str
    ) -> None:
        self.name, self.label, self.port, self.health = name, label, port, health
        self.url = f"http://127.0.0.1:{port}"
        self.prefix = workdir / name
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(conf)

    def start(self) -> None:
        cmd = [which("nginx"), "-p", str(self.prefix), "-c", str(self.conf), "-e", "stderr"]
        test = subprocess.run([*cmd, "-t", "-q"], capture_output=True, text=True)
        if test.returncode:
            raise RuntimeError(f"nginx config {self.conf} invalid:\n{test.stderr}")
        self._spawn([*cmd, "-g", "daemon off;"], self.prefix, self.health)

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children() if self.proc else []


class LgmtProxy(Target):
    """lgmt-proxy run by ``twistd`` in a clean environment (nothing of the
    caller's shell, a .env or CLIENT_AUTH_FILE, changes what is measured)."""

    def __init__(
        self, workdir: Path, twistd: str, upstream: str, name: str = "lgmt", **env: str
    ) -> None:
        self.name, self.port = name, free_port()
        self.twistd = os.path.abspath(shutil.which(twistd) or twistd)  # run from its own dir
        self.label = "lgmt-proxy" if name == "lgmt" else f"lgmt-proxy ({name}: {twistd})"
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TZ")}
        self.env |= {"GRAFANA_CLOUD_ACCESS_TOKEN": TOKEN, "MAX_REQUEST_BODY_BYTES": "0", **env}
        for sig in ("PROMETHEUS", "LOKI", "TEMPO", "OTLP"):
            self.env |= {
                f"GRAFANA_CLOUD_{sig}_URL": upstream,
                f"GRAFANA_CLOUD_{sig}_ORG_ID": ORG_ID,
            }

    def start(self) -> None:
        # The access log goes to a file, as it would go to the container's pipe.
        listen = f"tcp:{self.port}:interface=127.0.0.1:backlog=4096"
        cmd = [self.twistd, "-n", "--pidfile=", "lgmt-proxy", "--listen", listen]
        self._spawn(cmd, self.dir, "/ready", env=self.env, cwd=self.dir)

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid)] if self.proc else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # its graceful shutdown would take seconds
            self.proc.wait()


def client_auth_file(path: Path, consumers: int) -> str:
    """Write a CLIENT_AUTH_FILE of ``consumers`` consumers allowed everything;
    return the Bearer token of the last one (the worst case of a linear scan).
    Plain tokens in flow style keep 10,000 consumers under the 1 MiB limit."""
    token = "bench-consumer-{:06d}".format
    lines = [f"  - {{name: c{i}, token: {token(i)}, allow: *all}}" for i in range(consumers)]
    lines[0] = f"  - {{name: c0, token: {token(0)}, allow: &all [{{methods: '*', paths: ['/*']}}]}}"
    path.write_text("consumers:\n" + "\n".join(lines) + "\n")
    return token(consumers - 1)


def budget_auth_file(path: Path) -> str:
    """A CLIENT_AUTH_FILE of one consumer whose budgets never refuse in a
    bench run (a million requests and a GiB a second): every request asks
    the budget keeper, none is turned away. Returns its Bearer token."""
    token = "bench-budget-consumer-0123456789"
    path.write_text(
        "consumers:\n"
        f"  - {{name: team, token: {token}, allow: [{{methods: '*', paths: ['/*']}}],\n"
        "     rate_limit: {requests_per_second: 1000000, bytes_per_second: 1073741824}}\n"
    )
    return token


class Redis(Target):
    """redis-server for shared budgets, on a free loopback port, persisting nothing."""

    name, label = "redis", "redis-server"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.dir), "--save", "", "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not listen within 10 s")

    #: What a client sends (INFO commandstats also counts what scripts run).
    CLIENT_COMMANDS = frozenset({b"evalsha", b"eval", b"ping", b"auth", b"select", b"script"})

    def commands(self) -> int:
        """Commands clients have sent so far: round trips (pipelined or not),
        not the GET/SET/TIME a script runs inside Redis."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"INFO commandstats\r\n")
            data = b""
            while not data.startswith(b"$") or len(data) < int(data[1 : data.index(b"\r\n")]):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        calls = re.findall(rb"cmdstat_(\w+):calls=(\d+)", data)
        return sum(int(n) for name, n in calls if name in self.CLIENT_COMMANDS)


# -- nginx configurations --------------------------------------------------------


def _common(prefix: Path) -> str:
    # As root, nginx's workers would run as nobody and could not read the
    # private (0700) work directory.
    temp = " ".join(
        f"{k}_temp_path {prefix / ('tmp-' + k)};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""{user} worker_processes 1; worker_rlimit_nofile 65536; pid {prefix / "nginx.pid"};
events {{ worker_connections 16384; }}
http {{ {temp}"""


def upstream_conf(
    prefix: Path, port: int, sink_port: int, big_file: Path, tls: TlsFiles, tls_port: int
) -> str:
    """nginx standing in for Grafana Cloud: small JSON answers to queries;
    pushes (remote write, and OTLP traces) read whole before the 204 (``proxy_pass`` with request buffering
    reads the body, then asks a tiny second server without forwarding it, and
    ``$request_length`` proves every byte arrived); a big file. The same
    locations over plain HTTP on ``port`` and HTTPS on ``tls_port`` (as
    Grafana Cloud answers: TLS 1.3, session tickets). The access log records
    nginx's connection serial (the connections a proxy opened) and whether
    the injected credentials were right."""
    locations = f"""
        location /api/prom/api/v1/ {{ default_type application/json; return 200 '{SMALL_ANSWER}'; }}
        location = {PUSH_PATH} {{
            client_max_body_size 0; client_body_buffer_size 2m;
            proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_pass_request_body off; proxy_set_header Content-Length "";
            proxy_pass http://sink;
        }}
        location /otlp/v1/ {{
            client_max_body_size 0; client_body_buffer_size 2m;
            proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_pass_request_body off; proxy_set_header Content-Length "";
            proxy_pass http://sink;
        }}
        location = {BIG_PATH} {{ default_type application/octet-stream; alias {big_file}; }}
        location = /health {{ return 200 'ok'; }}
        location / {{ return 404; }}"""
    return f"""{_common(prefix)}
    map $http_authorization $auth_ok {{ "{AUTHORIZATION}" 1; default 0; }}
    log_format bench '$connection\\t$status\\t$request_length\\t$request_method\\t$uri\\t$http_x_scope_orgid\\t$auth_ok';
    access_log {prefix / "access.log"} bench;
    keepalive_timeout 300s; keepalive_requests 10000000; sendfile on; tcp_nopush on;
    upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;{locations}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        ssl_certificate {tls.cert}; ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:bench:1m;{locations}
    }}
    server {{ listen 127.0.0.1:{sink_port}; access_log off; location / {{ return 204; }} }}
}}
"""


def nginx_proxy_conf(
    prefix: Path, port: int, upstream_port: int, io_buffer: str = "64k", ca: Path | None = None
) -> str:
    """nginx as the same credential-injecting reverse proxy: the same routes
    and injected headers, a keep-alive upstream pool, streaming both ways (no
    buffering: lgmt-proxy never spools) through one 64 KiB buffer per
    direction (what Twisted reads at a time), a buffered access log. With
    ``ca``, the upstream is HTTPS, verified against that CA, sessions reused."""
    host = f"127.0.0.1:{upstream_port}"
    scheme, verify = "http", ""
    if ca is not None:
        scheme = "https"
        verify = (
            f"proxy_ssl_trusted_certificate {ca}; proxy_ssl_verify on; "
            "proxy_ssl_name localhost; proxy_ssl_session_reuse on;"
        )
    routes = "\n".join(
        f"        location {a} {{ proxy_pass {scheme}://grafana{b}; }}"
        for a, b in [("/prometheus/", "/api/prom/")]
        + [(p, "") for p in ("/api/prom/", "/loki/", "/tempo/", "/otlp/")]
    )
    return f"""{_common(prefix)}
    access_log {prefix / "access.log"} combined buffer=64k flush=1s;
    keepalive_timeout 75s; keepalive_requests 10000000;
    upstream grafana {{ server {host}; keepalive 128; keepalive_requests 10000000; keepalive_timeout 90s; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0; proxy_http_version 1.1; proxy_redirect off;
        proxy_set_header Host {host}; proxy_set_header Connection "";
        proxy_set_header Authorization "{AUTHORIZATION}"; proxy_set_header X-Scope-OrgID "{ORG_ID}";
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_request_buffering off; proxy_buffering off;
        client_body_buffer_size {io_buffer}; proxy_buffer_size {io_buffer};
        proxy_buffers 4 {io_buffer}; proxy_busy_buffers_size {io_buffer}; {verify}
{routes}
        location = /ready {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location / {{ default_type application/json; return 404 '{{"error":"no route"}}'; }}
    }}
}}
"""


# -- TLS for the HTTPS upstream ---------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA made for one run and the upstream's certificate (for 127.0.0.1)
    signed by it: the proxies trust the CA alone (UPSTREAM_CA_FILE)."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TlsFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key: Any, issuer: Any, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lgmt bench CA")])
    ca = cert("lgmt bench CA", ca_key, ca_name, ca_key, True)
    leaf = cert("127.0.0.1", leaf_key, ca_name, ca_key, False)
    files = TlsFiles(directory / "ca.pem", directory / "upstream.pem", directory / "upstream.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# -- the upstream's access log -----------------------------------------------------


@dataclass
class UpstreamLog:
    """The upstream's access log, read window by window: what each proxy
    really sent (connections opened, credentials, whole bodies)."""

    path: Path
    offset: int = 0
    seen: dict[str, set[str]] = field(default_factory=dict)

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def window(self, target: str, min_body: int = 0) -> dict[str, int]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        conns: set[str] = set()
        requests = bad = short = 0
        for line in data.decode("latin-1").splitlines():
            conn, status, length, method, uri, orgid, auth_ok = (line.split("\t") + [""] * 7)[:7]
            if uri in ("", "/health"):
                continue
            requests += 1
            conns.add(conn)
            bad += target != "direct" and (auth_ok != "1" or orgid != ORG_ID)
            # A push answered 2xx before its whole body arrived (one cut by
            # wrk stopping is never answered 2xx).
            short += method == "POST" and status.startswith("2") and int(length) < min_body
        known = self.seen.setdefault(target, set())
        new = conns - known
        known |= conns
        return {
            "upstream_requests": requests,
            "upstream_connections": len(conns),
            "upstream_new_connections": len(new),
            "bad_credentials": bad,
            "pushes_not_read_whole": short,
        }


# -- wrk -----------------------------------------------------------------------------


def wrk(
    url: str,
    conns: int,
    seconds: float,
    args: Sequence[str] = (),
    opts: Sequence[str] = (),
    background: bool = False,
) -> Any:
    """Run wrk (one thread: the proxies under test have one core each) with
    bench.lua, which counts non-2xx answers and prints one ``BENCH {json}``:
    that result, or with ``background`` the process, for `parse_wrk`."""
    cmd = f"{which('wrk')} -t1 -c{conns} -d{seconds}s --timeout 10s --latency -s".split()
    if WRK_CPU:
        cmd = [which("taskset"), "-c", str(WRK_CPU[0]), *cmd]
    cmd += [str(BENCH / "bench.lua"), *opts, url, "--", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc if background else parse_wrk(*proc.communicate(timeout=seconds + 60))


def parse_wrk(stdout: str, stderr: str) -> dict[str, Any]:
    match = re.search(r"^BENCH (\{.*\})$", stdout, re.M)
    if match is None:
        raise RuntimeError(f"wrk gave no result:\n{stdout}\n{stderr}")
    return dict(json.loads(match.group(1)))


# -- h2load (OTLP over gRPC and HTTP/1.1) -------------------------------------------


def h2load(
    url: str,
    conns: int,
    seconds: float,
    body: Path,
    headers: Sequence[str],
    h1: bool = False,
    background: bool = False,
) -> Any:
    """POST ``body`` to ``url`` for ``seconds`` with h2load (one thread, one
    request in flight per connection): HTTP/2 with prior knowledge, or
    HTTP/1.1 with ``h1``. Its counts, duration and mean latency
    (`parse_h2load`), or with ``background`` the process."""
    cmd = [which("h2load"), "-t1", f"-c{conns}", "-m1", f"-D{seconds}", "-d", str(body)]
    cmd += [x for h in headers for x in ("-H", h)] + (["--h1"] if h1 else []) + [url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc if background else parse_h2load(proc.communicate(timeout=seconds + 60)[0])


def parse_h2load(out: str) -> dict[str, Any]:
    counts = r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
    done = re.search(counts, out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    took = re.search(r"finished in ([\d.]+)(m?s)", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if not (done and codes and took and mean):
        raise RuntimeError(f"h2load gave no result:\n{out}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    return {
        "requests": int(done.group(2)),
        "ok": int(codes.group(1)),
        "errors": sum(int(done.group(k)) for k in (4, 5, 6)),
        "seconds": float(took.group(1)) * scale[took.group(2)],
        "mean_ms": float(mean.group(1)) * scale[mean.group(2)] * 1000,
    }


# -- socket clients ------------------------------------------------------------------


def _answer(sock: socket.socket, rate: float = 0.0) -> tuple[int, int]:
    """Read a Content-Length answer (its body at most ``rate`` bytes/s when
    given, then discarded); its status and body size."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    status = int(head.split(None, 2)[1])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    length, got = (int(m.group(1)) if m else 0), len(rest)
    view, start = bytearray(MiB), time.monotonic()
    while got < length:
        n = sock.recv_into(view, min(MiB, length - got))
        if n == 0:
            raise ConnectionError(f"body cut at {got} of {length} bytes")
        got += n
        if rate and (ahead := got / rate - (time.monotonic() - start)) > 0.001:
            time.sleep(ahead)
    return status, got


def big_transfer(port: int, way: str, size: int, rate: float) -> dict[str, Any]:
    """POST ``size`` bytes (Content-Length, 1 MiB writes) for ``way`` "up",
    else GET the big file reading at most ``rate`` bytes/s: a reader slower
    than the proxy makes it hold the upstream back (or buffer)."""
    chunk, start = (b"0123456789abcdef" * (MiB // 16)), time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        if way == "up":
            sock.sendall(
                f"POST {PUSH_PATH} HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            for left in range(size, 0, -MiB):
                sock.sendall(chunk if left >= MiB else chunk[:left])
        else:
            sock.sendall(f"GET {BIG_PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, got = _answer(sock, rate)
    return {
        "status": status,
        "bytes": size if way == "up" else got,
        "seconds": time.monotonic() - start,
    }


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[dict[str, int]]:
    """Open ``count`` keep-alive connections, one small GET on each, and hold
    them open (idle) inside the ``with``."""
    socks: list[socket.socket] = []
    result = {"opened": 0, "non2xx": 0}
    try:
        for _ in range(count):
            socks.append(sock := socket.create_connection(("127.0.0.1", port), timeout=30))
            sock.sendall(f"GET {GET_PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            result["non2xx"] += not 200 <= _answer(sock)[0] < 300
            result["opened"] += 1
        yield result
    finally:
        for sock in socks:
            sock.close()
