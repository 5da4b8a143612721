"""Compressed egress: ``UPSTREAM_COMPRESSION`` and ``UPSTREAM_COMPRESSION_LEVEL``,
parsed by a pure function. Which requests are compressed is
`rules.compression.compress_request`'s to say; this says for which upstreams
and at what level.

``UPSTREAM_COMPRESSION``: unset, ``none`` or ``off``: nothing is compressed;
``gzip``: the otlp and loki signals (and every ROUTES_FILE route without its
own ``compression``); or per signal, ``otlp=gzip,loki=none``.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

MODE = "UPSTREAM_COMPRESSION"
LEVEL = "UPSTREAM_COMPRESSION_LEVEL"
VARIABLES = (MODE, LEVEL)
#: The signals with push bodies worth compressing (Prometheus remote write
#: is snappy already; Tempo and Pyroscope take no such bodies through us).
SIGNALS = ("otlp", "loki")
#: Fast and already 5-10x on OTLP JSON; higher levels cost CPU for little.
DEFAULT_LEVEL = 1
_OFF = ("none", "off")


@attrs.frozen
class Compression:
    """Which upstreams get gzip'd push bodies, and the zlib level."""

    #: The signals whose push bodies are compressed.
    signals: frozenset[str] = frozenset()
    #: A ROUTES_FILE route without its own ``compression`` is compressed.
    routes: bool = False
    level: int = DEFAULT_LEVEL

    def signal_level(self, signal: str) -> int | None:
        """The level for ``signal``'s upstream; None: not compressed."""
        return self.level if signal in self.signals else None

    def route_level(self, setting: str | None) -> int | None:
        """The level for a ROUTES_FILE route whose ``compression`` is
        ``setting`` (None: not given, ``UPSTREAM_COMPRESSION=gzip`` decides)."""
        on = self.routes if setting is None else setting == "gzip"
        return self.level if on else None


OFF = Compression()


def parse_compression(
    env: Mapping[str, str], *, routes_file: bool = False
) -> tuple[Compression, list[str]]:
    """The settings and one problem line per bad variable (``routes_file``:
    ROUTES_FILE replaces the signals, so the per-signal form has nothing to
    name)."""
    problems: list[str] = []
    level = DEFAULT_LEVEL
    raw_level = env.get(LEVEL, "").strip()
    if raw_level:
        if raw_level.isascii() and raw_level.isdigit() and 1 <= int(raw_level) <= 9:
            level = int(raw_level)
        else:
            problems.append(f"{LEVEL}: must be a whole number from 1 to 9, got {raw_level!r}")
    raw = env.get(MODE, "").strip()
    low = raw.lower()
    if not raw or low in _OFF:
        return Compression(level=level), problems
    if low == "gzip":
        return Compression(frozenset(SIGNALS), True, level), problems
    if "=" not in raw:
        problems.append(f"{MODE}: must be gzip, none, or per signal like otlp=gzip,loki=none")
        return OFF, problems
    if routes_file:
        problems.append(
            f"{MODE}: per-signal values need the built-in routes; with ROUTES_FILE use gzip "
            "or none, or give a route its own compression"
        )
        return OFF, problems
    on: set[str] = set()
    seen: set[str] = set()
    for item in low.split(","):
        signal, _, value = (part.strip() for part in item.partition("="))
        if signal not in SIGNALS:
            problems.append(
                f"{MODE}: {signal!r} is not a signal with push bodies to compress "
                f"({' or '.join(SIGNALS)})"
            )
        elif value not in ("gzip", *_OFF):
            problems.append(f"{MODE}: {signal} must be gzip or none, got {value!r}")
        elif signal in seen:
            problems.append(f"{MODE}: {signal} is given twice")
        else:
            seen.add(signal)
            if value == "gzip":
                on.add(signal)
    if problems:
        return OFF, problems
    return Compression(frozenset(on), False, level), problems
