"""Rate limiting for one connection: a token bucket plus a strike count. Pure."""

from __future__ import annotations

import attrs


@attrs.define(eq=False)
class TokenBucket:
    """Allows `rate` messages per second on average and bursts of `burst`."""

    rate: float
    burst: float
    tokens: float = attrs.field(default=None)
    updated: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = self.burst

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@attrs.define(eq=False)
class Strikes:
    """Counts refusals in a sliding window; `add()` says when the limit is crossed."""

    limit: int
    window: float
    times: list[float] = attrs.field(factory=list)

    def add(self, now: float) -> bool:
        """Record one refusal; True when `limit` refusals fell within `window` seconds."""
        self.times.append(now)
        cutoff = now - self.window
        while self.times and self.times[0] <= cutoff:
            self.times.pop(0)
        return len(self.times) >= self.limit
