"""``ROUTES_FILE``: a route table for self-hosted stacks (Mimir, Loki, Tempo,
several tenants), replacing the built-in Grafana Cloud table.

YAML (or JSON) or TOML (by the ``.toml`` suffix)::

    routes:
      - name: mimir-push            # metric label; letters, digits, - and _
        prefix: /api/v1/push        # incoming, whole segments
        upstream: https://mimir.example.com
        rewrite: /api/v1/push       # upstream prefix (default: the prefix)
        credentials:
          type: basic               # basic, bearer or none
          user: "team-a"            # basic only
          token_env: MIMIR_TOKEN    # or token_file: /var/run/secrets/mimir
        tenant: team-a              # X-Scope-OrgID; omit to send none, or
                                    # from_consumer: the consumer's (CLIENT_AUTH_FILE)

Parsing is pure (the document and the environment are passed in); only
`load_routes_file` reads files.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from .config import ConfigError, Secret, SignalConfig, parse_token, signal_from_url, url_problem
from .routes import Route
from .watch import read_bytes

_NAME = "ROUTES_FILE"
_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+$")
_REWRITE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)*$")
#: ``tenant:`` value that sends each consumer's own tenant.
FROM_CONSUMER = "from_consumer"
_KEYS = {"name", "prefix", "upstream", "rewrite", "credentials", "tenant"}


@attrs.frozen
class RouteSpec:
    """One route of the file: where it matches, where it goes, what it sends."""

    route: Route
    signal: SignalConfig
    token: Secret | None = None
    token_file: str | None = None


def _credentials(
    raw: Any, where: str, env: Mapping[str, str], problems: list[str]
) -> tuple[str, str, Secret | None, str | None]:
    if raw is None:
        raw = {"type": "none"}
    if not isinstance(raw, Mapping):
        problems.append(f"{where}.credentials: must be a mapping with a type")
        return "none", "", None, None
    kind = raw.get("type")
    if kind not in ("basic", "bearer", "none"):
        problems.append(f"{where}.credentials.type: must be basic, bearer or none")
        return "none", "", None, None
    unknown = set(raw) - {"type", "user", "token_env", "token_file"}
    if unknown:
        problems.append(f"{where}.credentials: unknown keys {', '.join(sorted(map(str, unknown)))}")
    if kind == "none":
        if set(raw) - {"type"}:
            problems.append(f"{where}.credentials: type none takes no user or token")
        return "none", "", None, None
    user = raw.get("user", "")
    if kind == "basic":
        if not isinstance(user, str | int) or not str(user) or any(c in str(user) for c in ": \t"):
            problems.append(f"{where}.credentials.user: basic needs a user without ':' or spaces")
    elif "user" in raw:
        problems.append(f"{where}.credentials.user: bearer takes no user")
    token_env, token_file = raw.get("token_env"), raw.get("token_file")
    if (token_env is None) == (token_file is None):
        problems.append(f"{where}.credentials: give exactly one of token_env and token_file")
        return kind, str(user), None, None
    if token_env is not None:
        value = env.get(str(token_env))
        if value is None:
            problems.append(f"{where}.credentials.token_env: {token_env} is not set")
            return kind, str(user), None, None
        token, problem = parse_token(value, str(token_env))
        if problem:
            problems.append(f"{where}.credentials.token_env: {problem}")
        return kind, str(user), token, None
    if not isinstance(token_file, str) or not token_file.startswith("/"):
        problems.append(f"{where}.credentials.token_file: must be an absolute path")
        return kind, str(user), None, None
    return kind, str(user), None, token_file


def parse_routes(doc: Any, env: Mapping[str, str], *, allow_insecure: bool) -> list[RouteSpec]:
    """Validate a parsed routes document; `ConfigError` lists every problem."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("routes"), list) or not doc["routes"]:
        raise ConfigError([f"{_NAME}: must hold a non-empty 'routes' list"])
    problems: list[str] = []
    specs: list[RouteSpec] = []
    names: set[str] = set()
    prefixes: set[str] = set()
    for i, item in enumerate(doc["routes"]):
        where = f"{_NAME}: routes[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        unknown = set(item) - _KEYS
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
        name = item.get("name")
        if not isinstance(name, str) or not _ROUTE_NAME.match(name) or name == "none":
            problems.append(
                f"{where}.name: 1-40 lower-case letters, digits, '-' or '_' (not 'none')"
            )
            continue
        if name in names:
            problems.append(f"{where}.name: {name} is used twice")
        names.add(name)
        prefix = item.get("prefix")
        if (
            not isinstance(prefix, str)
            or not _PREFIX.match(prefix)
            or "/./" in prefix + "/"
            or "/../" in prefix + "/"
        ):
            problems.append(
                f"{where}.prefix: a path of whole segments like /api/v1/push (no trailing /)"
            )
            continue
        if prefix.split("/")[1] in ("health", "ready", "metrics"):
            problems.append(f"{where}.prefix: /health, /ready and /metrics belong to the proxy")
            continue
        if prefix in prefixes:
            problems.append(f"{where}.prefix: {prefix} is used twice")
        prefixes.add(prefix)
        rewrite = item.get("rewrite", prefix)
        if (
            not isinstance(rewrite, str)
            or not _REWRITE.match(rewrite)
            or "/../" in rewrite + "/"
            or "/./" in rewrite + "/"
        ):
            problems.append(f"{where}.rewrite: a path like /api/v1/push, or '' to drop the prefix")
            continue
        url = item.get("upstream")
        problem = url_problem(url, allow_insecure) if isinstance(url, str) else "must be a URL"
        if problem:
            problems.append(f"{where}.upstream: {problem}")
            continue
        kind, user, token, token_file = _credentials(item.get("credentials"), where, env, problems)
        tenant = item.get("tenant")
        from_consumer = tenant == FROM_CONSUMER
        if from_consumer:
            tenant = None
        if tenant is not None and (
            not isinstance(tenant, str | int)
            or not str(tenant)
            or any(ord(c) < 0x20 for c in str(tenant))
        ):
            problems.append(f"{where}.tenant: a non-empty string without control characters")
            continue
        assert isinstance(url, str)
        signal = signal_from_url(
            name, url, org_id=user, tenant_id=None if tenant is None else str(tenant), auth=kind
        )
        specs.append(
            RouteSpec(
                Route(prefix.encode(), rewrite.encode(), name, from_consumer),
                signal,
                token,
                token_file,
            )
        )
    if problems:
        raise ConfigError(problems)
    # Longest prefix first, so /api/v1/push wins over /api/v1 whatever the order.
    specs.sort(key=lambda s: -len(s.route.prefix))
    return specs


def tenant_problems(specs: list[RouteSpec], client_auth: bool) -> list[str]:
    """``tenant: from_consumer`` needs consumers, hence CLIENT_AUTH_FILE."""
    if client_auth:
        return []
    return [
        f"{_NAME}: route {spec.signal.name}: tenant: {FROM_CONSUMER} needs CLIENT_AUTH_FILE"
        for spec in specs
        if spec.route.tenant_from_consumer
    ]


def load_routes_file(path: str, env: Mapping[str, str], *, allow_insecure: bool) -> list[RouteSpec]:
    data, problem = read_bytes(path)
    if data is None:
        raise ConfigError([f"{_NAME}: {problem}"])
    try:
        if path.endswith(".toml"):
            doc = tomllib.loads(data.decode("utf-8"))
        else:
            doc = yaml.safe_load(data)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError):
        kind = "TOML" if path.endswith(".toml") else "YAML or JSON"
        raise ConfigError([f"{_NAME}: {path} is not valid {kind}"]) from None
    return parse_routes(doc, env, allow_insecure=allow_insecure)
