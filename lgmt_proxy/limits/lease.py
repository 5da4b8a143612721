"""Leases: a replica takes a consumer's shared budget from Redis a few units
at a time, and spends them locally. Pure state and arithmetic on a ``now``
the caller passes: no clock, no Redis (`lgmt_proxy.limits.shared` asks).

One script call reserves (charges in Redis) what a request needs plus a
lease of `lease_size` more units of each budget in use (`Lease.ask`); the
requests that follow spend the lease synchronously (`Lease.take`). A lease
is topped up ahead of exhaustion (`Lease.low`, `Lease.top_up`), so the
request path rarely waits, and forgotten when unused for `LEASE_SECONDS`.

Each reply also tells how far ahead the shared TAT is; kept as `tats` (a
lower bound: it is timed from when the call was sent, and only ever moves
later), it lets a request that Redis could not admit be refused here
without asking (`Lease.take`), which is what keeps a consumer far over its
budget from costing a round trip per refused request.

How far over: units are charged in Redis when leased, so over a long
window the replicas together never spend more than the budget; but units
leased before a window and spent in it add to what the window allows: at
most ``replicas x lease_size`` over the budget at any moment. Units leased
and not spent within `LEASE_SECONDS` are lost to the budget until it
refills (under, never over).
"""

from __future__ import annotations

from typing import Final

from lgmt_proxy.limits.budget import ADMITTED, BYTES, REQUESTS, Budget, Limits, Verdict, admit

#: How long leased units stay usable after the last grant.
LEASE_SECONDS: Final = 1.0
#: The share of a budget (its burst, or what refills in `LEASE_SECONDS` if
#: less) one lease takes beyond what a request needs.
LEASE_SHARE: Final = 0.1


def lease_size(budget: Budget | None) -> int:
    """Units of ``budget`` one lease takes beyond what is needed now: at
    least 1, a tenth of the burst or of a lease lifetime's refill."""
    if budget is None:
        return 0
    return max(1, int(LEASE_SHARE * min(budget.burst, budget.rate * LEASE_SECONDS)))


class Ask:
    """What one script call asks of each budget: ``need`` must fit (else
    nothing is charged and the call is a refusal), up to ``want`` is taken."""

    __slots__ = ("need_bytes", "need_requests", "want_bytes", "want_requests")

    def __init__(self, need_requests: int, want_requests: int, need_bytes: int, want_bytes: int):
        self.need_requests = need_requests
        self.want_requests = want_requests
        self.need_bytes = need_bytes
        self.want_bytes = want_bytes


class Grant:
    """A script call's reply: units granted, the refusal if any, and each
    budget's shared TAT as seconds ahead of Redis's now."""

    __slots__ = ("ahead_bytes", "ahead_requests", "bytes", "refused", "requests", "retry_after")

    def __init__(
        self,
        requests: int,
        bytes_: int,
        refused: str | None = None,
        retry_after: float = 0.0,
        ahead_requests: float = 0.0,
        ahead_bytes: float = 0.0,
    ) -> None:
        self.requests = requests
        self.bytes = bytes_
        self.refused = refused
        self.retry_after = retry_after
        self.ahead_requests = ahead_requests
        self.ahead_bytes = ahead_bytes

    @property
    def verdict(self) -> Verdict:
        """For the request whose need the call asked: admitted, or why not."""
        if self.refused is None:
            return ADMITTED
        return Verdict(False, self.retry_after, self.refused)


