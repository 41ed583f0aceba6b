"""After a Redis blip every watched feed wants a store read at once; a node keeps only a few in
flight and backs off a store that fails, so a recovering database is not hit by every feed together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import socketio
from support.processes import wait_until

from testpulse.domain.protocol import ErrorCode, ProtocolError
from testpulse.domain.sessions import DetectionIn, Session, Status, StoredDetection
from testpulse.realtime import feeds as feeds_module
from testpulse.realtime.feeds import STORE_READS_MAX, Feeds

pytestmark = pytest.mark.unit

FEEDS = 5 * STORE_READS_MAX


class GatedLog:
    """An event log whose reads wait for the test to open a gate, counting how many wait at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.reads: list[str] = []
        self.gate = asyncio.Event()
        self.failures_left = 0

    async def append(self, session_id: str, items: Sequence[DetectionIn]) -> list[StoredDetection]:
        raise AssertionError("not used")

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            self.reads.append(session_id)
            if self.failures_left:
                self.failures_left -= 1
                raise ProtocolError(ErrorCode.UNAVAILABLE, "store down")
            return []
        finally:
            self.in_flight -= 1


class NoHistory:
    async def transitions(self, session_id: str) -> list[dict[str, Any]]:
        return []


def session(n: int) -> Session:
    now = datetime.now(UTC)
    return Session(id=f"s{n}", name=f"s{n}", status=Status.RUNNING, created_at=now, updated_at=now, last_seq=0)


def feeds_over(log: GatedLog, count: int = FEEDS) -> Feeds:
    feeds = Feeds(
        socketio.AsyncServer(async_mode="asgi"),
        log,
        NoHistory(),
        page_size=100,
        client_queue_max=100,
        gap_fill_delay=0.05,
        on_slow_consumer=lambda sid: None,
    )
    for n in range(count):
        feeds._feed(session(n))
    return feeds


async def wait_for(condition: Any) -> None:
    async def probe() -> bool:
        return bool(condition())

    await wait_until(probe, deadline=10, interval=0.005, what="the catch-ups' reads")


async def test_a_resync_of_every_feed_keeps_at_most_the_bound_of_store_reads_in_flight() -> None:
    log = GatedLog()
    feeds = feeds_over(log)
    feeds.resync()
    await wait_for(lambda: log.in_flight >= STORE_READS_MAX)
    for _ in range(20):  # give every other catch-up the chance to start a read it should not
        await asyncio.sleep(0)
    assert log.most_in_flight == STORE_READS_MAX
    log.gate.set()
    await wait_for(lambda: len(log.reads) == FEEDS)
    assert sorted(log.reads) == sorted(f"s{n}" for n in range(FEEDS)), "every feed read once"
    assert log.most_in_flight == STORE_READS_MAX


async def test_a_failing_store_is_retried_with_growing_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        delays.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(feeds_module.asyncio, "sleep", recorded_sleep)
    log = GatedLog()
    log.gate.set()
    log.failures_left = 5
    feeds = feeds_over(log, count=1)
    feeds.resync()
    await wait_for(lambda: len(log.reads) == 6)
    backoff = [d for d in delays if d >= feeds_module.RETRY_SECONDS_MIN]
    assert backoff == [0.5, 1.0, 2.0, 4.0, feeds_module.RETRY_SECONDS_MAX], delays
