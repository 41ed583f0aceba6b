"""Token buckets: per-connection event limits and per-address handshake limits."""

from __future__ import annotations

import time
from collections import OrderedDict


class TokenBucket:
    """Allows `burst` events at once and `rate` per second sustained."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, cost: float = 1.0, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True


class KeyedLimiter:
    """One bucket per key (a client address), keeping at most `max_keys` so that a scan of spoofed
    addresses cannot grow memory; the least recently seen key is forgotten first."""

    def __init__(self, rate: float, burst: int, max_keys: int = 65_536) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, key: str) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()
