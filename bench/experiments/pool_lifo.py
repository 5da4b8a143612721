"""Experiment: reuse the most recently used idle upstream connection.

``HTTPConnectionPool.getConnection`` takes the oldest cached connection
(``pop(0)``) and ``_putConnection`` appends: a single client then cycles
through every connection a burst once opened (49 of them per run at one
client connection), so none stays idle long enough for the 90 s idle timeout
to close it and each request touches a cold connection. Popping from the end
(LIFO) keeps the hot one in use and lets the surplus age out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.web.client import HTTPConnectionPool, _RetryingHTTP11ClientProtocol


def getConnection(self: Any, key: Any, endpoint: Any) -> Any:
    connections = self._connections.get(key)
    while connections:
        connection = connections.pop()  # LIFO (Twisted: pop(0))
        self._timeouts[connection].cancel()
        del self._timeouts[connection]
        if connection.state == "QUIESCENT":
            if self.retryAutomatically:
                connection = _RetryingHTTP11ClientProtocol(
                    connection, lambda: self._newConnection(key, endpoint)
                )
            return defer.succeed(connection)
    return self._newConnection(key, endpoint)


HTTPConnectionPool.getConnection = getConnection  # type: ignore[method-assign]

import sys as _sys  # noqa: E402

print(f"bench experiment {__name__} loaded", file=_sys.stderr)
