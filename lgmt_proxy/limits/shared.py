"""Consumers' budgets shared by every replica through Redis, never depending
on it: a decision Redis does not answer within the deadline is taken by the
replica's own `LocalLimiter`.

One Lua script per decision does the GCRA of `budget` atomically on Redis's
clock (``TIME``), both budgets at once; its keys are named by consumer
(``lgmt:budget:{name}:requests`` and ``...:bytes``, the braces a cluster hash
tag) and expire when the budget is full again, so an idle consumer holds
nothing. The budgets travel with each call, so a reload applies at once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lgmt_proxy.config.ratelimit import RedisSettings
from lgmt_proxy.limits.budget import BYTES, REQUESTS, Budget, Limits, Verdict, too_large
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.resp import NotConnected, RedisError, RedisPool

_log = Logger(namespace="lgmt_proxy.budgets")

#: KEYS: the consumer's request and byte TATs (microseconds on Redis's clock).
#: ARGV: mode (admit or charge); microseconds per request and the request
#: tolerance; microseconds per byte and the byte tolerance ("" for a budget
#: the consumer does not have); body bytes. Returns {admitted, retry after in
#: microseconds, the budget that refused}.
SCRIPT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function tat(key)
  local v = tonumber(redis.call('GET', key))
  if v == nil or v < now then return now end
  return v
end
local function store(key, value)
  redis.call('SET', key, string.format('%.17g', value),
             'PX', math.ceil((value - now) / 1000) + 1000)
end
local cost = tonumber(ARGV[6])
if ARGV[1] == 'charge' then
  if ARGV[4] ~= '' and cost > 0 then
    store(KEYS[2], tat(KEYS[2]) + cost * tonumber(ARGV[4]))
  end
  return {1, '0', ''}
end
local function admit(new, tolerance)
  local over = new - now - tolerance
  if over > 0.001 * math.max(1, tolerance / 1000000) then return over end
  return nil
end
local new_r, new_b
if ARGV[2] ~= '' then
  new_r = tat(KEYS[1]) + tonumber(ARGV[2])
  local over = admit(new_r, tonumber(ARGV[3]))
  if over then return {0, string.format('%.17g', over), 'requests'} end
end
if ARGV[4] ~= '' then
  new_b = tat(KEYS[2]) + cost * tonumber(ARGV[4])
  local over = admit(new_b, tonumber(ARGV[5]))
  if over then return {0, string.format('%.17g', over), 'bytes'} end
end
if new_r then store(KEYS[1], new_r) end
if new_b then store(KEYS[2], new_b) end
return {1, '0', ''}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT).hexdigest().encode()

#: Why a decision was taken locally (proxy_ratelimit_backend_errors_total).
REASONS = ("connect", "down", "timeout", "auth", "oom", "readonly", "error")


class BudgetMetrics(Protocol):
    def ratelimit_backend_error(self, reason: str) -> None: ...
    def ratelimit_shared(self, shared: bool) -> None: ...


class Pool(Protocol):
    """What the limiter needs of `lgmt_proxy.limits.resp.RedisPool`."""

    @property
    def ready(self) -> bool: ...
    def command(self, *args: Any) -> Deferred[Any] | None: ...


def keys(name: str) -> tuple[bytes, bytes]:
    """The consumer's two keys; names are ``[A-Za-z0-9_.-]`` (the schema)."""
    base = f"lgmt:budget:{{{name}}}:"
    return (base + REQUESTS).encode(), (base + BYTES).encode()


def _budget_args(budget: Budget | None) -> list[bytes]:
    if budget is None:
        return [b"", b""]
    return [repr(1e6 / budget.rate).encode(), repr(budget.tolerance * 1e6).encode()]


def script_args(mode: bytes, name: str, limits: Limits, nbytes: int) -> list[Any]:
    """EVALSHA's arguments after the SHA: the key count, keys, ARGV."""
    return [
        2,
        *keys(name),
        mode,
        *_budget_args(limits.requests),
        *_budget_args(limits.bytes),
        nbytes,
    ]


def verdict_of(reply: Any) -> Verdict:
    """The script's reply as a `Verdict`."""
    allowed, retry, budget = reply
    if allowed == 1:
        return Verdict(True)
    return Verdict(False, float(retry) / 1e6, budget.decode())


def error_reason(error: BaseException | None) -> str:
    """A Redis failure in a reason label: never the message itself."""
    if isinstance(error, NotConnected):
        return "connect"
    if isinstance(error, RedisError):
        kind = error.kind
        if kind in ("NOAUTH", "WRONGPASS"):
            return "auth"
        if kind == "OOM":
            return "oom"
        if kind == "READONLY":
            return "readonly"
    return "error"


