"""Files that are re-read when they change: the token file and the client
auth file. Kubernetes updates a mounted Secret by swapping a symlink, so the
path is stat'ed (following links) and re-read when device, inode, mtime or
size differ. A bad new file keeps the old value in force; its problems are
logged as the same lines a bad file prints at start-up, one per problem, and
a file fixed after that says it is in force again."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.logger import Logger

T = TypeVar("T")

_log = Logger(namespace="lgmt_proxy.watch")

#: The most a watched file may hold: tokens and client lists are small.
MAX_FILE_BYTES = 1024 * 1024


def read_bytes(path: str) -> tuple[bytes | None, str | None]:
    """A small file's bytes, or a short problem (never its content)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or type(e).__name__}"
    if len(data) > MAX_FILE_BYTES:
        return None, f"{path} is larger than {MAX_FILE_BYTES} bytes"
    return data, None


def stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class WatchedFile(Generic[T]):
    """The current value parsed from ``path``; `poll` reloads it on change.

    Callers take the value when a request starts, so in-flight requests finish
    with the old one and new requests use the new one at once.
    """

    def __init__(
        self,
        value: T,
        path: str | None,
        *,
        kind: str,
        load: Callable[[str], tuple[T | None, Sequence[str]]],
        reloads: Any = None,
        same: Callable[[T, T], bool] = lambda a, b: a == b,
    ) -> None:
        self._value = value
        self._path = path
        self._kind = kind
        self._load = load
        self._reloads = reloads
        self._same = same
        self._stamp = stamp(path) if path else None
        #: The last reload failed: the next good one says the file is back.
        self._failing = False

    def __call__(self) -> T:
        return self._value

    def poll(self) -> None:
        path = self._path
        if path is None:
            return
        now = stamp(path)
        if now == self._stamp:
            return
        self._stamp = now
        value, problems = self._load(path)
        if value is None:
            _log.error(
                "{kind} file {path} changed but cannot be used, the previous one stays "
                "in force: {count} problem(s) follow",
                kind=self._kind,
                path=path,
                count=len(problems),
            )
            for problem in problems:
                _log.error("{problem}", kind=self._kind, path=path, problem=problem)
            self._failing = True
            self._count("error")
            return
        if self._failing:
            # Fixed: say so even when it holds what was in force before the error.
            self._failing = False
            self._value = value
            _log.info("{kind} file {path} is valid again and in force", kind=self._kind, path=path)
            self._count("success")
        elif not self._same(value, self._value):
            self._value = value
            _log.info("{kind} reloaded from {path}", kind=self._kind, path=path)
            self._count("success")

    def _count(self, result: str) -> None:
        if self._reloads is not None:
            self._reloads.labels(self._kind, result).inc()
