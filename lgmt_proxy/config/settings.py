"""Configuration: frozen, validated values parsed from a plain mapping.

`parse_config` is pure (no environment, no files), so every rule is testable
without touching ``os.environ``; the token file is read by the caller
(``tap.py``) and its content validated here by `parse_token`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs
import idna

from lgmt_proxy.config.compression import VARIABLES as COMPRESSION_VARIABLES
from lgmt_proxy.config.compression import Compression, parse_compression
from lgmt_proxy.config.egress import Egress, RouteProxy, parse_egress
from lgmt_proxy.config.grpclisten import VARIABLES as GRPC_VARIABLES
from lgmt_proxy.config.grpclisten import parse_grpc_listen
from lgmt_proxy.config.ratelimit import VARIABLES as RATE_LIMIT_VARIABLES
from lgmt_proxy.config.ratelimit import RedisSettings, parse_rate_limit_redis
from lgmt_proxy.config.secret import Secret
from lgmt_proxy.config.servertls import ServerTLS

#: The signals of the contract, in the order their routes are listed, plus
#: profiles (Pyroscope), Grafana Cloud's fifth signal, off unless configured.
SIGNALS = ("prometheus", "loki", "tempo", "otlp", "profiles")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("json", "text")


class ConfigError(Exception):
    """Bad configuration: one human-readable line per problem, never a secret."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class UpstreamConfig:
    """One upstream (a signal's, or a ROUTES_FILE route's): where it lives and
    who we are there. ``auth`` is basic (``user`` and the token), bearer or
    none; ``user`` is a signal's ORG_ID or a route's ``credentials.user``;
    ``tenant`` None sends no ``X-Scope-OrgID``; ``proxy`` is a route's own
    forward proxy choice (None: HTTPS_PROXY/HTTP_PROXY/NO_PROXY decide);
    ``gzip_level`` compresses its push bodies (None: off)."""

    name: str
    url: str
    scheme: str
    host: str
    port: int
    #: The URL's path without trailing '/' ('' for none): where the service is
    #: mounted (`routes.upstream_target` says how it joins the upstream path).
    base_path: str
    user: str
    tenant: str | None
    auth: str = "basic"
    proxy: RouteProxy = None
    gzip_level: int | None = None


