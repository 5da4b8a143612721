"""The one object the data plane asks about consumers' budgets: this
replica's own (`LocalLimiter`), or shared through Redis (`SharedLimiter`,
which falls back to that same local limiter)."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from lgmt_proxy.limits.budget import Limits, Verdict
from lgmt_proxy.limits.local import LocalLimiter
from lgmt_proxy.limits.shared import SharedLimiter


class BudgetKeeper:
    """Decide and charge; ``shared`` is None without RATE_LIMIT_REDIS_URL.

    A local decision is a `Verdict` at once (no Deferred per request); so is
    a shared one the consumer's lease covers; one that needs Redis is a
    Deferred that fires within the deadline and never fails."""

    def __init__(self, local: LocalLimiter, shared: SharedLimiter | None = None) -> None:
        self.local = local
        self.shared = shared

    def check(self, name: str, limits: Limits, length: int | None) -> Verdict | Deferred[Verdict]:
        """Admit a request whose body is ``length`` bytes (None: unknown,
        charged as it streams), or refuse it."""
        if self.shared is None or not limits.limited:
            return self.local.check(name, limits, length)
        return self.shared.check(name, limits, length)

    def check_now(self, name: str, limits: Limits, length: int | None) -> Verdict:
        """A decision that cannot wait for Redis (a WebSocket upgrade: the
        parser has already handed the connection over): the consumer's lease
        if it covers it, else this replica's own budgets."""
        if self.shared is None:
            return self.local.check(name, limits, length)
        return self.shared.check_now(name, limits, length)

    def charge(self, name: str, limits: Limits, nbytes: int) -> None:
        """Body bytes of a request of unknown length, as they stream."""
        if self.shared is None:
            self.local.charge(name, limits, nbytes)
        else:
            self.shared.charge(name, limits, nbytes)
