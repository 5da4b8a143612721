"""The resource tree: one `ProxyResource` per route prefix, the operations
resources beside them, and JSON 404s for everything else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.web.resource import IResource, Resource

from .errors import json_error
from .routes import DEFAULT_ROUTES, Route
from .upstream import Upstream


def _json(request: Any, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    return body


class NotFound(Resource):
    """404 JSON: no route, and nothing sent upstream."""

    isLeaf = True
    upstream_name = "none"

    def __init__(self, message: str = "no route for this path", upstream: str = "none") -> None:
        super().__init__()
        self._body = json_error(message, upstream)
        self.upstream_name = upstream

    def render(self, request: Any) -> bytes:
        return _json(request, 404, self._body)


_NO_ROUTE = NotFound()


class Branch(Resource):
    """An inner path segment (``/api`` of ``/api/prom``): 404 unless a child matches."""

    def getChild(self, path: bytes, request: Any) -> IResource:
        return _NO_ROUTE

    def render(self, request: Any) -> bytes:
        return _NO_ROUTE.render(request)


class ProxyResource(Resource):
    """The reverse proxy for one route prefix.

    `server.ClientConnection` drives it while the body streams (``route``/``upstream``);
    ``render`` is never reached on the proxy's own `Site`.
    """

    isLeaf = True

    def __init__(self, route: Route, upstream: Upstream) -> None:
        super().__init__()
        self.route = route
        self.upstream = upstream
        self.upstream_name = route.signal

    def getChild(self, path: bytes, request: Any) -> IResource:
        # Not a leaf only when a longer route nests under this one
        # (ROUTES_FILE): anything else below stays with this route.
        return self

    def render(self, request: Any) -> bytes:
        # Only reachable from a plain twisted.web Site (not ProxyFactory).
        return _json(
            request, 500, json_error("proxy resource needs ProxyFactory", self.route.signal)
        )


def build_root(
    upstreams: Mapping[str, Upstream],
    ops: Mapping[bytes, IResource],
    routes: tuple[Route, ...] = DEFAULT_ROUTES,
) -> Resource:
    """The root: route prefixes to proxies (or a 404 naming the signal that is
    off), operations resources, and a JSON 404 for anything else."""
    root = Branch()
    for route in routes:
        upstream = upstreams.get(route.signal)
        leaf: IResource
        if upstream is None:
            leaf = NotFound(f"signal {route.signal} is not configured", route.signal)
        else:
            leaf = ProxyResource(route, upstream)
        *inner, last = route.segments
        parent: Resource = root
        for segment in inner:
            child = parent.children.get(segment)
            if child is None:
                child = Branch()
                parent.putChild(segment, child)
            child.isLeaf = False  # type: ignore[union-attr]
            parent = child  # type: ignore[assignment]
        existing = parent.children.get(last)
        if existing is not None and existing.children:  # type: ignore[union-attr]
            leaf.children.update(existing.children)  # type: ignore[attr-defined]
            leaf.isLeaf = False  # type: ignore[attr-defined]
        parent.putChild(last, leaf)
    for name, resource in ops.items():
        root.putChild(name, resource)
    return root
