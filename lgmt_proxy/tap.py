"""``twistd lgmt-proxy``: options and `makeService`.

The only module that reads the environment, reads files at start-up or
imports the global reactor; everything below it has them passed in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage

from lgmt_proxy.config.clientauth import ClientAuth
from lgmt_proxy.config.ratelimit import RedisSettings
from lgmt_proxy.config.routesfile import RouteSpec
from lgmt_proxy.config.settings import (
    Config,
    ConfigError,
    Secret,
    parse_config,
    unknown_variables,
)
from lgmt_proxy.listeners import BadEndpoint


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--admin-listen ENDPOINT] [--sandbox]"
    longdesc = (
        "Credential-injecting reverse proxy to a Grafana Cloud (LGTM) stack. "
        "Configured by environment variables; see docs/configuration.md."
    )
    optFlags = [
        [
            "sandbox",
            None,
            "Point every signal at a built-in loopback echo upstream (no account needed).",
        ],
    ]
    optParameters = [
        [
            "listen",
            None,
            None,
            "Twisted server endpoint to listen on (overrides PORT), e.g. tcp:8085.",
        ],
        [
            "admin-listen",
            None,
            None,
            "Also serve /health, /ready and /metrics alone on this endpoint.",
        ],
    ]


def load(
    env: Mapping[str, str],
) -> tuple[Config, Secret | None, ClientAuth | None, list[RouteSpec] | None]:
    """Parse the environment and read the files it names; `ConfigError` lists every problem."""
    from lgmt_proxy.config.clientauth import load_client_auth
    from lgmt_proxy.config.routesfile import load_routes_file, tenant_problems
    from lgmt_proxy.config.tokens import read_token_file

    config = parse_config(env)
    token = config.token
    problems = []
    routes = None
    if config.routes_file is not None:
        try:
            routes = load_routes_file(
                config.routes_file,
                env,
                allow_insecure=config.allow_insecure_upstream,
                compression=config.compression,
            )
        except ConfigError as e:
            problems.extend(e.problems)
    if config.token_file is not None:
        token, found = read_token_file(config.token_file)
        problems.extend(found)
    client_auth = None
    if config.client_auth_file is not None:
        client_auth, found = load_client_auth(config.client_auth_file)
        problems.extend(found)
    if routes:
        problems.extend(tenant_problems(routes, config.client_auth_file is not None))
    if config.egress.credentials_file is not None:
        config, found = _with_proxy_credentials(config)
        problems.extend(found)
    redis = config.rate_limit_redis
    if redis is not None and redis.password_file is not None:
        config, found = _with_redis_password(config, redis)
        problems.extend(found)
    if config.otlp_grpc_tls_files is not None:
        from lgmt_proxy.config.servertls import load_server_tls

        server_tls, found = load_server_tls(*config.otlp_grpc_tls_files)
        problems.extend(found)
        config = attrs.evolve(config, otlp_grpc_tls=server_tls)
    if problems:
        raise ConfigError(problems)
    return config, token, client_auth, routes


def _read_secret_file(name: str, path: str) -> tuple[str | None, list[str]]:
    """A small secret file's text (read once at start-up), or the problem
    naming the variable and the path, never the content."""
    from lgmt_proxy.config.watch import read_bytes

    data, problem = read_bytes(path)
    if data is None:
        return None, [f"{name}: {problem}"]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError:
        return None, [f"{name}: {path} is not UTF-8 text"]


def _with_proxy_credentials(config: Config) -> tuple[Config, list[str]]:
    """The forward proxies with the credentials of UPSTREAM_PROXY_CREDENTIALS_FILE
    (``user:password``)."""
    path = config.egress.credentials_file
    assert path is not None
    name = "UPSTREAM_PROXY_CREDENTIALS_FILE"
    text, problems = _read_secret_file(name, path)
    if text is None:
        return config, problems
    egress = config.egress.with_credentials(text)
    if isinstance(egress, str):
        return config, [f"{name}: {path}: {egress}"]
    return attrs.evolve(config, egress=egress), []


def _with_redis_password(config: Config, redis: RedisSettings) -> tuple[Config, list[str]]:
    """The shared budgets' Redis with the password of RATE_LIMIT_REDIS_PASSWORD_FILE."""
    path = redis.password_file
    assert path is not None
    name = "RATE_LIMIT_REDIS_PASSWORD_FILE"
    text, problems = _read_secret_file(name, path)
    if text is None:
        return config, problems
    found = redis.with_password(text)
    if isinstance(found, str):
        return config, [f"{name}: {path}: {found}"]
    return attrs.evolve(config, rate_limit_redis=found), []


def _config_exit(problems: list[str], warnings: Sequence[str] = ()) -> SystemExit:
    # A likely typo first: it is often why a variable is missing.
    for line in warnings:
        print(f"lgmt-proxy: warning: {line}", file=sys.stderr)
    for line in problems:
        print(f"lgmt-proxy: configuration error: {line}", file=sys.stderr)
    return SystemExit(2)


def _system_bundle() -> bytes | None:
    """The platform's CA bundle (read once at start-up), so that
    UPSTREAM_CA_FILE adds to the system roots instead of replacing them."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                continue
    return None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from lgmt_proxy.dataplane.upstream import trust_root
    from lgmt_proxy.service import ProxyService

    env: dict[str, str] = dict(os.environ)
    # Read before the sandbox replaces anything: these are the user's own.
    typos = unknown_variables(env)
    sandbox_port: Any = None
    if options["sandbox"]:
        from lgmt_proxy.sandbox import sandbox_env, sandbox_site

        sandbox_port = reactor.listenTCP(0, sandbox_site(), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        env = sandbox_env(env, sandbox_port.getHost().port)
    try:
        config, token, client_auth, routes = load(env)
    except ConfigError as e:
        raise _config_exit(e.problems, typos) from None
    trust = None
    if config.upstream_ca_file:
        try:
            with open(config.upstream_ca_file, "rb") as f:
                trust = trust_root(f.read(), _system_bundle())
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or "no PEM certificate found"
            raise _config_exit(
                [f"UPSTREAM_CA_FILE: cannot use {config.upstream_ca_file}: {reason}"]
            ) from None
    try:
        return ProxyService(  # type: ignore[return-value]
            config,
            reactor,
            token=token,
            client_auth=client_auth,
            routes=routes,
            listen=options["listen"],
            admin_listen=options["admin-listen"],
            trust=trust,
            sandbox=sandbox_port is not None,
            warnings=typos,
        )
    except BadEndpoint as e:  # names its option
        raise _config_exit([str(e)]) from None
