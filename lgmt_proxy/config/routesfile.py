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
        proxy: http://squid:3128    # its own forward proxy, or none: direct;
                                    # omit it for HTTPS_PROXY/HTTP_PROXY/NO_PROXY
        compression: gzip           # gzip OTLP and Loki push bodies, or none;
                                    # omit it for UPSTREAM_COMPRESSION

The format is ``schemas/routes.schema.json`` (see `schema`). Parsing is pure
(the document and the environment are passed in); only `load_routes_file`
reads files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from lgmt_proxy.config import schema
from lgmt_proxy.config.compression import OFF, Compression
from lgmt_proxy.config.egress import DIRECT, RouteProxy, parse_proxy_url
from lgmt_proxy.config.settings import (
    ConfigError,
    Secret,
    UpstreamConfig,
    parse_token,
    upstream_from_url,
    url_problem,
)
from lgmt_proxy.config.tokens import read_token
from lgmt_proxy.config.watch import read_bytes
from lgmt_proxy.rules.routes import Route

_NAME = "ROUTES_FILE"
#: ``tenant:`` value that sends each consumer's own tenant.
FROM_CONSUMER = "from_consumer"

#: Reads a token file: the token, or what is wrong with the file.
TokenReader = Callable[[str], tuple[Secret | None, str | None]]


@attrs.frozen
class RouteSpec:
    """One route of the file: where it matches, where it goes, what it sends."""

    route: Route
    upstream: UpstreamConfig
    token: Secret | None = None
    token_file: str | None = None

    @property
    def token_file_key(self) -> str:
        """What a problem with the token file starts with, at start and on reload."""
        return f"{_NAME}: route {self.upstream.name}: credentials.token_file"


def _token(
    creds: Mapping[str, Any], env: Mapping[str, str], read: TokenReader | None
) -> tuple[Secret | None, str | None, tuple[str, str] | None]:
    """``(token, token_file, (key, problem))``: a ``token_env`` is read from
    the environment passed in, a ``token_file`` by ``read`` (when given)."""
    if "token_file" in creds:
        path = creds["token_file"]
        if read is None:
            return None, path, None
        token, problem = read(path)
        return token, path, ("token_file", problem) if problem else None
    if "token_env" not in creds:
        return None, None, None
    name = creds["token_env"]
    value = env.get(name)
    if value is None:
        return None, None, ("token_env", f"{name} is not set")
    token, problem = parse_token(value)
    return token, None, ("token_env", f"{name}: {problem}") if problem else None


def parse_routes(
    doc: Any,
    env: Mapping[str, str],
    *,
    allow_insecure: bool,
    read_token_file: TokenReader | None = None,
    compression: Compression = OFF,
) -> list[RouteSpec]:
    """Validate a parsed routes document; `ConfigError` lists every problem,
    in the file's order.

    The shape is ``schemas/routes.schema.json``'s; what a schema cannot say
    (unique names and prefixes, the upstream URL's rules, the token's
    environment variable, the token file when ``read_token_file`` is given)
    is checked here, on the fields the schema passed. A route whose name is
    good and unique is called by it (``route mimir: upstream: ...``), any
    other by its place (``routes[2].name: ...``).
    """
    found = schema.load("routes").problems(doc)
    failed = {p.path for p in found}

    def ok(*path: str | int) -> bool:
        return not any(path[:n] in failed for n in range(len(path) + 1))

    problems = [(p.path, p.message) for p in found]
    items = doc.get("routes") if isinstance(doc, Mapping) else None
    items = items if isinstance(items, list) else []
    specs: list[RouteSpec] = []
    names: dict[str, int] = {}
    prefixes: set[str] = set()
    for i, item in enumerate(items):
        at: schema.Path = ("routes", i)
        if not ok(*at):
            continue
        name, prefix, url = item.get("name"), item.get("prefix"), item.get("upstream")
        if ok(*at, "name") and name in names:
            problems.append(((*at, "name"), f"{name} is used twice"))
        if ok(*at, "prefix") and prefix in prefixes:
            problems.append(((*at, "prefix"), f"{prefix} is used twice"))
        names[name] = names.get(name, 0) + 1
        prefixes.add(prefix)
        problem = ok(*at, "upstream") and url_problem(url, allow_insecure)
        if problem:
            problems.append(((*at, "upstream"), problem))
        creds = item.get("credentials", {"type": "none"})
        token, token_file, bad = None, None, None
        if ok(*at, "credentials"):
            readable = ok(*at, "credentials", "token_file")
            token, token_file, bad = _token(creds, env, read_token_file if readable else None)
        if bad:
            problems.append(((*at, "credentials", bad[0]), bad[1]))
        proxy: RouteProxy = None
        if "proxy" in item and ok(*at, "proxy"):
            if item["proxy"] == DIRECT:
                proxy = DIRECT
            # The problem never quotes the URL: it may carry credentials.
            elif isinstance(parsed := parse_proxy_url(item["proxy"]), str):
                problems.append(((*at, "proxy"), parsed))
            else:
                proxy = parsed
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
            proxy=proxy,
            gzip_level=compression.route_level(item.get("compression")),
        )
        route = Route(prefix.encode(), item.get("rewrite", prefix).encode(), name, from_consumer)
        specs.append(RouteSpec(route, upstream, token, token_file))
    if problems:
        named = {
            i: item["name"]
            for i, item in enumerate(items)
            if ok("routes", i, "name")
            and isinstance(item, Mapping)
            and names.get(item["name"]) == 1
        }

        def text(path: schema.Path, message: str) -> str:
            if len(path) > 1 and path[1] in named:
                rest = schema.where(path[2:])
                return f"{_NAME}: route {named[path[1]]}: {rest + ': ' if rest else ''}{message}"
            return schema.line(_NAME, path, message)

        raise ConfigError([text(*p) for p in schema.in_document_order(doc, problems)])
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


def load_routes_file(
    path: str, env: Mapping[str, str], *, allow_insecure: bool, compression: Compression = OFF
) -> list[RouteSpec]:
    """Read, parse and check the file and the token files it names."""
    data, problem = read_bytes(path)
    if data is None:
        raise ConfigError([f"{_NAME}: {problem}"])
    doc, problem = schema.read_document(data, toml=path.endswith(".toml"))
    if problem:
        raise ConfigError([f"{_NAME}: {path}: {problem}"])
    return parse_routes(
        doc, env, allow_insecure=allow_insecure, read_token_file=read_token, compression=compression
    )
