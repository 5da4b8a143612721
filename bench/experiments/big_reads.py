"""Experiment: read up to 256 KiB per recv() instead of Twisted's 64 KiB.

Bodies (1 MiB pushes, big downloads) then cross the proxy in a quarter of
the reactor iterations, recv/send calls and write registrations. In a real
change: set ``bufferSize`` on the proxy's own transports (the listener's
`tcp.Server` and the upstream `tcp.Client`), not globally.
"""

from __future__ import annotations

from twisted.internet import tcp

tcp.Connection.bufferSize = 256 * 1024

import sys as _sys  # noqa: E402

print(f"bench experiment {__name__} loaded", file=_sys.stderr)
