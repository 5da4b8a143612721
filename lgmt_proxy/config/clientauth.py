"""Opt-in client authentication (``CLIENT_AUTH_FILE``): who may use the proxy,
for which routes and methods, and how fast.

The file (YAML, or JSON which YAML reads too) lists consumers::

    consumers:
      - name: kubecost
        token_sha256: 9f86d08...        # or  token: "..."
        allow:
          - methods: [GET, POST]
            paths: ["/prometheus/api/v1/query*", "/prometheus/api/v1/series"]
        rate_limit: {requests_per_second: 20, burst: 40}   # optional, and
                    # bytes_per_second / burst_bytes: request body bytes
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
The format is ``schemas/client-auth.schema.json`` (see `schema`); parsing is
pure; only `load_client_auth` touches the file.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from lgmt_proxy.config import schema
from lgmt_proxy.config.watch import read_bytes
from lgmt_proxy.limits.budget import NO_LIMITS, Budget, Limits
from lgmt_proxy.rules.policy import ALLOWED_METHODS

_NAME = "CLIENT_AUTH_FILE"


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
    #: Requests and body bytes per second (`rate_limit`).
    limits: Limits = NO_LIMITS
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


def _rules(allow: list[Mapping[str, Any]]) -> tuple[Rule, ...]:
    """One `Rule` per path; ``"*"`` (or a list holding it) means the seven
    methods the proxy forwards, never any other."""
    rules = []
    for item in allow:
        methods_raw = item.get("methods", "*")
        methods: frozenset[bytes]
        if methods_raw == "*" or "*" in methods_raw:
            methods = ALLOWED_METHODS
        else:
            methods = frozenset(m.upper().encode() for m in methods_raw)
        paths = item["paths"]
        for path in [paths] if isinstance(paths, str) else paths:
            rules.append(Rule(methods, _pattern(path)))
    return tuple(rules)


def _budget(raw: Mapping[str, Any], rate_key: str, burst_key: str) -> Budget | None:
    """A burst defaults to one second's worth; at least 1 (one request, one
    byte) is used, so a budget can always admit something."""
    if rate_key not in raw:
        return None
    rate = float(raw[rate_key])
    return Budget(rate, max(1.0, float(raw.get(burst_key, rate))))


def _limits(raw: Mapping[str, Any] | None) -> Limits:
    if raw is None:
        return NO_LIMITS
    return Limits(
        _budget(raw, "requests_per_second", "burst"),
        _budget(raw, "bytes_per_second", "burst_bytes"),
    )


def _tenants(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [] if raw is None else [raw]
    return tuple(dict.fromkeys(str(t) for t in items))


def _digest(item: Mapping[str, Any]) -> bytes:
    if "token" in item:
        return hashlib.sha256(item["token"].encode()).digest()
    return bytes.fromhex(item["token_sha256"])


def parse_client_auth(text: str | bytes, *, path: str | None = None) -> ClientAuth:
    """Parse and validate a client auth document; raise `ConfigError` listing
    every problem (one per line, each naming where, never a token), in the
    file's order. ``path`` is named in a syntax error.

    The shape is ``schemas/client-auth.schema.json``'s; what a schema cannot
    say (unique names and tokens) is checked here, on the consumers the
    schema passed, so one run reports both kinds.
    """
    from lgmt_proxy.config.settings import ConfigError

    data = text.encode() if isinstance(text, str) else text
    doc, problem = schema.read_document(data)
    if problem:
        raise ConfigError([f"{_NAME}: {path + ': ' if path else ''}{problem}"])
    found = schema.load("client-auth").problems(doc)
    failed = {p.path for p in found}
    bad = {p.path[1] for p in found if len(p.path) > 1}
    items = doc.get("consumers") if isinstance(doc, Mapping) else None
    items = items if isinstance(items, list) else []
    named = {
        i: item["name"]
        for i, item in enumerate(items)
        if isinstance(item, Mapping) and "name" in item and ("consumers", i, "name") not in failed
    }

    def label(path: schema.Path) -> schema.Path:
        # "consumer kubecost" once the name is known good: easier to find.
        if len(path) > 1 and path[1] in named:
            return (f"consumer {named[path[1]]}", *path[2:])
        return path

    problems = [(p.path, p.message) for p in found]
    consumers = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for i, item in enumerate(items):
        if i in bad:
            continue
        name, digest = item["name"], _digest(item)
        if name in names:
            problems.append((("consumers", i), "listed twice"))
        if digest in digests:
            problems.append((("consumers", i), "shares its token with another consumer"))
        names.add(name)
        digests.add(digest)
        limits = _limits(item.get("rate_limit"))
        rules, tenants = _rules(item["allow"]), _tenants(item.get("tenant"))
        consumers.append(Consumer(name, digest, rules, limits, tenants))
    if problems:
        ordered = schema.in_document_order(doc, problems)
        raise ConfigError([schema.line(_NAME, label(path), m) for path, m in ordered])
    return ClientAuth(tuple(consumers))


def load_client_auth(path: str) -> tuple[ClientAuth | None, list[str]]:
    """Read and parse the file: the consumers, or every problem line."""
    from lgmt_proxy.config.settings import ConfigError

    data, problem = read_bytes(path)
    if data is None:
        return None, [f"{_NAME}: {problem}"]
    try:
        return parse_client_auth(data, path=path), []
    except ConfigError as e:
        return None, e.problems
