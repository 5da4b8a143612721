"""Packaging: the library plus the twistd plugin (``twisted/plugins``).

``twisted.plugins`` is listed as a package but ships no ``__init__.py``: one
would overwrite Twisted's own. pip builds a wheel, so no install hook can
regenerate Twisted's plugin cache here; `make venv` and the Dockerfile do it
after installing (``list(getPlugins(IPlugin))``).
"""

from setuptools import find_packages, setup

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
    ],
)
