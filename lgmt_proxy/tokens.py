"""The access token, from the environment or from a file that is re-read
when it changes (Kubernetes updates a mounted Secret by swapping a symlink)."""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter
from twisted.logger import Logger

from .config import Secret, parse_token

_log = Logger(namespace="lgmt_proxy.tokens")

_NAME = "GRAFANA_CLOUD_ACCESS_TOKEN_FILE"


def read_token_file(path: str) -> tuple[Secret | None, str | None]:
    """The token in ``path``, or a problem line naming the variable (never the value)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(65536)
    except OSError as e:
        return None, f"{_NAME}: cannot read {path}: {e.strerror or type(e).__name__}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{_NAME}: {path} is not UTF-8 text"
    return parse_token(text, _NAME)


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class TokenSource:
    """Hands out the current token; `poll` re-reads the file when it changed.

    A request takes the token when it starts, so in-flight requests finish
    with the old one and new requests use the new one at once.
    """

    def __init__(
        self,
        token: Secret,
        path: str | None = None,
        *,
        registry: CollectorRegistry | None = None,
        reader: Callable[[str], tuple[Secret | None, str | None]] = read_token_file,
    ) -> None:
        self._token = token
        self._path = path
        self._reader = reader
        self._stamp = _stamp(path) if path else None
        self._reloads = (
            Counter(
                "proxy_config_reloads",
                "Reloads of configuration files, by file and result.",
                ["file", "result"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    def __call__(self) -> Secret:
        return self._token

    def poll(self) -> None:
        path = self._path
        if path is None:
            return
        stamp = _stamp(path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        token, problem = self._reader(path)
        if token is None:
            _log.error(
                "token file changed but was not usable, keeping the old token: {problem}",
                problem=problem,
            )
            self._count("error")
            return
        if token.reveal() != self._token.reveal():
            self._token = token
            _log.info("access token rotated from {path}", path=path)
            self._count("success")

    def _count(self, result: str) -> None:
        if self._reloads is not None:
            self._reloads.labels("token", result).inc()
