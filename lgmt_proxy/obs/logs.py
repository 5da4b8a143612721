"""Log output: one JSON object per line (or readable text) on a stream.

Lines are collected and written once per reactor turn: a write per request
cost about 4% of a small request's CPU.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import classImplements

ACCESS_NAMESPACE = "lgmt_proxy.access"

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

#: Event keys that are Twisted's bookkeeping, not fields worth printing.
_PRIVATE = frozenset(
    {
        "log_logger",
        "log_source",
        "log_format",
        "log_level",
        "log_namespace",
        "log_time",
        "log_failure",
        "log_io",
        "log_system",
        "log_trace",
        "log_text",
        "log_flattened",
        "log_legacy",
        "format",
        "message",
        "isError",
        "system",
        "time",
        "why",
        "failure",
    }
)


_second: list[Any] = [None, ""]


def _second_of(whole: int) -> str:
    """``whole`` (seconds since the epoch) as ISO 8601 UTC to the second;
    the last one formatted is reused."""
    if _second[0] != whole:
        _second[0] = whole
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    text: str = _second[1]
    return text


def _iso(t: float) -> str:
    """ISO 8601 UTC with milliseconds."""
    return f"{_second_of(int(t))}.{int(t * 1000) % 1000:03d}Z"


def _safe(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


_dumps = json.JSONEncoder(separators=(",", ":")).encode


_str = encode_basestring_ascii


#: The fields every access line has, in order (`record.Recorder` builds them so).
#: The duration in seconds to the microsecond (``%.6f``: a fifth of the cost
#: of ``round`` and ``repr`` together).
_ACCESS_HEAD = (
    '{"time":"%s.%03dZ","level":"info","msg":"request","method":%s,"path":%s,"upstream":%s,'
    '"status":%d,"duration":%.6f,"bytes_in":%d,"bytes_out":%d,"client":%s,'
    '"user_agent":%s,"request_id":%s'
)
_ACCESS_FIXED = 10


def access_as_json(access: dict[str, Any], t: float) -> str:
    """One access-log line: the request's fields at the top level.

    The ten fields every line has go through one format string (strings via
    the json module's C encoder); the few optional ones (error, consumer,
    tenant) are appended. The whole-dict encoder cost about a tenth of a
    small request's CPU; a loop over the fields half of that again."""
    a = access
    line = _ACCESS_HEAD % (
        _second_of(int(t)),
        int(t * 1000) % 1000,
        _str(a["method"]),
        _str(a["path"]),
        _str(a["upstream"]),
        a["status"],
        a["duration"],
        a["bytes_in"],
        a["bytes_out"],
        _str(a["client"]),
        _str(a["user_agent"]),
        _str(a["request_id"]),
    )
    if len(a) == _ACCESS_FIXED:
        return line + "}"
    parts = [line]
    for key, value in itertools.islice(a.items(), _ACCESS_FIXED, None):
        text = _str(value) if type(value) is str else _dumps(_safe(value))
        parts.append(f',"{key}":{text}')
    parts.append("}")
    return "".join(parts)


def access_as_text(access: dict[str, Any], t: float) -> str:
    a = access
    text = (
        f'{a["client"]} "{a["method"]} {a["path"]}" {a["status"]} '
        f"{a['bytes_out']} {a['duration']:.4f}s upstream={a['upstream']} id={a['request_id']}"
    )
    if a.get("error"):
        text += f" error={a['error']}"
    return f"{_iso(t)} info  {text}"


def event_as_json(event: dict[str, Any]) -> str:
    namespace = event.get("log_namespace", "")
    t = event.get("log_time") or time.time()
    if namespace == ACCESS_NAMESPACE:
        return access_as_json(event["access"], t)
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": _iso(t),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
    }
    # Twisted's own old-style lines (log.msg) arrive as "log_legacy": name
    # them for what they are.
    out["logger"] = "twisted" if namespace == "log_legacy" else namespace
    out["msg"] = formatEvent(event)
    for key, value in event.items():
        if key not in _PRIVATE and not key.startswith("log_"):
            out.setdefault(key, _safe(value))
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    return _dumps(out)


def event_as_text(event: dict[str, Any]) -> str:
    t = event.get("log_time") or time.time()
    if event.get("log_namespace") == ACCESS_NAMESPACE:
        return access_as_text(event["access"], t)
    level = event.get("log_level")
    name = level.name if isinstance(level, type(LogLevel.info)) else "info"
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += f" ({failure.type.__name__}: {failure.getErrorMessage()})"
    return f"{_iso(t)} {name:5} {text}"


class StreamObserver:
    """Formats events and writes them to ``stream``, batched per reactor turn
    when a scheduler (``callLater(0, f)``) is given, else at once."""

    def __init__(
        self,
        stream: IO[str],
        formatter: Callable[[dict[str, Any]], str],
        schedule: Callable[[Callable[[], None]], object] | None = None,
        access_formatter: Callable[[dict[str, Any], float], str] = access_as_json,
    ) -> None:
        self._stream = stream
        self._format = formatter
        self._format_access = access_formatter
        self._schedule = schedule
        self._pending: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = self._format(event)
        except Exception as e:  # a bad event must never stop logging
            line = json.dumps(
                {"level": "error", "msg": f"unformattable log event: {type(e).__name__}"}
            )
        self._add(line)

    def access(self, access: dict[str, Any], t: float) -> None:
        """An access-log line, formatted straight into the batch.

        The same line `event_as_json` makes from an access event, without the
        trip through twisted.logger's publisher and filter (measured at
        several percent of a small request's CPU)."""
        try:
            line = self._format_access(access, t)
        except Exception as e:  # a bad field must never fail the request
            line = json.dumps(
                {"level": "error", "msg": f"unformattable access line: {type(e).__name__}"}
            )
        self._add(line)

    def _add(self, line: str) -> None:
        self._pending.append(line + "\n")
        if self._schedule is None:
            self.flush()
        elif len(self._pending) == 1:
            self._schedule(self.flush)

    def flush(self) -> None:
        if self._pending:
            data, self._pending = "".join(self._pending), []
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):
                pass


# Not ``@implementer``: a class decorator keeps mypyc from compiling the class
# as a native class (attributes in a dict, methods called as Python objects).
classImplements(StreamObserver, ILogObserver)


def make_observer(
    stream: IO[str],
    *,
    log_format: str,
    log_level: str,
    schedule: Callable[[Callable[[], None]], object] | None = None,
) -> tuple[ILogObserver, StreamObserver]:
    """The filtering observer to install, and the stream observer (to flush)."""
    if log_format == "json":
        sink = StreamObserver(stream, event_as_json, schedule, access_as_json)
    else:
        sink = StreamObserver(stream, event_as_text, schedule, access_as_text)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[log_level])
    return FilteringLogObserver(sink, [predicate]), sink
