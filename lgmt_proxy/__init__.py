"""lgmt-proxy: a credential-injecting reverse proxy to a Grafana LGTM stack."""

__version__ = "0.1.0"
