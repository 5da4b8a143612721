"""Packaging: the library plus the twistd plugin (``twisted/plugins``).

``twisted.plugins`` is listed as a package but ships no ``__init__.py``: one
would overwrite Twisted's own. pip builds a wheel, so no install hook can
regenerate Twisted's plugin cache here; `make venv` and the Dockerfile do it
after installing (``list(getPlugins(IPlugin))``).

``LGMT_PROXY_MYPYC=1`` builds the data plane (``COMPILED`` below) as C
extensions with mypyc, as the container image does; unset, the package is pure
Python, as `make venv` installs it: the reference, and the fallback wherever
no compiler is at hand. The compiled modules behave as their sources (CI runs
the whole suite on both builds, `make venv-compiled`); mypyc checks the types
again with mypy, so it needs mypy and the project's dependencies installed
(requirements-mypyc.lock) and a C compiler with Python's headers.
"""

import os

from setuptools import Extension, find_packages, setup

#: The modules compiled by mypyc: the per-request path (``clientauth.py``
#: for its per-request ``authenticate``). Left pure: the packages'
#: ``__init__``, the rest of configuration parsing and the schemas (run once
#: at start-up or on a file change), the Redis client (a command per lease,
#: not per request), the service, listeners, ops resources and the twistd
#: glue (start-up and shutdown).
COMPILED = [
    "lgmt_proxy/rules/compression.py",
    "lgmt_proxy/rules/dispatch.py",
    "lgmt_proxy/rules/errors.py",
    "lgmt_proxy/rules/facts.py",
    "lgmt_proxy/rules/grpc.py",
    "lgmt_proxy/rules/h2check.py",
    "lgmt_proxy/rules/h2frames.py",
    "lgmt_proxy/rules/headers.py",
    "lgmt_proxy/rules/policy.py",
    "lgmt_proxy/rules/routes.py",
    "lgmt_proxy/config/clientauth.py",
    "lgmt_proxy/limits/budget.py",
    "lgmt_proxy/limits/keeper.py",
    "lgmt_proxy/limits/lease.py",
    "lgmt_proxy/limits/local.py",
    "lgmt_proxy/limits/shared.py",
    "lgmt_proxy/io/compress.py",
    "lgmt_proxy/io/descriptor.py",
    "lgmt_proxy/io/reading.py",
    "lgmt_proxy/io/sending.py",
    "lgmt_proxy/io/timers.py",
    "lgmt_proxy/io/tlswire.py",
    "lgmt_proxy/dataplane/dispatcher.py",
    "lgmt_proxy/dataplane/drain.py",
    "lgmt_proxy/dataplane/exchange.py",
    "lgmt_proxy/dataplane/grpc_call.py",
    "lgmt_proxy/dataplane/grpc_flow.py",
    "lgmt_proxy/dataplane/grpc_heads.py",
    "lgmt_proxy/dataplane/grpc_server.py",
    "lgmt_proxy/dataplane/grpc_stream.py",
    "lgmt_proxy/dataplane/grpc_streams.py",
    "lgmt_proxy/dataplane/inbound.py",
    "lgmt_proxy/dataplane/parsing.py",
    "lgmt_proxy/dataplane/pool.py",
    "lgmt_proxy/dataplane/request.py",
    "lgmt_proxy/dataplane/response.py",
    "lgmt_proxy/dataplane/server.py",
    "lgmt_proxy/dataplane/tunnel.py",
    "lgmt_proxy/dataplane/upstream.py",
    "lgmt_proxy/obs/logs.py",
    "lgmt_proxy/obs/metrics.py",
    "lgmt_proxy/obs/record.py",
]


def compiled_extensions() -> list[Extension]:
    """The C extensions of ``COMPILED`` when ``LGMT_PROXY_MYPYC=1``, else none.

    mypy, run by mypyc from this directory, reads pyproject.toml's [tool.mypy]
    (the zope plugin included): the same checks as `make test`'s.
    """
    if os.environ.get("LGMT_PROXY_MYPYC", "") != "1":
        return []
    from mypyc.build import mypycify

    return mypycify(COMPILED, opt_level="3")


setup(
    name="lgmt-proxy",
    version="0.1.0",
    description="Credential-injecting reverse proxy to a Grafana Cloud LGTM stack",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    packages=[*find_packages(include=["lgmt_proxy", "lgmt_proxy.*"]), "twisted.plugins"],
    # The file formats' JSON Schemas: the code validates with them (schema.py).
    package_data={
        "lgmt_proxy.config": ["schemas/*.schema.json"],
        "twisted.plugins": ["lgmt_proxy_plugin.py"],
    },
    ext_modules=compiled_extensions(),
    # Ranges: a lower bound the code runs on, up to the next major release.
    # The exact versions built, tested and shipped are pinned, with hashes, in
    # requirements.lock (`make lock` regenerates it from these ranges).
    install_requires=[
        "twisted[tls]>=24.7.0,<27",
        "prometheus-client>=0.20.0,<1",
        "attrs>=23.2.0,<27",
        "service-identity>=24.1.0,<27",
        "pyOpenSSL>=24.2.1,<27",
        "cryptography>=43.0.0,<51",
        # The HTTP/1.1 parser of the data plane.
        "httptools>=0.6.4,<1",
        # CLIENT_AUTH_FILE is YAML (JSON is read by the same parser).
        "PyYAML>=6.0.1,<7",
        # CLIENT_AUTH_FILE and ROUTES_FILE are checked against their JSON
        # Schemas (lgmt_proxy/config/schema.py): every error, with its path.
        "jsonschema>=4.26.0,<5",
        # The reply parser of the Redis client of shared budgets
        # (lgmt_proxy/limits/resp.py, RATE_LIMIT_REDIS_URL).
        "hiredis>=3.0.0,<4",
        # OTLP over gRPC (OTLP_GRPC_LISTEN): the HTTP/2 state machine, sans-IO.
        "h2>=4.1.0,<5",
        # Host names as TLS checks them (IDNA 2008): lgmt_proxy/io/tls.py, and
        # config/settings.py refusing at start a name TLS could never verify.
        "idna>=3.7,<4",
    ],
)
