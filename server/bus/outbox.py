"""The outbox: cross-node messages wait here, bounded and in order, until a publisher takes them;
and the receivers' filter that turns its at-least-once into once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from testpulse import metrics

log = logging.getLogger("testpulse.bus.broker")

Message = tuple[str, bytes]  # (channel, signed payload)


class Publisher(Protocol):
    """Sends messages to their channels, in the order given.

    Returning means every message went out. Raising (or not returning in time) means any prefix
    of them may have gone out: the outbox sends them all again, so receivers see a message at
    least once."""

    async def publish_many(self, messages: Sequence[Message]) -> None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    number: int  # position in put() order; what a finished batch is removed by
    message: Message


class Outbox:
    """Publishing never blocks a handler: put() queues, and publish_forever() sends batches of up
    to `batch_max` in order, retrying with jittered backoff while the publisher fails or hangs
    (each attempt bounded by `timeout`). Beyond `capacity` waiting messages the oldest is dropped,
    and after the next successful publish `after_overflow` runs (the cluster announces a resync).

    One batch is in flight at a time, and the next is taken only once the publisher has returned
    for the previous one; a failed batch is sent again from its first message still queued. So
    messages leave in put() order, and a repeat only ever repeats messages sent before it.
    A finished batch is removed by entry number, not by count: an overflow while it was in flight
    has already dropped its oldest entries, and counting would remove messages never sent."""

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
        self._queue: deque[_Entry] = deque()
        self._numbers = 0
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
        self._numbers += 1
        self._queue.append(_Entry(self._numbers, (channel, payload)))
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
                    await self._publisher.publish_many([entry.message for entry in batch])
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
            last_sent = batch[-1].number
            while self._queue and self._queue[0].number <= last_sent:
                self._queue.popleft()
            if not self._queue:
                self._empty.set()
            if self._overflowed:
                # Some messages were dropped while Redis was away: have every node re-read the store.
                self._overflowed = False
                self.after_overflow()


class RepeatFilter:
    """Receiving side: tells a message already handled from its sender, so that a batch the outbox
    sent again after a timeout or a failed pipeline (Redis may have taken it the first time) is
    handled once. Detections and status changes would survive repeats (feeds drop the seqs and
    changes they delivered already), but other emits, room changes, disconnects and callbacks
    would not; this filter covers every outbox message alike, whatever its method.

    Each message carries its sender (a host id, new for every process) and a number that sender
    assigns in put() order. Because the outbox sends in that order and only repeats what it sent
    before (see Outbox), a receiver sees each sender's numbers rise except for repeats, which is
    what a per-sender high-water mark drops. A receiver subscribed to some channels only sees a
    subsequence: still rising. Memory is one integer per sender, for the `senders_max` most
    recently heard (past that, the longest silent sender, likely a process that has exited, is
    forgotten)."""

    def __init__(self, senders_max: int = 1024) -> None:
        self._senders_max = senders_max
        self._last: OrderedDict[str, int] = OrderedDict()

    def is_repeat(self, sender: str, number: int) -> bool:
        last = self._last.get(sender)
        if last is not None and number <= last:
            return True
        self._last[sender] = number
        self._last.move_to_end(sender)
        if len(self._last) > self._senders_max:
            self._last.popitem(last=False)
        return False
