"""Token buckets: how often someone may ask for something.

One ``TokenBucket`` is a rate with a burst allowance; a ``Limiter`` keeps one bucket
per key (an identity, a sign-in name) for the HTTP transports, so REST, CalDAV and the
ICS feed share one allowance per identity. Plain code: the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict

# Keys a Limiter remembers; past that the least recently used go (a forgotten key
# starts again with a full bucket, which is what an idle one would have).
MAX_KEYS = 10_000


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "tick")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.tick = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        tokens = min(self.burst, self.tokens + (now - self.tick) * self.rate)
        self.tick = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def wait(self, now: float | None = None) -> float:
        """Seconds until a take would succeed (0: now), as of ``now`` (default: the
        last take)."""
        tokens = self.tokens if now is None else min(self.burst, self.tokens + (now - self.tick) * self.rate)
        return max(0.0, (1.0 - tokens) / self.rate)


class Limiter:
    """One TokenBucket per key."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float | None:
        """None when ``key`` may go ahead, else the seconds it should wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return None if bucket.take(now) else bucket.wait()

    def refused(self, key: str, now: float) -> float | None:
        """Seconds ``key`` must wait before its next take would succeed, or None
        (nothing spent: for counting failures only, then asking before the next try)."""
        bucket = self._buckets.get(key)
        wait = bucket.wait(now) if bucket is not None else 0.0
        return wait or None
