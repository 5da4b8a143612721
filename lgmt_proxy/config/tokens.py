"""The access token, from the environment or from a file that is re-read when
it changes (`GRAFANA_CLOUD_ACCESS_TOKEN_FILE`, a route's ``token_file``)."""

from __future__ import annotations

from typing import Any

from lgmt_proxy.config.settings import Secret, parse_token
from lgmt_proxy.config.watch import WatchedFile, read_bytes

_NAME = "GRAFANA_CLOUD_ACCESS_TOKEN_FILE"


def read_token(path: str) -> tuple[Secret | None, str | None]:
    """The token in ``path``, or what is wrong with the file (never its content),
    for the caller to put after what the user wrote."""
    data, problem = read_bytes(path)
    if data is None:
        return None, problem
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text"
    return parse_token(text)


def read_token_file(path: str, name: str = _NAME) -> tuple[Secret | None, list[str]]:
    """The token in ``path``, or its problem line, which starts with ``name``:
    the variable (or the route's key) that named the file."""
    token, problem = read_token(path)
    return token, [f"{name}: {problem}"] if problem else []


def _same(a: Secret, b: Secret) -> bool:
    return a.reveal() == b.reveal()


def token_source(
    token: Secret, path: str | None, reloads: Any = None, *, name: str = _NAME
) -> WatchedFile[Secret]:
    """A callable returning the current token, polled for rotation when ``path``
    is set; a bad new file's problem starts with ``name``."""
    return WatchedFile(
        token,
        path,
        kind="token",
        load=lambda p: read_token_file(p, name),
        reloads=reloads,
        same=_same,
    )
