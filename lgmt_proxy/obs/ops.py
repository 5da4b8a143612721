"""Operations endpoints: /health, /ready and /metrics.

A separate resource from the proxy: it can be mounted beside the routes on the
main port and also served alone on an admin listener.
"""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import IResource, Resource

from lgmt_proxy.dataplane.resources import Branch, LocalResource, _json
from lgmt_proxy.obs.metrics import WithoutCreated
from lgmt_proxy.rules.errors import json_error

_OK = b'{"status":"ok"}\n'
_DRAINING = b'{"status":"draining"}\n'


@attrs.define
class Readiness:
    """Flipped to draining on SIGTERM so the Service stops sending new work."""

    draining: bool = False


class _Leaf(LocalResource):
    """GET and HEAD only; anything else gets a JSON 405."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)  # type: ignore[no-any-return]
        request.responseHeaders.setRawHeaders(b"Allow", [b"GET, HEAD"])
        return _json(request, 405, json_error("method not allowed", "none"))


class Health(_Leaf):
    quiet = True

    def render_GET(self, request: Any) -> bytes:
        return _json(request, 200, _OK)

    render_HEAD = render_GET


class Ready(_Leaf):
    quiet = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Any) -> bytes:
        if self._readiness.draining:
            return _json(request, 503, _DRAINING)
        return _json(request, 200, _OK)

    render_HEAD = render_GET


class Metrics(_Leaf):
    """The project's own registry in Prometheus text format, rendered in the
    reactor thread (no exporter thread). It lists consumer names: with client
    auth on, the main port serves it only to a consumer allowed ``GET
    /metrics`` (`server.ClientConnection`); ``--admin-listen`` serves it to all."""

    quiet = True
    consumers_only = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:
        body = generate_latest(WithoutCreated(self._registry))  # type: ignore[arg-type]
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"Content-Type", [CONTENT_TYPE_LATEST.encode()])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        return body


def ops_resources(readiness: Readiness, registry: CollectorRegistry) -> dict[bytes, IResource]:
    return {
        b"health": Health(),
        b"ready": Ready(readiness),
        b"metrics": Metrics(registry),
    }


def admin_root(readiness: Readiness, registry: CollectorRegistry) -> Resource:
    """The operations resources alone, for ``--admin-listen``; JSON 404 elsewhere."""
    root = Branch()
    for name, child in ops_resources(readiness, registry).items():
        root.putChild(name, child)
    return root
