"""The arithmetic of a consumer's budgets: pure functions, no clock, no state.

A budget is GCRA (the generic cell rate algorithm, a token bucket told as
time): its whole state is one number, the *theoretical arrival time* (TAT),
the moment the budget would be full again if nothing more came. A cost of
``n`` units moves the TAT ``n / rate`` seconds on; a request is admitted when
the TAT it would leave is at most ``burst / rate`` seconds ahead of now. One
float per budget is what makes the shared version one small Redis key, and
the same formulas run in the Lua script (`lgmt_proxy.limits.shared`).

Two budgets per consumer: requests (each costs 1) and request body bytes. A
body whose length is declared costs its length up front; a body of unknown
length (chunked) is admitted while the byte budget is not overdrawn and then
`charge`\\ d as it streams: the TAT may run past the tolerance, so the
consumer's next requests are refused until it has refilled.
"""

from __future__ import annotations

import math

import attrs

from lgmt_proxy.rules.errors import Refusal

REQUESTS = "requests"
BYTES = "bytes"


@attrs.frozen
class Budget:
    """``rate`` units per second, at most ``burst`` at once (both > 0)."""

    rate: float
    burst: float

    @property
    def tolerance(self) -> float:
        """How far ahead of now the TAT may be: a full burst, in seconds."""
        return self.burst / self.rate


@attrs.frozen
class Limits:
    """A consumer's budgets; None is no limit."""

    requests: Budget | None = None
    bytes: Budget | None = None

    @property
    def limited(self) -> bool:
        return self.requests is not None or self.bytes is not None


NO_LIMITS = Limits()


@attrs.frozen
class Verdict:
    """A decision: admitted, or which budget refused and for how long."""

    allowed: bool
    #: Seconds until the same request could be admitted (0 when admitted).
    retry_after: float = 0.0
    #: The budget that refused: REQUESTS or BYTES.
    budget: str | None = None
    #: The declared body is larger than the whole byte burst: it never fits.
    too_large: bool = False

    def retry_after_header(self) -> bytes:
        """``Retry-After`` in whole seconds, at least 1."""
        return b"%d" % max(1, math.ceil(self.retry_after))


ADMITTED = Verdict(True)

# Float sums (20 x 1/20) may land a hair past the tolerance: not a refusal.
_SLACK = 1e-9


def admit(tat: float, now: float, cost: float, budget: Budget) -> tuple[float, float]:
    """``(new_tat, 0)`` if ``cost`` fits now, else ``(tat, seconds until it
    would)``: the TAT is unchanged by a refusal."""
    new = max(tat, now) + cost / budget.rate
    over = new - now - budget.tolerance
    if over > _SLACK * max(1.0, budget.tolerance):
        return tat, over
    return new, 0.0


def charge(tat: float, now: float, cost: float, budget: Budget) -> float:
    """The TAT after ``cost`` units already spent (a streamed chunk): never
    refused, it may overdraw the budget."""
    return max(tat, now) + cost / budget.rate


def body_cost(length: int | None) -> int:
    """What a body costs up front: its declared length, 0 when unknown (then
    it is charged as it streams)."""
    return 0 if length is None else length


def too_large(limits: Limits, length: int | None) -> bool:
    """A declared body larger than the whole byte burst: no wait makes it fit."""
    return limits.bytes is not None and length is not None and length > limits.bytes.burst


def decide(
    tats: tuple[float, float], now: float, limits: Limits, length: int | None
) -> tuple[Verdict, tuple[float, float]]:
    """Both budgets at once, ``tats`` being (requests, bytes): admitted only
    if both admit, and then both are charged; a refusal changes neither."""
    if too_large(limits, length):
        return Verdict(False, 0.0, BYTES, too_large=True), tats
    new_requests, new_bytes = tats
    if limits.requests is not None:
        new_requests, wait = admit(tats[0], now, 1, limits.requests)
        if wait:
            return Verdict(False, wait, REQUESTS), tats
    if limits.bytes is not None:
        new_bytes, wait = admit(tats[1], now, body_cost(length), limits.bytes)
        if wait:
            return Verdict(False, wait, BYTES), tats
    return ADMITTED, (new_requests, new_bytes)


def refusal_message(consumer: str, verdict: Verdict, limits: Limits, length: int | None) -> str:
    """The error users read: which budget, and whether waiting can help."""
    if verdict.too_large and limits.bytes is not None:
        return (
            f"request body of {length} bytes is larger than the whole byte budget of "
            f"consumer {consumer} (burst_bytes {limits.bytes.burst:.0f}): it can never fit"
        )
    if verdict.budget == BYTES:
        return f"byte budget of consumer {consumer} exceeded"
    return f"rate limit of consumer {consumer} exceeded"


def budget_refusal(consumer: str, verdict: Verdict, limits: Limits, length: int | None) -> Refusal:
    """The answer to a request its consumer's budget refused: 429 with
    ``Retry-After``, or 413 for a body larger than the whole byte burst (no
    wait makes it fit, and a 429 would be retried for ever)."""
    message = refusal_message(consumer, verdict, limits, length)
    if verdict.too_large:
        return Refusal(413, message)
    return Refusal(429, message, ((b"Retry-After", verdict.retry_after_header()),))
