"""Consumers' budgets shared by every replica through Redis, never depending
on it: what Redis does not answer within the deadline is decided by the
replica's own `LocalLimiter`.

Budget is taken from Redis in leases (`lgmt_proxy.limits.lease`): one Lua
script call reserves what a request needs and a few units more
for this replica, atomically, on Redis's clock (``TIME``), with the GCRA of
`budget`; the requests that follow spend the lease here, synchronously, and
a new lease is asked for ahead of exhaustion. Keys are named by consumer
(``lgmt:budget:{name}:requests`` and ``...:bytes``, the braces a cluster
hash tag) and expire when the budget is full again, so an idle consumer
holds nothing. The budgets travel with each call, so a reload applies at
once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lgmt_proxy.config.ratelimit import RedisSettings
from lgmt_proxy.limits.budget import ADMITTED, BYTES, REQUESTS, Budget, Limits, Verdict, too_large
from lgmt_proxy.limits.lease import Ask, Grant, Lease
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.resp import NotConnected, RedisError, RedisPool

_log = Logger(namespace="lgmt_proxy.budgets")

#: KEYS: the consumer's request and byte TATs (microseconds on Redis's clock).
#: ARGV: mode (lease or charge); then for requests, then bytes: microseconds
#: per unit, the tolerance, the units needed and the units wanted ("" for a
#: budget the consumer does not have). A lease charges nothing unless every
#: need fits, then takes up to what is wanted of what fits; a charge takes
#: the bytes wanted, never refused. Returns {requests granted, bytes
#: granted, the budget that refused or "", retry after, and each TAT ahead
#: of now} (times in microseconds).
SCRIPT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local names = {'requests', 'bytes'}
local b = {}
for i = 1, 2 do
  local a = 2 + (i - 1) * 4
  if ARGV[a] ~= '' then
    local v = tonumber(redis.call('GET', KEYS[i]))
    if v == nil or v < now then v = now end
    b[i] = {tat = v, per = tonumber(ARGV[a]), tol = tonumber(ARGV[a + 1]),
            need = tonumber(ARGV[a + 2]), want = tonumber(ARGV[a + 3]), take = 0}
  end
end
local refused, retry = '', 0
for i = 1, 2 do
  local x = b[i]
  if x and refused == '' then
    if ARGV[1] == 'charge' then
      x.take = x.want
    else
      local room = x.tol - (x.tat - now)
      local avail = math.floor((room + 0.001 * math.max(1, x.tol / 1000000)) / x.per)
      if avail < x.need then
        refused, retry = names[i], x.need * x.per - room
      else
        x.take = math.min(x.want, avail)
      end
    end
  end
end
local out = {0, 0, refused, string.format('%.17g', retry), '0', '0'}
for i = 1, 2 do
  local x = b[i]
  if x then
    if refused == '' and x.take > 0 then
      x.tat = x.tat + x.take * x.per
      redis.call('SET', KEYS[i], string.format('%.17g', x.tat),
                 'PX', math.ceil((x.tat - now) / 1000) + 1000)
      out[i] = x.take
    end
    out[4 + i] = string.format('%.17g', x.tat - now)
  end
end
return out
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


def _budget_args(budget: Budget | None, need: int, want: int) -> list[Any]:
    if budget is None:
        return [b"", b"", b"", b""]
    return [repr(1e6 / budget.rate).encode(), repr(budget.tolerance * 1e6).encode(), need, want]


def script_args(mode: bytes, name: str, limits: Limits, ask: Ask) -> list[Any]:
    """EVALSHA's arguments after the SHA: the key count, keys, ARGV."""
    return [
        2,
        *keys(name),
        mode,
        *_budget_args(limits.requests, ask.need_requests, ask.want_requests),
        *_budget_args(limits.bytes, ask.need_bytes, ask.want_bytes),
    ]


def grant_of(reply: Any) -> Grant:
    """The script's reply as a `Grant` (raises ValueError, TypeError or
    AttributeError on anything else)."""
    requests, nbytes, refused, retry, ahead_r, ahead_b = reply
    return Grant(
        int(requests),
        int(nbytes),
        refused.decode() or None,
        float(retry) / 1e6,
        float(ahead_r) / 1e6,
        float(ahead_b) / 1e6,
    )


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


class _Waiter:
    """A request that asked Redis: decided by the reply, or locally at its
    deadline."""

    __slots__ = ("decided", "length", "timer")

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.decided: Deferred[Verdict] = Deferred()
        self.timer: IDelayedCall | None = None


