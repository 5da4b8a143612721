"""Where consumers' budgets are shared: ``RATE_LIMIT_REDIS_URL`` and its
password and deadline, parsed by pure functions (``tap.py`` reads the
password file)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import attrs

from lgmt_proxy.config.secret import Secret

URL = "RATE_LIMIT_REDIS_URL"
PASSWORD_FILE = "RATE_LIMIT_REDIS_PASSWORD_FILE"
TIMEOUT = "RATE_LIMIT_REDIS_TIMEOUT_SECONDS"
VARIABLES = (URL, PASSWORD_FILE, TIMEOUT)
#: A decision Redis has not answered by then is taken locally: well under
#: the latency of a push, and many times a LAN round trip.
DEFAULT_TIMEOUT = 0.05


@attrs.frozen
class RedisSettings:
    """A Redis server; the password is a `Secret`. ``display`` is the URL
    without credentials, for logs."""

    host: str
    port: int = 6379
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: Secret | None = attrs.field(default=None, eq=False)
    password_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"

    def with_password(self, text: str) -> RedisSettings | str:
        """The password read from ``password_file`` (one line; a final
        newline is dropped), or the problem with it (never the value)."""
        value = text.rstrip("\r\n")
        if not value or "\n" in value:
            return "must hold the password on one line"
        return attrs.evolve(self, password=Secret(value))


def parse_redis_url(text: str) -> RedisSettings | str:
    """``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for
    TLS), or the problem with it, never quoting the password."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return "not a URL like redis://redis.example:6379/0"
    if parts.scheme not in ("redis", "rediss"):
        return "must start with redis:// or rediss://"
    if not parts.hostname:
        return "names no host"
    if parts.query or parts.fragment:
        return "takes no query or fragment"
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        return "the path must be a database number, like /0"
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    return RedisSettings(
        host=parts.hostname,
        port=port or 6379,
        tls=parts.scheme == "rediss",
        db=int(path) if path else 0,
        username=username,
        password=Secret(password) if password else None,
    )


def parse_rate_limit_redis(env: Mapping[str, str]) -> tuple[RedisSettings | None, list[str]]:
    """The shared budgets' Redis (None: budgets are per replica), and one
    problem line per bad variable."""

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    raw, password_file, raw_timeout = get(URL), get(PASSWORD_FILE), get(TIMEOUT)
    problems = []
    timeout = DEFAULT_TIMEOUT
    if raw_timeout is not None:
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and 0 < timeout <= 10):
            problems.append(f"{TIMEOUT}: must be a number of seconds > 0 and <= 10")
            timeout = DEFAULT_TIMEOUT
    if raw is None:
        for name in (PASSWORD_FILE, TIMEOUT):
            if get(name) is not None:
                problems.append(f"{name}: needs {URL}")
        return None, problems
    found = parse_redis_url(raw)
    if isinstance(found, str):
        return None, [*problems, f"{URL}: {found}"]
    if password_file is not None and found.password is not None:
        problems.append(f"{PASSWORD_FILE}: give the password in it or in {URL}, not both")
    return attrs.evolve(found, password_file=password_file, timeout=timeout), problems