def upstream_from_url(
    name: str,
    url: str,
    *,
    user: str,
    tenant: str | None,
    auth: str = "basic",
    proxy: RouteProxy = None,
    gzip_level: int | None = None,
) -> UpstreamConfig:
    """An `UpstreamConfig` from a URL that `url_problem` accepted."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    return UpstreamConfig(
        name=name,
        url=url,
        scheme=parts.scheme,
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        base_path=parts.path.rstrip("/"),
        user=user,
        tenant=tenant,
        auth=auth,
        proxy=proxy,
        gzip_level=gzip_level,
    )


@attrs.frozen
class Config:
    """Everything the proxy needs, validated. The token is a `Secret`."""

    #: The signals that are on, by name (none with ROUTES_FILE).
    signals: Mapping[str, UpstreamConfig]
    token: Secret | None = None
    token_file: str | None = None
    port: int = 8085
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 300.0
    upstream_idle_timeout: float = 30.0
    max_request_body_bytes: int = 52428800
    shutdown_delay: float = 5.0
    shutdown_grace: float = 25.0
    upstream_ca_file: str | None = None
    allow_insecure_upstream: bool = False
    log_level: str = "info"
    log_format: str = "json"
    client_header_timeout: float = 15.0
    client_idle_timeout: float = 75.0
    max_connections: int = 10000
    client_auth_file: str | None = None
    routes_file: str | None = None
    max_websockets: int = 100
    websocket_idle_timeout: float = 600.0
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    metrics_tenant_label: bool = False
    #: HTTPS_PROXY, HTTP_PROXY, NO_PROXY (config/egress.py).
    egress: Egress = attrs.field(factory=Egress)
    #: RATE_LIMIT_REDIS_URL (config/ratelimit.py): budgets shared by replicas.
    rate_limit_redis: RedisSettings | None = None
    #: OTLP_GRPC_LISTEN: a port or an endpoint description (None: off).
    otlp_grpc_listen: str | None = None
    #: UPSTREAM_COMPRESSION, UPSTREAM_COMPRESSION_LEVEL (config/compression.py).
    compression: Compression = attrs.field(factory=Compression)
    #: OTLP_GRPC_TLS_CERT_FILE and OTLP_GRPC_TLS_KEY_FILE (both or neither).
    otlp_grpc_tls_files: tuple[str, str] | None = None
    #: What those files hold, read at start-up by the caller (tap.load).
    otlp_grpc_tls: ServerTLS | None = None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _has_control(value: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def parse_token(raw: str) -> tuple[Secret | None, str | None]:
    """Validate a token (from the environment or a file): trailing newline
    allowed. The problem says what is wrong, never the value; the caller puts
    in front what the user wrote (the variable, the file's key)."""
    value = raw.strip()
    if not value:
        return None, "is empty"
    if _has_control(value) or any(c.isspace() for c in value):
        return None, "contains whitespace or control characters"
    return Secret(value), None


class _Reader:
    """Collects one problem line per bad variable while reading values."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def number(
        self, name: str, default: float, *, minimum: float = 0.0, allow_zero: bool = False
    ) -> float:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}: must be a number of seconds, got {raw!r}")
            return default
        if not math.isfinite(value) or value < minimum or (value == 0 and not allow_zero):
            limit = ">= 0" if allow_zero else "> 0"
            self.problems.append(f"{name}: must be a finite number {limit}, got {raw!r}")
            return default
        return value

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()):
            self.problems.append(f"{name}: must be a whole number, got {raw!r}")
            return default
        value = int(raw)
        if value < low or (high is not None and value > high):
            bounds = f"{low} to {high}" if high is not None else f"at least {low}"
            self.problems.append(f"{name}: must be {bounds}, got {raw!r}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.env.get(name)
        if raw is None:
            return default
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        self.problems.append(f"{name}: must be true or false, got {raw!r}")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.get(name)
        if raw is None:
            return default
        low = raw.lower()
        if low == "warning":
            low = "warn"
        if low not in choices:
            self.problems.append(f"{name}: must be one of {', '.join(choices)}, got {raw!r}")
            return default
        return low


_ORIGIN = re.compile(r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?$")
_HOST = re.compile(r"^([A-Za-z0-9.-]+|\[?[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\]?)$")


def _parse_list(reader: _Reader, name: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    """A comma-separated list; one problem line naming the first bad entry."""
    raw = reader.get(name)
    if raw is None:
        return ()
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    bad = [item for item in items if not pattern.match(item)]
    if bad:
        reader.problems.append(f"{name}: {bad[0]!r} is not {what}")
        return ()
    return items


def _parse_signal(reader: _Reader, signal: str, allow_insecure: bool) -> UpstreamConfig | None:
    prefix = f"GRAFANA_CLOUD_{signal.upper()}"
    url = reader.get(f"{prefix}_URL")
    org_id = reader.get(f"{prefix}_ORG_ID")
    tenant_id = reader.get(f"{prefix}_TENANT_ID")
    if url is None and org_id is None:
        if tenant_id is not None:
            reader.problems.append(f"{prefix}_TENANT_ID: set, but {prefix}_URL is not")
        return None
    if url is None:
        reader.problems.append(f"{prefix}_URL: required because {prefix}_ORG_ID is set")
        return None
    ok = True
    if org_id is None:
        reader.problems.append(f"{prefix}_ORG_ID: required because {prefix}_URL is set")
        ok = False
    elif ":" in org_id or _has_control(org_id) or any(c.isspace() for c in org_id):
        reader.problems.append(
            f"{prefix}_ORG_ID: must not contain ':', spaces or control characters"
        )
        ok = False
    if tenant_id is not None and _has_control(tenant_id):
        reader.problems.append(f"{prefix}_TENANT_ID: must not contain control characters")
        ok = False
    problem = url_problem(url, allow_insecure)
    if problem:
        reader.problems.append(f"{prefix}_URL: {problem}")
        return None
    if not ok or org_id is None:
        return None
    return upstream_from_url(
        signal, url, user=org_id, tenant=tenant_id if tenant_id is not None else org_id
    )


def _tls_name_problem(host: str) -> str | None:
    """A host name TLS cannot check a certificate against (IDNA 2008, as
    service_identity and SNI need it: no underscores, say), said at start
    rather than as a failure of every request."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        idna.encode(host)
    except idna.IDNAError as e:
        return f"host {host!r} is not a name TLS can verify a certificate for ({e})"
    return None


def url_problem(url: str, allow_insecure: bool) -> str | None:
    """Say what is wrong with an upstream URL, without echoing userinfo."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL (bad port?)"
    if parts.scheme not in ("http", "https"):
        return "must start with https:// (or http:// for a loopback host)"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials; set GRAFANA_CLOUD_ACCESS_TOKEN instead"
    if parts.query or parts.fragment:
        return "must not have a query string or fragment"
    if port == 0:
        return "port must be 1 to 65535"
    if _has_control(url) or " " in url:
        return "contains spaces or control characters"
    if parts.scheme == "https" and (problem := _tls_name_problem(parts.hostname)):
        return problem
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        return (
            "must be https:// unless the host is loopback or "
            "ALLOW_INSECURE_UPSTREAM=true (the token would travel in clear)"
        )
    return None


#: Every variable `parse_config` reads (tests/pure/test_config.py holds the two to each other).
KNOWN_VARIABLES = frozenset(
    [f"GRAFANA_CLOUD_{s.upper()}_{k}" for s in SIGNALS for k in ("URL", "ORG_ID", "TENANT_ID")]
    + ["GRAFANA_CLOUD_ACCESS_TOKEN", "GRAFANA_CLOUD_ACCESS_TOKEN_FILE", "PORT",
       "UPSTREAM_CONNECT_TIMEOUT_SECONDS", "UPSTREAM_TIMEOUT_SECONDS",
       "UPSTREAM_IDLE_TIMEOUT_SECONDS", "UPSTREAM_CA_FILE", "ALLOW_INSECURE_UPSTREAM",
       "MAX_REQUEST_BODY_BYTES", "MAX_CONNECTIONS", "MAX_WEBSOCKETS",
       "SHUTDOWN_DELAY_SECONDS", "SHUTDOWN_GRACE_SECONDS", "LOG_LEVEL", "LOG_FORMAT",
       "CLIENT_HEADER_TIMEOUT_SECONDS", "CLIENT_IDLE_TIMEOUT_SECONDS", "CLIENT_AUTH_FILE",
       "ROUTES_FILE", "WEBSOCKET_IDLE_TIMEOUT_SECONDS", "ALLOWED_ORIGINS", "ALLOWED_HOSTS",
       "METRICS_TENANT_LABEL", "UPSTREAM_PROXY_CREDENTIALS_FILE",
       "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
       *RATE_LIMIT_VARIABLES, *COMPRESSION_VARIABLES, *GRPC_VARIABLES]
)  # fmt: skip
#: The beginnings of our variables' names: another name beginning so is likely a typo.
OUR_PREFIXES = ("GRAFANA_CLOUD_", "UPSTREAM_", "CLIENT_", "MAX_", "SHUTDOWN_", "LOG_",
                "ALLOW_", "ALLOWED_", "ROUTES_", "WEBSOCKET_", "METRICS_", "RATE_LIMIT_",
                "OTLP_")  # fmt: skip
#: What Kubernetes' service links define (``<SERVICE>_SERVICE_HOST``,
#: ``<SERVICE>_PORT_80_TCP``...): a Service named ``upstream`` is not a typo.
_SERVICE_LINK = re.compile(
    r".*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each variable named like ours that we do not read, with
    the closest name we do: ``GRAFANA_CLOUD_PROMETEUS_URL is not a known
    variable; did you mean GRAFANA_CLOUD_PROMETHEUS_URL?``. Not an error: the
    environment may hold another program's variables."""
    found = []
    for name in sorted(env):
        if name in KNOWN_VARIABLES or not name.startswith(OUR_PREFIXES):
            continue
        if _SERVICE_LINK.fullmatch(name):
            continue
        close = difflib.get_close_matches(name, sorted(KNOWN_VARIABLES), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (docs/configuration.md lists them)"
        found.append(f"{name} is not a known variable{hint}")
    return found


def parse_config(env: Mapping[str, str]) -> Config:
    """Parse and validate the environment; raise `ConfigError` listing every problem.

    The token file is only named here; the caller reads it.
    """
    r = _Reader(env)
    allow_insecure = r.boolean("ALLOW_INSECURE_UPSTREAM", False)
    routes_file = r.get("ROUTES_FILE")
    signals = {}
    for name in SIGNALS:
        signal = _parse_signal(r, name, allow_insecure)
        if signal is not None:
            signals[name] = signal
    if routes_file is not None:
        if signals:
            r.problems.append(
                "ROUTES_FILE: replaces the built-in routes; unset the GRAFANA_CLOUD_<SIGNAL>_URL "
                "variables or ROUTES_FILE"
            )
    elif not signals and not any(
        r.get(f"GRAFANA_CLOUD_{s.upper()}_{k}") for s in SIGNALS for k in ("URL", "ORG_ID")
    ):
        r.problems.append(
            "GRAFANA_CLOUD_<SIGNAL>_URL: at least one signal must be configured "
            "(PROMETHEUS, LOKI, TEMPO, OTLP or PROFILES, each with its _ORG_ID)"
        )

    token: Secret | None = None
    token_file = r.get("GRAFANA_CLOUD_ACCESS_TOKEN_FILE")
    raw_token = env.get("GRAFANA_CLOUD_ACCESS_TOKEN")
    if raw_token is not None and raw_token.strip() and token_file is not None:
        r.problems.append(
            "GRAFANA_CLOUD_ACCESS_TOKEN_FILE: set only one of it and GRAFANA_CLOUD_ACCESS_TOKEN"
        )
    elif token_file is None:
        if (raw_token is None or not raw_token.strip()) and routes_file is not None:
            pass  # each route of the file names its own credentials
        elif raw_token is None or not raw_token.strip():
            r.problems.append(
                "GRAFANA_CLOUD_ACCESS_TOKEN: required (or GRAFANA_CLOUD_ACCESS_TOKEN_FILE)"
            )
        else:
            token, problem = parse_token(raw_token)
            if problem:
                r.problems.append(f"GRAFANA_CLOUD_ACCESS_TOKEN: {problem}")

    egress, egress_problems = parse_egress(env, r.get("UPSTREAM_PROXY_CREDENTIALS_FILE"))
    r.problems.extend(egress_problems)
    redis, redis_problems = parse_rate_limit_redis(env)
    r.problems.extend(redis_problems)
    compression, compression_problems = parse_compression(env, routes_file=routes_file is not None)
    r.problems.extend(compression_problems)
    signals = {
        name: attrs.evolve(s, gzip_level=compression.signal_level(name))
        for name, s in signals.items()
    }
    grpc, grpc_problems = parse_grpc_listen(
        env, has_otlp="otlp" in signals, routes_file=routes_file is not None
    )
    r.problems.extend(grpc_problems)
    config = Config(
        signals=signals,
        token=token,
        token_file=token_file,
        port=r.integer("PORT", 8085, low=1, high=65535),
        upstream_connect_timeout=r.number("UPSTREAM_CONNECT_TIMEOUT_SECONDS", 5.0),
        upstream_timeout=r.number("UPSTREAM_TIMEOUT_SECONDS", 300.0),
        upstream_idle_timeout=r.number("UPSTREAM_IDLE_TIMEOUT_SECONDS", 30.0),
        max_request_body_bytes=r.integer("MAX_REQUEST_BODY_BYTES", 52428800, low=0),
        shutdown_delay=r.number("SHUTDOWN_DELAY_SECONDS", 5.0, allow_zero=True),
        shutdown_grace=r.number("SHUTDOWN_GRACE_SECONDS", 25.0, allow_zero=True),
        upstream_ca_file=r.get("UPSTREAM_CA_FILE"),
        allow_insecure_upstream=allow_insecure,
        log_level=r.choice("LOG_LEVEL", "info", LOG_LEVELS),
        log_format=r.choice("LOG_FORMAT", "json", LOG_FORMATS),
        client_header_timeout=r.number("CLIENT_HEADER_TIMEOUT_SECONDS", 15.0),
        client_idle_timeout=r.number("CLIENT_IDLE_TIMEOUT_SECONDS", 75.0),
        max_connections=r.integer("MAX_CONNECTIONS", 10000, low=1),
        client_auth_file=r.get("CLIENT_AUTH_FILE"),
        routes_file=routes_file,
        max_websockets=r.integer("MAX_WEBSOCKETS", 100, low=0),
        websocket_idle_timeout=r.number("WEBSOCKET_IDLE_TIMEOUT_SECONDS", 600.0),
        allowed_origins=_parse_list(
            r, "ALLOWED_ORIGINS", _ORIGIN, "an origin like https://grafana.example.com"
        ),
        allowed_hosts=_parse_list(
            r, "ALLOWED_HOSTS", _HOST, "a host name or IP address (no port, no scheme)"
        ),
        metrics_tenant_label=r.boolean("METRICS_TENANT_LABEL", False),
        egress=egress,
        rate_limit_redis=redis,
        otlp_grpc_listen=grpc.listen,
        otlp_grpc_tls_files=grpc.tls_files,
        compression=compression,
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config