class SharedLimiter:
    """Budgets shared through Redis, in leases, within ``timeout`` seconds,
    else locally.

    `check` decides at once from the consumer's lease when it can (spend it,
    or refuse what Redis could not admit either), else asks Redis for that
    request's cost (and a lease more, unless a call is in flight already)
    and returns a Deferred that fires within the deadline and never fails. What
    is admitted is recorded in the local limiter too, so a fall back starts
    from what this replica spent. The state (shared or local) is a gauge; a
    warning is logged when a decision first falls back, and one when Redis
    answers again."""

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
        self._leases: dict[str, Lease] = {}
        #: Streamed body bytes beyond the lease not yet sent to Redis.
        self._pending: dict[str, tuple[int, Lease]] = {}
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

    def lease(self, name: str, limits: Limits) -> Lease:
        """The consumer's lease for these limits (a new one after a reload
        changed them)."""
        lease = self._leases.get(name)
        if lease is None or (lease.limits is not limits and lease.limits != limits):
            lease = self._leases[name] = Lease(limits)
        return lease

    # -- decisions ---------------------------------------------------------------

    def check(self, name: str, limits: Limits, length: int | None) -> Verdict | Deferred[Verdict]:
        """Admit one request (body of ``length`` bytes, None if unknown) or
        refuse it; charges both budgets when admitted."""
        if not limits.limited:
            return ADMITTED
        if too_large(limits, length):
            return self.local.check(name, limits, length)
        lease = self.lease(name, limits)
        now = self._clock.seconds()
        verdict = lease.take(now, length)
        if verdict is not None:
            if verdict.allowed:
                self.local.record(name, limits, length)
                if not lease.asking and lease.low(now):
                    self._send(name, lease, lease.top_up(), None)
            return verdict
        waiter = _Waiter(length)
        timer = waiter.timer = self._clock.callLater(self._timeout, self._late, name, lease, waiter)
        # A lease more only when no call is in flight: requests that come
        # together (a burst of new connections) take one lease, not one each.
        if not self._send(name, lease, lease.ask(length, not lease.asking), waiter):
            timer.cancel()
            self._metrics.ratelimit_backend_error("down")
            self._fell_back("down")
            return self.local.check(name, limits, length)
        return waiter.decided

    def check_now(self, name: str, limits: Limits, length: int | None) -> Verdict:
        """A decision that cannot wait: from the lease if it covers it (or
        the shared budget is known to refuse it), else this replica's own."""
        if limits.limited and not too_large(limits, length):
            verdict = self.lease(name, limits).take(self._clock.seconds(), length)
            if verdict is not None:
                if verdict.allowed:
                    self.local.record(name, limits, length)
                return verdict
        return self.local.check(name, limits, length)

    def _late(self, name: str, lease: Lease, waiter: _Waiter) -> None:
        """A waiter's deadline: decided locally."""
        self._metrics.ratelimit_backend_error("timeout")
        self._fell_back("timeout")
        waiter.decided.callback(self.local.check(name, lease.limits, waiter.length))

    def _send(self, name: str, lease: Lease, ask: Ask, waiter: _Waiter | None) -> bool:
        """One script call for ``lease``: a waiting request's (decided by the
        reply), or a top-up (``waiter`` None). False if no connection is up."""
        sent_at = self._clock.seconds()
        sent = self._eval(b"lease", name, lease.limits, ask)
        if sent is None:
            return False
        lease.asking += 1

        def answered(reply: Any) -> None:
            try:
                grant = grant_of(reply)
            except (ValueError, TypeError, AttributeError):
                failed(Failure(RedisError("ERR unexpected reply")))
                return
            lease.asking -= 1
            now = self._clock.seconds()
            if now - sent_at < self._timeout:
                # A late answer is used (its units are charged), but does
                # not make the budgets shared again: the next one may be.
                self._answered()
            lease.granted(sent_at, now, grant)
            if waiter is not None and not waiter.decided.called:
                verdict = grant.verdict
                if verdict.allowed:
                    lease.spend(waiter.length)
                    self.local.record(name, lease.limits, waiter.length)
                self._decided(waiter, verdict)

        def failed(failure: Failure) -> None:
            lease.asking -= 1
            reason = error_reason(failure.value)
            self._metrics.ratelimit_backend_error(reason)
            if waiter is not None and not waiter.decided.called:
                self._fell_back(reason)
                self._decided(waiter, self.local.check(name, lease.limits, waiter.length))

        sent.addCallbacks(answered, failed)
        return True

    @staticmethod
    def _decided(waiter: _Waiter, verdict: Verdict) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.decided.callback(verdict)

    def charge(self, name: str, limits: Limits, nbytes: int) -> None:
        """Body bytes already sent (a chunk of a streamed body): from the
        lease, and beyond it charged locally at once and in Redis by at most
        one call in flight per consumer (chunks that come meanwhile are
        added up)."""
        if limits.bytes is None or nbytes <= 0:
            return
        self.local.charge(name, limits, nbytes)
        lease = self.lease(name, limits)
        over = lease.streamed(self._clock.seconds(), nbytes)
        if over <= 0:
            return
        held, _ = self._pending.get(name, (0, lease))
        self._pending[name] = (held + over, lease)
        if name not in self._charging:
            self._send_charge(name)

    def _send_charge(self, name: str) -> None:
        nbytes, lease = self._pending.pop(name, (0, None))
        if nbytes <= 0 or lease is None:
            return
        sent_at = self._clock.seconds()
        sent = self._eval(b"charge", name, lease.limits, Ask(0, 0, 0, nbytes))
        if sent is None:
            return  # Redis down: the local limiter has it
        self._charging.add(name)

        def done(result: Any) -> None:
            self._charging.discard(name)
            if isinstance(result, Failure):
                self._metrics.ratelimit_backend_error(error_reason(result.value))
                return
            try:
                lease.seen(sent_at, grant_of(result))
            except (ValueError, TypeError, AttributeError):
                self._metrics.ratelimit_backend_error("error")
                return
            self._send_charge(name)

        sent.addBoth(done)

    def _eval(self, mode: bytes, name: str, limits: Limits, ask: Ask) -> Deferred[Any] | None:
        """EVALSHA, and EVAL when Redis does not hold the script yet
        (NOSCRIPT: after its restart, or on a new server)."""
        args = script_args(mode, name, limits, ask)
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
