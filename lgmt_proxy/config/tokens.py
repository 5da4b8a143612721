"""The access token, from the environment or from a file that is re-read when
it changes (`GRAFANA_CLOUD_ACCESS_TOKEN_FILE`)."""

from __future__ import annotations

from typing import Any

from lgmt_proxy.config.settings import Secret, parse_token
from lgmt_proxy.config.watch import WatchedFile, read_bytes

_NAME = "GRAFANA_CLOUD_ACCESS_TOKEN_FILE"


def read_token_file(path: str) -> tuple[Secret | None, str | None]:
    """The token in ``path``, or a problem line naming the variable (never the value)."""
    data, problem = read_bytes(path)
    if data is None:
        return None, f"{_NAME}: {problem}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{_NAME}: {path} is not UTF-8 text"
    return parse_token(text, _NAME)


def _same(a: Secret, b: Secret) -> bool:
    return a.reveal() == b.reveal()


def token_source(token: Secret, path: str | None, reloads: Any = None) -> WatchedFile[Secret]:
    """A callable returning the current token, polled for rotation when ``path`` is set."""
    return WatchedFile(token, path, kind="token", load=read_token_file, reloads=reloads, same=_same)
