"""Packaging: the library plus the twistd plugin (``twisted/plugins``).

``twisted.plugins`` is listed as a package but ships no ``__init__.py``: one
would overwrite Twisted's own. pip builds a wheel, so no install hook can
regenerate Twisted's plugin cache here; `make venv` and the Dockerfile do it
after installing (``list(getPlugins(IPlugin))``).
"""

from setuptools import setup

setup(
    name="lgmt-proxy",
    version="0.1.0",
    description="Credential-injecting reverse proxy to a Grafana Cloud LGTM stack",
    python_requires=">=3.11",
    packages=["lgmt_proxy", "twisted.plugins"],
    package_data={"twisted.plugins": ["lgmt_proxy_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7.0",
        "treq>=24.9.1",
        "txaio>=23.1.1",
        "prometheus-client>=0.20.0",
        "attrs>=23.2.0",
        "service-identity>=24.1.0",
        "pyOpenSSL>=24.2.1",
        "cryptography>=43.0.0",
        # CLIENT_AUTH_FILE is YAML (JSON is read by the same parser).
        "PyYAML>=6.0.1",
    ],
)
