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

The format is ``schemas/routes.schema.json`` (see `schema`). Parsing is pure
(the document and the environment are passed in); only `load_routes_file`
reads files.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from lgmt_proxy.config import schema
from lgmt_proxy.config.settings import (
    ConfigError,
    Secret,
    UpstreamConfig,
    parse_token,
    upstream_from_url,
    url_problem,
)
from lgmt_proxy.config.watch import read_bytes
from lgmt_proxy.rules.routes import Route

_NAME = "ROUTES_FILE"
#: ``tenant:`` value that sends each consumer's own tenant.
FROM_CONSUMER = "from_consumer"


@attrs.frozen
class RouteSpec:
    """One route of the file: where it matches, where it goes, what it sends."""

    route: Route
    upstream: UpstreamConfig
    token: Secret | None = None
    token_file: str | None = None


def _token(
    creds: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[Secret | None, str | None, str | None]:
    """``(token, token_file, problem)``: a ``token_env`` is read here, from
    the environment passed in; a ``token_file`` later, by the token source."""
    if "token_file" in creds:
        return None, creds["token_file"], None
    if "token_env" not in creds:
        return None, None, None
    name = creds["token_env"]
    value = env.get(name)
    if value is None:
        return None, None, f"{name} is not set"
    token, problem = parse_token(value, name)
    return token, None, problem


def parse_routes(doc: Any, env: Mapping[str, str], *, allow_insecure: bool) -> list[RouteSpec]:
    """Validate a parsed routes document; `ConfigError` lists every problem.

    The shape is ``schemas/routes.schema.json``'s; what a schema cannot say
    (unique names and prefixes, the upstream URL's rules, the token's
    environment variable) is checked here, on the fields the schema passed.
    """
    found = schema.load("routes").problems(doc)
    failed = {p.path for p in found}

    def ok(*path: str | int) -> bool:
        return not any(path[:n] in failed for n in range(len(path) + 1))

    problems = [(p.path, p.message) for p in found]
    items = doc.get("routes") if isinstance(doc, Mapping) else None
    specs: list[RouteSpec] = []
    names: set[str] = set()
    prefixes: set[str] = set()
    for i, item in enumerate(items if isinstance(items, list) else []):
        at: schema.Path = ("routes", i)
        if not ok(*at):
            continue
        name, prefix, url = item.get("name"), item.get("prefix"), item.get("upstream")
        if ok(*at, "name") and name in names:
            problems.append(((*at, "name"), f"{name} is used twice"))
        if ok(*at, "prefix") and prefix in prefixes:
            problems.append(((*at, "prefix"), f"{prefix} is used twice"))
        names.add(name)
        prefixes.add(prefix)
        problem = ok(*at, "upstream") and url_problem(url, allow_insecure)
        if problem:
            problems.append(((*at, "upstream"), problem))
        creds = item.get("credentials", {"type": "none"})
        token, token_file, problem = None, None, None
        if ok(*at, "credentials"):
            token, token_file, problem = _token(creds, env)
        if problem:
            problems.append(((*at, "credentials", "token_env"), problem))
        if problems:
            continue
        tenant = item.get("tenant")
        from_consumer = tenant == FROM_CONSUMER
        user = str(creds.get("user", ""))
        upstream = upstream_from_url(
            name,
            url,
            user=user,
            tenant=None if tenant is None or from_consumer else str(tenant),
            auth=creds["type"],
        )
        route = Route(prefix.encode(), item.get("rewrite", prefix).encode(), name, from_consumer)
        specs.append(RouteSpec(route, upstream, token, token_file))
    if problems:
        problems.sort(key=lambda p: p[0][1] if len(p[0]) > 1 else -1)
        raise ConfigError([schema.line(_NAME, path, message) for path, message in problems])
    # Longest prefix first, so /api/v1/push wins over /api/v1 whatever the order.
    specs.sort(key=lambda s: -len(s.route.prefix))
    return specs


def tenant_problems(specs: list[RouteSpec], client_auth: bool) -> list[str]:
    """``tenant: from_consumer`` needs consumers, hence CLIENT_AUTH_FILE."""
    if client_auth:
        return []
    return [
        f"{_NAME}: route {spec.upstream.name}: tenant: {FROM_CONSUMER} needs CLIENT_AUTH_FILE"
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
