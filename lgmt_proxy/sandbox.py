"""The built-in echo upstream behind ``--sandbox``: it answers every request
with what it received (method, path, query, headers with the token masked), so
anyone can see exactly what the proxy would send to Grafana Cloud."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

SANDBOX_TOKEN = "sandbox-token-not-a-secret"


def mask_authorization(value: bytes) -> str:
    """``Basic <user>:***``: shows which org id was sent, never the token."""
    scheme, _, creds = value.partition(b" ")
    if scheme.lower() == b"basic":
        try:
            user = base64.b64decode(creds, validate=True).split(b":", 1)[0]
            return f"Basic {user.decode('utf-8', 'replace')}:***"
        except ValueError:
            pass
    return f"{scheme.decode('latin-1')} ***"


class Echo(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1")
            if name.lower() == b"authorization":
                headers[key] = [mask_authorization(v) for v in values]
            else:
                headers[key] = [v.decode("latin-1") for v in values]
        path, _, query = request.uri.partition(b"?")
        request.content.seek(0, 2)
        body = {
            "sandbox": True,
            "method": request.method.decode("latin-1"),
            "path": path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": headers,
            "body_bytes": request.content.tell(),
        }
        data = json.dumps(body, indent=2).encode() + b"\n"
        request.setHeader(b"Content-Type", b"application/json")
        return data


def sandbox_site() -> Site:
    site = Site(Echo())
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def sandbox_env(port: int) -> dict[str, str]:
    """The environment that points every signal at the echo upstream."""
    env = {"GRAFANA_CLOUD_ACCESS_TOKEN": SANDBOX_TOKEN}
    for signal in ("PROMETHEUS", "LOKI", "TEMPO", "OTLP", "PROFILES"):
        env[f"GRAFANA_CLOUD_{signal}_URL"] = f"http://127.0.0.1:{port}"
        env[f"GRAFANA_CLOUD_{signal}_ORG_ID"] = f"sandbox-{signal.lower()}"
    return env
