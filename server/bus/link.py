"""What every Redis topology shares: the set of channels this node needs, one pub/sub connection
that holds a subset of them, and the backoff by which a lost connection is tried again.

The guarantee the bus builds on: a channel counts as subscribed only once Redis confirmed it on a
connection that is up, and whenever a connection is lost or rebuilt the subscription set asks for
a catch-up from the store once every needed channel is confirmed again. Single Redis, Sentinel and
Redis Cluster (single.py, sentinel.py, cluster.py) only decide which connections exist and which
channels each holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

log = logging.getLogger("testpulse.bus.broker")

LISTEN_SLICE_BUSY = 0.01  # seconds per pub/sub read while subscriptions are pending
LISTEN_SLICE_IDLE = 0.05  # otherwise; also the longest a first join into a new room waits to subscribe

Dispatch = Callable[[str, Any], Awaitable[bool]]  # (channel, raw message) -> whether it was a verified one


class Backoff:
    """Bounded exponential backoff with jitter (so that nodes that lost Redis together do not all
    come back in the same millisecond)."""

    def __init__(self, cap: float, first: float = 0.1) -> None:
        self._cap = cap
        self._first = first
        self.failures = 0

    def next_delay(self) -> float:
        delay: float = min(self._first * 2.0**self.failures, self._cap)
        self.failures += 1
        return delay * (0.5 + random.random())

    def reset(self) -> None:
        self.failures = 0


def by_slot(channels: Iterable[str]) -> list[list[str]]:
    """Channels grouped by hash slot: one SSUBSCRIBE may only name channels of one slot."""
    groups: dict[int, list[str]] = defaultdict(list)
    for channel in sorted(channels):
        groups[key_slot(channel.encode())].append(channel)
    return list(groups.values())


def in_one(channels: Iterable[str]) -> list[list[str]]:
    ordered = sorted(channels)
    return [ordered] if ordered else []


@dataclass(frozen=True)
class Dialect:
    """The pub/sub commands and reply kinds of one kind of channel."""

    subscribe: str
    unsubscribe: str
    message: str
    group: Callable[[Iterable[str]], list[list[str]]]


PLAIN = Dialect(subscribe="subscribe", unsubscribe="unsubscribe", message="message", group=in_one)
SHARDED = Dialect(subscribe="ssubscribe", unsubscribe="sunsubscribe", message="smessage", group=by_slot)


class Subscriptions:
    """The channels this node's clients need (plus the control channel), the joins waiting for
    one of them to be confirmed, and whether a catch-up from the store is owed."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.wanted: set[str] = set()
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.catch_up_pending = False
        self.on_change: Callable[[], None] = lambda: None  # the topology re-places channels
        self.on_resubscribed: Callable[[], None] = lambda: None  # the feeds catch up from the store

    def needed(self) -> set[str]:
        return self.wanted | set(self.waiters) | {self.control}

    def want(self, channel: str) -> None:
        if channel not in self.wanted:
            self.wanted.add(channel)
            self.on_change()

    def unwant(self, channel: str) -> None:
        if channel in self.wanted:
            self.wanted.discard(channel)
            self.on_change()

    async def wait(self, channel: str, wait_seconds: float) -> bool:
        """Wait until `channel` is confirmed; False when that did not happen within `wait_seconds`."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, []).append(waiter)
        self.on_change()
        try:
            await asyncio.wait_for(waiter, wait_seconds)
        except TimeoutError:
            return False
        finally:
            waiting = self.waiters.get(channel)
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self.waiters[channel]
        return True

    def confirmed(self, channel: str) -> None:
        for waiter in self.waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)

    def lost(self) -> None:
        """Something may have been published that this node did not hear: catch up once whole."""
        self.catch_up_pending = True

    def catch_up_if_whole(self, confirmed: set[str]) -> None:
        if self.catch_up_pending and self.needed() <= confirmed:
            # Every channel is live again: whatever was published meanwhile is in the store.
            self.catch_up_pending = False
            self.on_resubscribed()


class PubSubLink:
    """One pub/sub connection: subscribes what its `target` holds (and its own probe channel),
    reads, and hands each message to `dispatch`. It raises out of `run()` when the connection
    fails or goes deaf (no verified message, its probes included, for `probe_timeout`)."""

    def __init__(
        self,
        pubsub: Any,
        dialect: Dialect,
        subscriptions: Subscriptions,
        dispatch: Dispatch,
        *,
        probe_channel: str,
        probe_timeout: float,
    ) -> None:
        self.pubsub = pubsub
        self.dialect = dialect
        self.probe_channel = probe_channel
        self.target: set[str] = set()  # channels placed on this connection (probe aside)
        self.subscribed: set[str] = set()  # confirmed by Redis on this connection
        self.requested: set[str] = set()  # asked for, not yet confirmed
        self.leaving: set[str] = set()  # unsubscribed by us: their unsubscribe reply is no loss
        self.up = False
        self.last_heard = time.monotonic()
        self.on_confirmed: Callable[[PubSubLink, str], None] = lambda _link, _channel: None
        self.on_taken: Callable[[PubSubLink, str], None] = lambda _link, _channel: None
        self._subscriptions = subscriptions
        self._dispatch = dispatch
        self._probe_timeout = probe_timeout
        self._dirty = True
        self._condemned: str | None = None

    def retarget(self, channels: set[str]) -> None:
        if channels != self.target:
            self.target = set(channels)
            self._dirty = True

    def move_probe(self, channel: str) -> None:
        if channel != self.probe_channel:
            self.probe_channel, self._dirty = channel, True

    def confirmed(self) -> set[str]:
        return self.subscribed if self.up else set()

    def whole(self) -> bool:
        return self.up and self.probe_channel in self.subscribed and self.target <= self.subscribed

    def condemn(self, why: str) -> None:
        """Make `run()` give this connection up at its next turn (its server is no longer the right one)."""
        self._condemned = why

    async def open(self) -> None:
        """Send the first subscriptions (the caller bounds it with a timeout)."""
        await self._reconcile()
        self.up = True
        self.last_heard = time.monotonic()

    async def run(self) -> None:
        slice_busy, slice_idle = LISTEN_SLICE_BUSY, LISTEN_SLICE_IDLE
        while True:
            if self._condemned is not None:
                raise ConnectionError(self._condemned)
            await self._reconcile()
            # Subscriptions go out between reads: while joins wait for one, read in short slices
            # so they go out within ~10 ms; otherwise in longer ones, so that an idle node does not
            # wake a hundred times a second.
            busy = self._dirty or self.requested or self._subscriptions.waiters
            message = await self.pubsub.get_message(timeout=slice_busy if busy else slice_idle)
            if message is None:
                age = time.monotonic() - self.last_heard
                if age > self._probe_timeout:
                    raise ConnectionError(f"no probe for {age:.1f}s: subscription is deaf")
                continue
            kind = message.get("type")
            channel = message.get("channel")
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind == self.dialect.message:
                # Any verified message proves the connection hears: a busy node may read its own
                # probe late, and must not mistake that for a deaf connection.
                if await self._dispatch(channel, message.get("data")):
                    self.last_heard = time.monotonic()
            elif kind == self.dialect.subscribe:
                self._confirm(channel)
            elif kind == self.dialect.unsubscribe:
                self._taken(channel)

    async def close(self) -> None:
        self.up = False
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that lands
        # as aclose() finishes, and the listener then outlives close() (a node that never exits).
        with contextlib.suppress(Exception):  # the connection is being thrown away anyway
            async with asyncio.timeout(1.0):
                await self.pubsub.aclose()

    async def _reconcile(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        target = self.target | {self.probe_channel}
        missing = target - self.subscribed - self.requested
        extra = (self.subscribed | self.requested) - target
        for group in self.dialect.group(missing):
            self.requested.update(group)
            self.leaving.difference_update(group)
            await getattr(self.pubsub, self.dialect.subscribe)(*group)
        for group in self.dialect.group(extra):
            self.subscribed.difference_update(group)
            self.requested.difference_update(group)
            self.leaving.update(group)
            await getattr(self.pubsub, self.dialect.unsubscribe)(*group)

    def _confirm(self, channel: str) -> None:
        if channel == self.probe_channel and channel in self.subscribed and channel not in self.requested:
            # A second confirmation of the probe channel (every link's first and last): redis-py
            # lost the connection and subscribed again by itself, below this link. Whatever was
            # published in between must come from the store.
            self._subscriptions.lost()
            log.warning("Redis re-confirmed %s on a connection redis-py rebuilt; catching up", channel)
        self.requested.discard(channel)
        self.subscribed.add(channel)
        if channel not in self.target and channel != self.probe_channel:
            self._dirty = True  # left or placed elsewhere meanwhile: the next reconcile unsubscribes
        self._subscriptions.confirmed(channel)
        self.on_confirmed(self, channel)

    def _taken(self, channel: str) -> None:
        """An unsubscribe reply: ours, or Redis's own when the channel's slot moved off this server."""
        self.requested.discard(channel)
        self.subscribed.discard(channel)
        if channel in self.leaving:
            self.leaving.discard(channel)
            return
        self._dirty = True
        self.on_taken(self, channel)
