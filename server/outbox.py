"""The outbox: cross-node messages wait here, bounded and in order, until a publisher takes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from server import metrics

log = logging.getLogger("testpulse.broker")

Message = tuple[str, bytes]  # (channel, signed payload)


class Publisher(Protocol):
    """Sends messages to their channels, in the order given.

    Returning means every message went out. Raising (or not returning in time) means any prefix
    of them may have gone out: the outbox sends them all again, so receivers see a message at
    least once."""

    async def publish_many(self, messages: Sequence[Message]) -> None: ...


class Outbox:
    """Publishing never blocks a handler: put() queues, and publish_forever() sends batches of up
    to `batch_max` in order, retrying with jittered backoff while the publisher fails or hangs
    (each attempt bounded by `timeout`). Beyond `capacity` waiting messages the oldest is dropped,
    and after the next successful publish `after_overflow` runs (the cluster announces a resync)."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        capacity: int,
        timeout: float,
        backoff_max: float,
        batch_max: int = 512,
        backoff_initial: float = 0.05,
        after_overflow: Callable[[], None] = lambda: None,
    ) -> None:
        self._publisher = publisher
        self._capacity = capacity
        self._timeout = timeout
        self._backoff_max = backoff_max
        self._batch_max = batch_max
        self._backoff_initial = backoff_initial
        self.after_overflow = after_overflow
        self._queue: deque[Message] = deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._overflowed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, channel: str, payload: bytes) -> None:
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self._overflowed = True
            metrics.REDIS_PUBLISH_FAILURES.inc()
        self._queue.append((channel, payload))
        self._empty.clear()
        self._ready.set()

    async def flush(self, grace_seconds: float) -> bool:
        """Wait until the outbox is empty (used when draining); False if it could not empty in time."""
        if self._queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), grace_seconds)
        return not self._queue

    async def publish_forever(self) -> None:
        backoff = self._backoff_initial
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = [self._queue[i] for i in range(min(len(self._queue), self._batch_max))]
            try:
                async with asyncio.timeout(self._timeout):
                    await self._publisher.publish_many(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: keep the messages, retry
                metrics.REDIS_PUBLISH_FAILURES.inc(len(batch))
                log.warning("publishing %d messages failed (%s); retrying", len(batch), exc)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, self._backoff_max)
                continue
            backoff = self._backoff_initial
            metrics.REDIS_PUBLISHED.inc(len(batch))
            for _ in batch:
                self._queue.popleft()
            if not self._queue:
                self._empty.set()
            if self._overflowed:
                # Some messages were dropped while Redis was away: have every node re-read the store.
                self._overflowed = False
                self.after_overflow()
