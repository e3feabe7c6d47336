"""A connection's message-rate limit: a token bucket with a verdict per message (see docs/protocol.md).

Lives on the event loop, one per connection; not thread-safe.
"""

from __future__ import annotations

import time
from enum import Enum

TOKEN_BYTES = 4096
"""A message costs one rate-limit token per this many bytes or part (parsing costs by size)."""


class RateVerdict(Enum):
    OK = "ok"
    REFUSED = "refused"
    """Over the limit, the first time in a run: answered with a non-fatal ``rate_limited``."""
    DROPPED = "dropped"
    """Over the limit again in the same run: dropped without an answer."""
    ABUSE = "abuse"
    """Sustained (see :class:`MessageRateLimiter`): fatal ``rate_limited``."""


class MessageRateLimiter:
    """Token bucket over one connection's messages (WebSocket PINGs included): ``rate`` a
    second, ``burst`` at once; a message costs a token per :data:`TOKEN_BYTES` (or part).

    A message that finds its tokens takes them; one that does not is refused. A run of refusals
    ends when a message finds the bucket at least half full again. Over the limit is
    *sustained* (ABUSE) once a run has refused more than ``burst`` messages (a flood: closed
    after twice its burst, a few milliseconds), or still refuses one more than ``close_after_s``
    after it began (a client a little over the limit for long).
    """

    def __init__(self, rate: float, burst: int, close_after_s: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.close_after_s = close_after_s
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.refused_since: float | None = None
        self.refused = 0
        """Messages refused in the current run."""

    def take(self, now: float, size: int = 0) -> RateVerdict:
        """The verdict on a message of ``size`` bytes (characters) arriving at ``now``."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        cost = min(self.burst, float(max(1, -(-size // TOKEN_BYTES))))
        if self.tokens >= cost:
            if self.tokens >= self.burst / 2:
                self.refused_since, self.refused = None, 0
            self.tokens -= cost
            return RateVerdict.OK
        self.refused += 1
        if self.refused_since is None:
            self.refused_since = now
            return RateVerdict.REFUSED
        if self.refused > self.burst or now - self.refused_since > self.close_after_s:
            return RateVerdict.ABUSE
        return RateVerdict.DROPPED
