"""The resource tree: one `ProxyResource` per route prefix, the operations
resources beside them, and JSON 404s for everything else; and the route
table the data plane matches paths with, derived from it (`route_table`), so
there is one list of routes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from twisted.web.resource import IResource, Resource

from lgmt_proxy.dataplane.upstream import Upstream
from lgmt_proxy.rules.errors import json_error
from lgmt_proxy.rules.routes import DEFAULT_ROUTES, Local, Proxied, Route, RouteTable

#: What a path matches: a route to an upstream, or a resource answered here.
#: A string alias: compiled (mypyc), a generic class cannot be subscripted at
#: run time.
RouteMatch: TypeAlias = "Proxied[Upstream] | Local[IResource]"


def _json(request: Any, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    return body


class LocalResource(Resource):
    """A resource the proxy answers itself on the main port (`Local`)."""

    upstream_name = "none"
    #: Access-logged at debug only (probes and scrapes).
    quiet = False
    #: With client auth on, only for a consumer allowed it.
    consumers_only = False


class NotFound(LocalResource):
    """404 JSON: no route, and nothing sent upstream."""

    isLeaf = True

    def __init__(self, message: str = "no route for this path", upstream: str = "none") -> None:
        super().__init__()
        self._message = message
        self._body = json_error(message, upstream)
        self.upstream_name = upstream

    def getChild(self, path: bytes, request: Any) -> IResource:
        # Not a leaf only when a route nests under this one; a segment that
        # is none of its children ends the walk here (a leaf, so a later
        # segment cannot match a child: /a/x/c is not /a/c).
        return self.nested()

    def render(self, request: Any) -> bytes:
        return _json(request, 404, self._body)

    def nested(self) -> NotFound:
        """An inner segment below this prefix that no longer route matches."""
        return NotFound(self._message, self.upstream_name)


_NO_ROUTE = NotFound()


class Branch(Resource):
    """An inner path segment (``/api`` of ``/api/prom``) under no route: 404
    unless a child matches."""

    def getChild(self, path: bytes, request: Any) -> IResource:
        return _NO_ROUTE

    def render(self, request: Any) -> bytes:
        return _NO_ROUTE.render(request)


class ProxyResource(Resource):
    """The reverse proxy for one route prefix: ``route`` and ``upstream``.
    The data plane matches with the table `route_table` derives from the
    tree and streams the exchange itself; nothing renders this."""

    isLeaf = True

    def __init__(self, route: Route, upstream: Upstream) -> None:
        super().__init__()
        self.route = route
        self.upstream = upstream
        self.upstream_name = route.upstream_name
        self._rest: ProxyResource | None = None

    def getChild(self, path: bytes, request: Any) -> IResource:
        # Not a leaf only when a longer route nests under this one
        # (ROUTES_FILE): a segment that is none of its children stays with
        # this route, as a leaf, so a later segment cannot match a child
        # (/a/x/c/d/e is /a's, not /a/b/c/d/e's).
        rest = self._rest
        if rest is None:
            rest = self._rest = self.nested()
        return rest

    def nested(self) -> ProxyResource:
        """An inner segment below this prefix on the way to a longer route
        (``/a/b`` between ``/a`` and ``/a/b/c``): still this route."""
        return ProxyResource(self.route, self.upstream)


def build_root(
    upstreams: Mapping[str, Upstream],
    ops: Mapping[bytes, IResource],
    routes: tuple[Route, ...] = DEFAULT_ROUTES,
) -> Resource:
    """The root: route prefixes to proxies (or a 404 naming the signal that is
    off), operations resources, and a JSON 404 for anything else.

    The longest whole-segment prefix wins at every depth: an inner segment
    between two nested prefixes belongs to the shorter one (its ``nested``
    copy), so with ``/a`` and ``/a/b/c``, ``/a/b`` and ``/a/b/x`` go to ``/a``.
    """
    leaves: dict[tuple[bytes, ...], ProxyResource | NotFound] = {}
    for route in routes:
        upstream = upstreams.get(route.upstream_name)
        if upstream is None:
            leaves[tuple(route.segments)] = NotFound(
                f"signal {route.upstream_name} is not configured", route.upstream_name
            )
        else:
            leaves[tuple(route.segments)] = ProxyResource(route, upstream)
    paths = {key[:n] for key in leaves for n in range(1, len(key) + 1)}
    root = Branch()
    nodes: dict[tuple[bytes, ...], Resource] = {(): root}
    # Parents before children: each inner node knows its enclosing route.
    for path in sorted(paths, key=len):
        node: Resource | None = leaves.get(path)
        if node is None:
            enclosing = next(
                (leaves[path[:n]] for n in range(len(path) - 1, 0, -1) if path[:n] in leaves),
                None,
            )
            node = Branch() if enclosing is None else enclosing.nested()
        parent = nodes[path[:-1]]
        parent.isLeaf = False
        parent.putChild(path[-1], node)
        nodes[path] = node
    for name, resource in ops.items():
        root.putChild(name, resource)
    return root


def route_table(root: Resource) -> RouteTable[RouteMatch]:
    """The table the data plane matches with, read off the tree once: a
    `ProxyResource` (or its nested copy) is `Proxied`, a `LocalResource` and
    any other resource `Local`, a `Branch` matches nothing of its own."""
    entries: list[tuple[tuple[bytes, ...], RouteMatch | None]] = []

    def walk(node: Resource, path: tuple[bytes, ...]) -> None:
        for name, child in node.children.items():
            here = (*path, name)
            entries.append((here, _match(child)))
            if isinstance(child, Resource):
                walk(child, here)

    walk(root, ())
    return RouteTable(Local(_NO_ROUTE), entries)


def _match(resource: IResource) -> RouteMatch | None:
    if isinstance(resource, ProxyResource):
        return Proxied(resource.route, resource.upstream)
    if isinstance(resource, Branch):
        return None
    if isinstance(resource, LocalResource):
        return Local(resource, resource.upstream_name, resource.quiet, resource.consumers_only)
    return Local(resource)