class Lease:
    """One consumer's leases on this replica, for one `Limits` (a reload
    that changes them starts a new lease)."""

    __slots__ = (
        "asking",
        "bytes_used",
        "expires",
        "fresh",
        "held_bytes",
        "held_requests",
        "limits",
        "size_bytes",
        "size_requests",
        "tat_bytes",
        "tat_requests",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.size_requests = lease_size(limits.requests)
        self.size_bytes = lease_size(limits.bytes)
        #: Units leased and not spent yet.
        self.held_requests = 0
        self.held_bytes = 0
        #: Until when held units may be spent.
        self.expires = 0.0
        #: Lower bounds of the shared TATs, on this replica's clock, and
        #: until when they count as seen (a body of no cost is admitted
        #: without asking only while they do: another replica may have
        #: overdrawn the byte budget since).
        self.tat_requests = 0.0
        self.tat_bytes = 0.0
        self.fresh = 0.0
        #: Script calls in flight.
        self.asking = 0
        #: Requests with a declared body have come: leases take bytes too.
        self.bytes_used = False

    def _expire(self, now: float) -> None:
        if now >= self.expires:
            self.held_requests = self.held_bytes = 0

    def take(self, now: float, length: int | None) -> Verdict | None:
        """Spend a request (and its declared body) from the lease: `ADMITTED`;
        a refusal when Redis could not admit it either; None when Redis must
        be asked."""
        self._expire(now)
        limits = self.limits
        covered = True
        requests = limits.requests
        if requests is not None and self.held_requests < 1:
            covered = False
            wait = admit(self.tat_requests, now, 1, requests)[1]
            if wait:
                return Verdict(False, wait, REQUESTS)
        body = limits.bytes
        if body is not None:
            cost = 0 if length is None else length
            short = cost - self.held_bytes
            # Also a body of no cost is refused while a streamed one has
            # overdrawn the budget.
            wait = admit(self.tat_bytes, now, max(0, short), body)[1]
            if wait:
                return Verdict(False, wait, BYTES)
            if short > 0 or now >= self.fresh:
                covered = False
        if not covered:
            return None
        self.spend(length)
        return ADMITTED

    def spend(self, length: int | None) -> None:
        """Charge a request to held units (covered, or just granted for it)."""
        if self.limits.requests is not None:
            self.held_requests -= 1
        if length and self.limits.bytes is not None:
            self.held_bytes -= length
            self.bytes_used = True

    def low(self, now: float) -> bool:
        """Time to top the lease up, ahead of need: under half a lease held,
        or half its life gone (so a busy consumer's lease never lapses
        under its requests; the shared TATs seen likewise), and room for
        some in the shared budget as last seen."""
        half = LEASE_SECONDS / 2
        ageing = now >= self.expires - half
        requests = self.limits.requests
        if (
            requests is not None
            and (ageing or 2 * self.held_requests < self.size_requests)
            and not admit(self.tat_requests, now, 1, requests)[1]
        ):
            return True
        body = self.limits.bytes
        if body is None or admit(self.tat_bytes, now, 1, body)[1]:
            return False
        if now >= self.fresh - half:
            return True
        return self.bytes_used and (ageing or 2 * self.held_bytes < self.size_bytes)

    def ask(self, length: int | None, more: bool) -> Ask:
        """The call of a request the lease does not cover: its whole cost
        must fit (what is held stays for the others); ``more``: a lease more
        is wanted too."""
        need_r = want_r = need_b = want_b = 0
        if self.limits.requests is not None:
            need_r = want_r = 1
            if more:
                want_r += max(0, self.size_requests - self.held_requests)
        if self.limits.bytes is not None:
            need_b = want_b = 0 if length is None else length
            if more and (self.bytes_used or need_b):
                want_b += max(0, self.size_bytes - self.held_bytes)
        return Ask(need_r, want_r, need_b, want_b)

    def top_up(self) -> Ask:
        """A call ahead of need: back to a whole lease of each budget in use
        (nothing more when it is whole: the reply alone renews it)."""
        want_r = want_b = 0
        if self.limits.requests is not None:
            want_r = max(0, self.size_requests - self.held_requests)
        if self.limits.bytes is not None and self.bytes_used:
            want_b = max(0, self.size_bytes - self.held_bytes)
        return Ask(0, want_r, 0, want_b)

    def granted(self, sent_at: float, now: float, grant: Grant) -> None:
        """A reply: units granted, and those held, are held `LEASE_SECONDS`
        more (calls go out only while requests spend the lease); the shared
        TATs seen (timed from ``sent_at``, so never later than they are)."""
        self._expire(now)
        self.held_requests += grant.requests
        self.held_bytes += grant.bytes
        self.expires = now + LEASE_SECONDS
        self.seen(sent_at, grant)

    def seen(self, sent_at: float, grant: Grant) -> None:
        """A reply's shared TATs."""
        self.fresh = max(self.fresh, sent_at + LEASE_SECONDS)
        self.tat_requests = max(self.tat_requests, sent_at + grant.ahead_requests)
        self.tat_bytes = max(self.tat_bytes, sent_at + grant.ahead_bytes)

    def streamed(self, now: float, nbytes: int) -> int:
        """Body bytes already sent (a chunk): from the lease first; returns
        what is beyond it, to charge in Redis (the shared TAT moved on here
        too, so the next requests see the overdraft at once)."""
        body = self.limits.bytes
        if body is None:
            return 0
        self._expire(now)
        self.bytes_used = True
        spent = min(nbytes, max(0, self.held_bytes))
        self.held_bytes -= spent
        over = nbytes - spent
        if over:
            self.tat_bytes = max(self.tat_bytes, now) + over / body.rate
        return over
