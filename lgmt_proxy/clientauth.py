"""Opt-in client authentication (``CLIENT_AUTH_FILE``): who may use the proxy,
for which routes and methods, and how fast.

The file (YAML, or JSON which YAML reads too) lists consumers::

    consumers:
      - name: kubecost
        token_sha256: 9f86d08...        # or  token: "..."
        allow:
          - methods: [GET, POST]
            paths: ["/prometheus/api/v1/query*", "/prometheus/api/v1/series"]
        rate_limit: {requests_per_second: 20, burst: 40}   # optional
        tenant: team-a        # optional, or a list: [team-a, team-b]
      - name: alloy
        token: "..."
        allow:
          - methods: [POST]
            paths: ["/api/prom/push", "/otlp/v1/*"]

``*`` in a path matches any characters, ``/`` included; paths are matched
against the raw request path (dot segments and encoded slashes were refused
before this runs); ``methods: "*"`` means the seven methods the proxy
forwards. Clients present ``Authorization: Bearer <token>`` or Basic with the
consumer's name as user. ``tenant`` is what a ``ROUTES_FILE`` route marked
``tenant: from_consumer`` sends as ``X-Scope-OrgID`` for this consumer.
Parsing is pure; only `load_client_auth` touches the file.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import yaml

from .policy import ALLOWED_METHODS
from .watch import read_bytes

_NAME = "CLIENT_AUTH_FILE"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_METHODS = frozenset(m.decode() for m in ALLOWED_METHODS)
#: Mimir's and Loki's tenant id characters (``|`` joins ids for federated queries).
_TENANT = re.compile(r"^[A-Za-z0-9!._*'()|-]{1,150}$")


@attrs.frozen
class Rule:
    methods: frozenset[bytes]
    pattern: re.Pattern[bytes]

    def allows(self, method: bytes, path: bytes) -> bool:
        if method not in self.methods:
            return False
        return self.pattern.fullmatch(path) is not None


@attrs.frozen(repr=False)
class Consumer:
    name: str
    digest: bytes
    rules: tuple[Rule, ...]
    rate: float | None = None
    burst: float = 1.0
    #: For ``tenant: from_consumer`` routes; the first is the default.
    tenants: tuple[str, ...] = ()

    def allows(self, method: bytes, path: bytes) -> bool:
        return any(rule.allows(method, path) for rule in self.rules)

    def __repr__(self) -> str:
        return f"<Consumer {self.name}>"


@attrs.frozen
class ClientAuth:
    consumers: tuple[Consumer, ...]
    _by_digest: dict[bytes, Consumer] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_digest", {c.digest: c for c in self.consumers})

    def authenticate(self, values: Sequence[bytes] | None) -> Consumer | None:
        """The consumer these ``Authorization`` values prove, or None.

        The SHA-256 digest of the presented secret is looked up in a dict:
        one hash and one lookup whatever the number of consumers, and the
        lookup's timing depends on the digest of what the client sent, which
        tells it nothing about any consumer's token.
        """
        if not values or len(values) != 1:
            return None
        scheme, _, credentials = values[0].strip().partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if not credentials:
            return None
        if scheme == b"bearer":
            return self._by_digest.get(hashlib.sha256(credentials).digest())
        if scheme == b"basic":
            try:
                user, sep, secret = base64.b64decode(credentials, validate=True).partition(b":")
            except ValueError:
                return None
            if not sep:
                return None
            found = self._by_digest.get(hashlib.sha256(secret).digest())
            if found is not None and found.name.encode() == user:
                return found
        return None


def _pattern(glob: str) -> re.Pattern[bytes]:
    parts = [re.escape(p.encode()) for p in glob.split("*")]
    return re.compile(b".*".join(parts))


def _rules(raw: Any, where: str, problems: list[str]) -> tuple[Rule, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}.allow: must be a non-empty list of {{methods, paths}}")
        return ()
    rules = []
    for i, item in enumerate(raw):
        here = f"{where}.allow[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{here}: must be a mapping with methods and paths")
            continue
        unknown = set(item) - {"methods", "paths"}
        if unknown:
            problems.append(f"{here}: unknown keys {', '.join(sorted(map(str, unknown)))}")
        methods_raw = item.get("methods", "*")
        methods: frozenset[bytes]
        if methods_raw == "*" or methods_raw == ["*"]:
            methods = ALLOWED_METHODS
        elif (
            isinstance(methods_raw, list)
            and methods_raw
            and all(isinstance(m, str) for m in methods_raw)
        ):
            bad = [m for m in methods_raw if m.upper() not in _METHODS]
            if bad:
                problems.append(f"{here}.methods: unknown {', '.join(bad)}")
            methods = frozenset(m.upper().encode() for m in methods_raw)
        else:
            problems.append(f"{here}.methods: must be a list of HTTP methods or '*'")
            continue
        paths = item.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if (
            not isinstance(paths, list)
            or not paths
            or not all(isinstance(p, str) and p.startswith("/") for p in paths)
        ):
            problems.append(f"{here}.paths: must be a list of paths starting with '/'")
            continue
        for path in paths:
            rules.append(Rule(methods, _pattern(path)))
    return tuple(rules)


def _rate(raw: Any, where: str, problems: list[str]) -> tuple[float | None, float]:
    if raw is None:
        return None, 1.0
    if not isinstance(raw, Mapping):
        problems.append(f"{where}.rate_limit: must be {{requests_per_second, burst}}")
        return None, 1.0
    rate = raw.get("requests_per_second")
    burst = raw.get("burst", rate)
    ok = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in (rate, burst)
    )
    if not ok:
        problems.append(
            f"{where}.rate_limit: requests_per_second and burst must be positive numbers"
        )
        return None, 1.0
    return float(rate), max(1.0, float(burst))  # type: ignore[arg-type]


def _tenants(raw: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str | int) and not isinstance(raw, bool) else raw
    if (
        not isinstance(items, list)
        or not items
        or not all(isinstance(t, str | int) and not isinstance(t, bool) for t in items)
        or not all(_TENANT.match(str(t)) for t in items)
    ):
        problems.append(
            f"{where}.tenant: a tenant id or a non-empty list of them "
            "(1-150 letters, digits or !-_.*'()|)"
        )
        return ()
    tenants = tuple(dict.fromkeys(str(t) for t in items))
    return tenants


def parse_client_auth(text: str | bytes) -> ClientAuth:
    """Parse and validate a client auth document; raise ValueError listing every
    problem (one per line, each naming where, never a token)."""
    from .config import ConfigError

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{_NAME}: not valid YAML or JSON{where}"]) from None
    problems: list[str] = []
    if (
        not isinstance(doc, Mapping)
        or not isinstance(doc.get("consumers"), list)
        or not doc["consumers"]
    ):
        raise ConfigError([f"{_NAME}: must hold a non-empty 'consumers' list"])
    consumers = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for i, item in enumerate(doc["consumers"]):
        where = f"{_NAME}: consumers[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not _CONSUMER_NAME.match(name):
            problems.append(f"{where}.name: 1-64 letters, digits, '.', '_' or '-'")
            continue
        where = f"{_NAME}: consumer {name}"
        if name in names:
            problems.append(f"{where}: listed twice")
        names.add(name)
        unknown = set(item) - {"name", "token", "token_sha256", "allow", "rate_limit", "tenant"}
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
        token, hashed = item.get("token"), item.get("token_sha256")
        if (token is None) == (hashed is None):
            problems.append(f"{where}: give exactly one of token and token_sha256")
            continue
        if token is not None:
            if not isinstance(token, str) or len(token) < 16 or any(c.isspace() for c in token):
                problems.append(f"{where}.token: at least 16 characters, no whitespace")
                continue
            digest = hashlib.sha256(token.encode()).digest()
        else:
            if not isinstance(hashed, str) or not _HEX64.match(hashed):
                problems.append(f"{where}.token_sha256: must be 64 hex digits")
                continue
            digest = bytes.fromhex(hashed)
        if digest in digests:
            problems.append(f"{where}: shares its token with another consumer")
        digests.add(digest)
        rules = _rules(item.get("allow"), where, problems)
        rate, burst = _rate(item.get("rate_limit"), where, problems)
        tenants = _tenants(item.get("tenant"), where, problems)
        consumers.append(Consumer(name, digest, rules, rate, burst, tenants))
    if problems:
        raise ConfigError(problems)
    return ClientAuth(tuple(consumers))


def load_client_auth(path: str) -> tuple[ClientAuth | None, str | None]:
    """Read and parse the file; a problem line (the first) on failure."""
    from .config import ConfigError

    data, problem = read_bytes(path)
    if data is None:
        return None, f"{_NAME}: {problem}"
    try:
        return parse_client_auth(data), None
    except ConfigError as e:
        return None, "\n".join(e.problems)


class RateLimiter:
    """A token bucket per consumer name, on an injected clock."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, float, float]] = {}

    def wait(self, consumer: Consumer) -> float:
        """0 if the request may go now, else the seconds until it could."""
        rate = consumer.rate
        if rate is None:
            return 0.0
        now = self._clock.seconds()
        key = consumer.name
        state = self._buckets.get(key)
        if state is None or state[2] != rate or state[3] != consumer.burst:
            tokens, last = consumer.burst, now
        else:
            tokens, last = state[0], state[1]
        tokens = min(consumer.burst, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now, rate, consumer.burst)
            return 0.0
        self._buckets[key] = (tokens, now, rate, consumer.burst)
        return (1.0 - tokens) / rate
