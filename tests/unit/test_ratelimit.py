"""Token buckets: a burst at once, then the sustained rate, and per-key buckets with bounded memory."""

from __future__ import annotations

import pytest

from testpulse.domain.ratelimit import KeyedLimiter, TokenBucket

pytestmark = pytest.mark.unit


def takes(bucket: TokenBucket, n: int, now: float) -> int:
    return sum(bucket.take(now=now) for _ in range(n))


def test_bucket_allows_the_burst_at_once_and_no_more() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    start = bucket._stamp
    assert takes(bucket, 8, start) == 5


def test_bucket_refills_at_the_sustained_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    start = bucket._stamp
    assert takes(bucket, 5, start) == 5
    assert not bucket.take(now=start + 0.05)  # half a token
    assert bucket.take(now=start + 0.11)
    assert takes(bucket, 10, start + 0.42) == 3


def test_bucket_never_holds_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=1000, burst=3)
    assert takes(bucket, 10, bucket._stamp + 3600) == 3


def test_bucket_charges_the_cost() -> None:
    bucket = TokenBucket(rate=1, burst=10)
    now = bucket._stamp
    assert bucket.take(cost=7, now=now)
    assert not bucket.take(cost=4, now=now)
    assert bucket.take(cost=3, now=now)


def test_sustained_rate_over_a_long_run_matches_the_configuration() -> None:
    bucket = TokenBucket(rate=50, burst=10)
    start = bucket._stamp
    allowed = sum(bucket.take(now=start + i * 0.001) for i in range(10_000))  # 1000 attempts/s for 10 s
    assert 10 + 50 * 10 - 2 <= allowed <= 10 + 50 * 10 + 2


def test_keyed_limiter_gives_every_key_its_own_bucket() -> None:
    limiter = KeyedLimiter(rate=0.001, burst=2)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert [limiter.allow("b") for _ in range(3)] == [True, True, False]


def test_keyed_limiter_forgets_the_least_recently_seen_key_beyond_its_capacity() -> None:
    limiter = KeyedLimiter(rate=0.001, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.allow(key)
    assert not limiter.allow("a")  # a is now the most recent
    assert limiter.allow("d")  # evicts b
    assert len(limiter._buckets) == 3
    assert limiter.allow("b")  # b was forgotten: a fresh bucket
    assert not limiter.allow("a")  # a was kept (recently seen) and is still empty


@pytest.mark.parametrize("burst", [1, 400])
def test_fresh_bucket_starts_full(burst: int) -> None:
    bucket = TokenBucket(rate=1, burst=burst)
    assert takes(bucket, burst, bucket._stamp) == burst
