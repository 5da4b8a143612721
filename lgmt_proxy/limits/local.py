"""A replica's own budgets: what applies without Redis, and while Redis does
not answer."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from lgmt_proxy.limits.budget import BYTES, REQUESTS, Budget, Limits, Verdict, charge, decide


class LocalLimiter:
    """One TAT per consumer and budget, on an injected clock.

    A budget changed by a reload starts full (as the old token bucket did);
    the table holds at most two entries per consumer name ever seen.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._tats: dict[tuple[str, str], tuple[float, Budget]] = {}

    def _tat(self, name: str, kind: str, budget: Budget | None, now: float) -> float:
        held = self._tats.get((name, kind))
        if held is None or budget is None:
            return now
        if held[1] is not budget and held[1] != budget:  # `is`: no attrs __eq__ per request
            return now
        return held[0]

    def _store(self, name: str, kind: str, budget: Budget | None, tat: float) -> None:
        if budget is not None:
            self._tats[(name, kind)] = (tat, budget)

    def check(self, name: str, limits: Limits, length: int | None) -> Verdict:
        """Admit one request with a body of ``length`` bytes (None: unknown,
        charged as it streams), charging both budgets, or refuse it."""
        if not limits.limited:
            return Verdict(True)
        now = self._clock.seconds()
        tats = (
            self._tat(name, REQUESTS, limits.requests, now),
            self._tat(name, BYTES, limits.bytes, now),
        )
        verdict, (requests, body) = decide(tats, now, limits, length)
        if verdict.allowed:
            self._store(name, REQUESTS, limits.requests, requests)
            self._store(name, BYTES, limits.bytes, body)
        return verdict

    def charge(self, name: str, limits: Limits, nbytes: int) -> None:
        """Body bytes already sent (a chunk of a streamed body)."""
        if limits.bytes is None or nbytes <= 0:
            return
        now = self._clock.seconds()
        tat = self._tat(name, BYTES, limits.bytes, now)
        self._store(name, BYTES, limits.bytes, charge(tat, now, nbytes, limits.bytes))

    def record(self, name: str, limits: Limits, length: int | None) -> None:
        """A request admitted elsewhere (by the shared budget): charged here
        too, never refused, so that a fall back to this limiter starts from
        what this replica spent, not from a full burst."""
        now = self._clock.seconds()
        if limits.requests is not None:
            tat = self._tat(name, REQUESTS, limits.requests, now)
            self._store(name, REQUESTS, limits.requests, charge(tat, now, 1, limits.requests))
        if length:
            self.charge(name, limits, length)