class SharedLimiter:
    """Budgets decided by Redis, within ``timeout`` seconds, else locally.

    `check` always fires, within the deadline, and never fails. While Redis
    answers, what it admits is recorded in the local limiter too, so a fall
    back starts from what this replica spent. The state (shared or local)
    is a gauge; a warning is logged when a decision first falls back, and
    one when Redis answers again."""

    def __init__(
        self,
        clock: IReactorTime,
        pool: Pool,
        local: LocalLimiter,
        metrics: BudgetMetrics,
        *,
        timeout: float,
        where: str,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self.local = local
        self._metrics = metrics
        self._timeout = timeout
        self._where = where
        self.shared = False
        self._outage: str | None = None
        #: Streamed body bytes not yet sent to Redis, by consumer.
        self._pending: dict[str, tuple[int, Limits]] = {}
        self._charging: set[str] = set()
        metrics.ratelimit_shared(False)

    # -- state -------------------------------------------------------------------

    def up(self) -> None:
        """A connection is ready (the pool's ``on_up``)."""
        self._answered()

    def error(self, reason: str) -> None:
        """A connection attempt failed or dropped (the pool's ``on_error``)."""
        self._metrics.ratelimit_backend_error(reason)
        if not self._pool.ready:
            self._fell_back(reason)

    def _answered(self) -> None:
        if self.shared:
            return
        self.shared = True
        self._metrics.ratelimit_shared(True)
        if self._outage is not None:
            _log.warn(
                "shared budgets: Redis at {where} answers again; budgets are shared again",
                where=self._where,
            )
        self._outage = None

    def _fell_back(self, reason: str) -> None:
        if self.shared or self._outage is None:
            _log.warn(
                "shared budgets: Redis at {where} failed ({reason}); each replica "
                "decides alone until it answers again",
                where=self._where,
                reason=reason,
            )
            self._outage = reason
        if self.shared:
            self.shared = False
            self._metrics.ratelimit_shared(False)

    # -- decisions ---------------------------------------------------------------

    def check(self, name: str, limits: Limits, length: int | None) -> Deferred[Verdict]:
        """Admit one request (body of ``length`` bytes, None if unknown) or
        refuse it; charges both budgets when admitted."""
        if not limits.limited:
            return succeed(Verdict(True))
        if too_large(limits, length):
            return succeed(self.local.check(name, limits, length))
        sent = self._eval(b"admit", name, limits, length or 0)
        if sent is None:
            self._metrics.ratelimit_backend_error("down")
            self._fell_back("down")
            return succeed(self.local.check(name, limits, length))
        out: Deferred[Verdict] = Deferred()

        def expired() -> None:
            self._metrics.ratelimit_backend_error("timeout")
            self._fell_back("timeout")
            out.callback(self.local.check(name, limits, length))

        timer: IDelayedCall = self._clock.callLater(self._timeout, expired)

        def answered(reply: Any) -> None:
            if out.called:
                return  # too late: decided locally already
            timer.cancel()
            try:
                verdict = verdict_of(reply)
            except (ValueError, TypeError, AttributeError):
                failed(Failure(RedisError("ERR unexpected reply")))
                return
            self._answered()
            if verdict.allowed:
                self.local.record(name, limits, length)
            out.callback(verdict)

        def failed(failure: Failure) -> None:
            reason = error_reason(failure.value)
            self._metrics.ratelimit_backend_error(reason)
            if out.called:
                return
            timer.cancel()
            self._fell_back(reason)
            out.callback(self.local.check(name, limits, length))

        sent.addCallbacks(answered, failed)
        return out

    def charge(self, name: str, limits: Limits, nbytes: int) -> None:
        """Body bytes already sent (a chunk of a streamed body): charged
        locally at once, and in Redis by at most one call in flight per
        consumer (chunks that come meanwhile are added up)."""
        if limits.bytes is None or nbytes <= 0:
            return
        self.local.charge(name, limits, nbytes)
        held, _ = self._pending.get(name, (0, limits))
        self._pending[name] = (held + nbytes, limits)
        if name not in self._charging:
            self._send_charge(name)

    def _send_charge(self, name: str) -> None:
        nbytes, limits = self._pending.pop(name, (0, Limits()))
        if nbytes <= 0:
            return
        sent = self._eval(b"charge", name, limits, nbytes)
        if sent is None:
            return  # Redis down: the local limiter has it
        self._charging.add(name)

        def done(result: Any) -> None:
            self._charging.discard(name)
            if isinstance(result, Failure):
                self._metrics.ratelimit_backend_error(error_reason(result.value))
                return
            self._send_charge(name)

        sent.addBoth(done)

    def _eval(self, mode: bytes, name: str, limits: Limits, nbytes: int) -> Deferred[Any] | None:
        """EVALSHA, and EVAL when Redis does not hold the script yet
        (NOSCRIPT: after its restart, or on a new server)."""
        args = script_args(mode, name, limits, nbytes)
        sent = self._pool.command(b"EVALSHA", SCRIPT_SHA, *args)
        if sent is None:
            return None

        def noscript(failure: Failure) -> Any:
            if isinstance(failure.value, RedisError) and failure.value.kind == "NOSCRIPT":
                again = self._pool.command(b"EVAL", SCRIPT, *args)
                return failure if again is None else again
            return failure

        sent.addErrback(noscript)
        return sent


def build_shared(
    reactor: Any, settings: RedisSettings, local: LocalLimiter, metrics: BudgetMetrics, **pool: Any
) -> tuple[SharedLimiter, RedisPool]:
    """A limiter and its pool, wired to each other; ``pool.start()`` opens
    the connections. ``reactor`` is the TCP reactor and clock; ``pool``
    takes `RedisPool`'s options (backoff, size)."""
    limiter: SharedLimiter | None = None

    def on_error(reason: str) -> None:
        if limiter is not None:
            limiter.error(reason)

    def on_up() -> None:
        if limiter is not None:
            limiter.up()

    redis = RedisPool(reactor, reactor, settings, on_error=on_error, on_up=on_up, **pool)
    limiter = SharedLimiter(
        reactor, redis, local, metrics, timeout=settings.timeout, where=settings.display
    )
    return limiter, redis
