"""Sharded pub/sub on a Redis Cluster: the ClusterManager of server/bus/broker.py over SSUBSCRIBE and
SPUBLISH, with one pub/sub connection per master that owns a channel this node needs.

Every channel keeps its name (`testpulse:room:session:<id>`, `testpulse:control`): a sharded
channel lives on the master owning its name's hash slot, so each session's messages stay on one
shard, and a node holds connections only to the shards its sessions hash to. The control channel
(socket.io emits to non-session rooms, resyncs) is one sharded channel like the others: its
traffic is small and goes to one shard. Each connection has its own probe channel, on a slot of
that connection's master (a hash tag picked to land there), so a deaf shard is noticed by itself.

When a slot moves (resharding) or its master fails over, Redis sends the subscriber an
`sunsubscribe` for each channel of that slot; a killed master shows as a lost connection. Either
way the channels are placed again from a fresh slot map, subscribed on their new owner, and
once every needed channel is confirmed the feeds catch up from the store (detections are stored
before they are published), as after a reconnect to a single Redis. A move Redis does not announce
(a master giving away its last slot becomes a replica and keeps its subscribers) is found by
comparing the slot map with the placement every TOPOLOGY_CHECK_INTERVAL.

Why not redis-py's own ClusterPubSub (redis.asyncio.cluster, redis-py 8.1): it keeps a PubSub
per node and moves shard channels after a slots-cache refresh, but
- on an `sunsubscribe` push it only passes the message on; the channel is resubscribed on its new
  owner at the next slots-cache refresh, which only a command of the same client meeting MOVED
  triggers, and a node that only listens may never send one;
- that move runs in a background task that reports no end, so there is no moment known at which
  every channel is live again, which is when the catch-up must start;
- get_sharded_message() reads the nodes' connections in turn, each with the full timeout, so an
  idle shard delays every other by it;
- there is no liveness per connection (a shard connection that stops hearing goes unnoticed).
So the RedisCluster client serves what it does well (the slot map, SPUBLISH routing with its
MOVED/ASK retries, presence commands), and the pub/sub connections are plain redis.asyncio
clients of one master each, placed by that slot map.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot
from redis.exceptions import SlotNotCoveredError

from testpulse import metrics
from testpulse.bus.broker import LISTEN_SLICE_BUSY, LISTEN_SLICE_IDLE, ClusterManager
from testpulse.bus.outbox import RepeatFilter
from testpulse.transport import internals
from testpulse.urls import is_cluster_url, normalise_redis_url

log = logging.getLogger("testpulse.bus.broker")

PLACE_INTERVAL = 0.5  # seconds between placement passes when nothing asks for one sooner
TOPOLOGY_CHECK_INTERVAL = 5.0  # seconds between comparisons of the cluster's slot map with the placement
REPEAT_KEYS_MAX = 65_536  # (sender, channel) pairs the repeat filter remembers


@dataclass(eq=False)
class ShardLink:
    """One pub/sub connection to one master, and what Redis confirmed on it."""

    node: str  # the master's "host:port"
    host: str
    port: int
    probe_channel: str
    target: set[str] = field(default_factory=set)  # channels placed on this master (probe aside)
    subscribed: set[str] = field(default_factory=set)
    requested: set[str] = field(default_factory=set)
    leaving: set[str] = field(default_factory=set)  # unsubscribed by us: their sunsubscribe is no loss
    dirty: bool = True
    up: bool = False
    last_heard: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    def confirmed(self) -> set[str]:
        return self.subscribed if self.up else set()


def by_slot(channels: Iterable[str]) -> list[list[str]]:
    """Channels grouped by hash slot: one SSUBSCRIBE may only name channels of one slot."""
    groups: dict[int, list[str]] = defaultdict(list)
    for channel in sorted(channels):
        groups[key_slot(channel.encode())].append(channel)
    return list(groups.values())


class ShardedClusterManager(ClusterManager):
    """ClusterManager on a Redis Cluster (a `redis+cluster://` URL): same interface and
    guarantees, SPUBLISH through the RedisCluster client, SSUBSCRIBE on per-master connections."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        lacking = internals.missing(internals.REDIS_CLUSTER)
        if lacking:
            raise RuntimeError(f"this redis-py lacks what Redis Cluster support relies on: {'; '.join(lacking)}")
        if not is_cluster_url(normalise_redis_url(url)):
            raise ValueError("ShardedClusterManager needs a redis+cluster:// URL")
        super().__init__(url, **kwargs)
        self._links: dict[str, ShardLink] = {}
        self._down: dict[str, float] = {}  # master -> when it may be tried again (backing off)
        self._failures: dict[str, int] = {}  # master -> connections lost in a row
        self._placement: dict[str, str] = {}  # needed channel -> the master it is placed on
        self._slots: dict[str, int] = {}  # placed channel -> its hash slot (crc16 once per channel)
        self._checked_at = time.monotonic()
        self._exported: set[str] = set()  # masters with per-shard series
        self._lost_heard: dict[str, float] = {}  # master -> when its lost link last heard anything
        self._topology_stale = True
        self._wake = asyncio.Event()
        # Each shard connection hears a sender's numbers rising, but two connections interleave
        # them: repeats are told apart per (sender, channel), which one connection carries.
        self._repeats = RepeatFilter(senders_max=REPEAT_KEYS_MAX)

    def _repeat_key(self, sender: str, channel: str) -> str:
        return f"{sender}\x00{channel}"

    async def close(self) -> None:
        links = list(self._links.values())
        for link in links:
            if link.task is not None:
                link.task.cancel()
        await asyncio.gather(*(link.task for link in links if link.task is not None), return_exceptions=True)
        await super().close()

    # ---- what the rest of the manager asks -----------------------------------------------------

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        if self._dirty:
            self._wake.set()

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        if self._dirty:
            self._wake.set()

    async def subscribed(self, channel: str, wait_seconds: float = 2.0) -> None:
        """Wait until the channel's master confirms it. While that master is unreachable (or the
        slot map is not known yet), return at once: the catch-up after it returns covers that time."""
        if channel in self._confirmed():
            return
        owner = self._owner(channel)
        if owner is None or owner in self._down:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        self._dirty = True
        self._wake.set()
        try:
            await asyncio.wait_for(waiter, wait_seconds)
        except TimeoutError:
            log.warning("sharded subscription to %s not confirmed within %.1fs", channel, wait_seconds)

    def probe_age(self) -> float:
        """The oldest shard's: a link that is up, or one lost while its master still holds channels."""
        heard = [self._heard_on(node) for node in set(self._placement.values()) | set(self._links)]
        known = [last for last in heard if last is not None]
        if not known:
            return time.monotonic() - self._last_probe
        return time.monotonic() - min(known)

    def _heard_on(self, node: str) -> float | None:
        """When this node last heard anything from `node`'s shard: its link's, or while the link is
        down or still connecting, the lost link's."""
        link = self._links.get(node)
        if link is not None and link.up:
            return link.last_heard
        return self._lost_heard.get(node, link.last_heard if link is not None else None)

    async def health(self) -> str:
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready"
            return f"failing: {type(exc).__name__}: {exc}"[:200]
        down = sorted(name for name, link in self._links.items() if not link.up) + sorted(self._down)
        if down or not self._links:
            return f"failing: no subscription on shard {', '.join(down) or '(none yet)'}"
        missing = self._needed() - self._confirmed()
        if missing:
            return f"failing: {len(missing)} sharded channels not confirmed"
        if self.probe_age() > self._probe_timeout:
            return f"failing: a shard's subscription probe is {self.probe_age():.1f}s old"
        return "ok"

    # ---- placement: which master holds which channel ---------------------------------------------

    def _needed(self) -> set[str]:
        return self._wanted | set(self._waiters) | {self.channel}

    def _confirmed(self) -> set[str]:
        confirmed: set[str] = set()
        for link in self._links.values():
            confirmed |= link.confirmed()
        return confirmed

    def _owner(self, channel: str) -> str | None:
        """The master owning the channel's slot in the client's slot map, or None when not covered."""
        try:
            return str(self.redis.get_node_from_key(channel).name)
        except (SlotNotCoveredError, AttributeError, IndexError, KeyError):
            return None

    def _probe_channel_on(self, node: str) -> str:
        """A probe channel of this process whose slot `node` owns (a hash tag picked to land there)."""
        for tag in range(100_000):
            channel = f"{self._prefix}:probe:{self.host_id}:{{{tag}}}"
            if self._owner(channel) == node:
                return channel
        raise RuntimeError(f"no probe channel found on {node}")

    async def _listen_forever(self) -> None:
        """Replaces the single-connection listener: places channels on masters, and starts and
        stops one link (server/bus/shards.py ShardLink) per master that holds any."""
        while True:
            try:
                await self._place()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the slot map could not be read: again soon
                log.warning("placing sharded channels failed (%s: %s); retrying", type(exc).__name__, exc)
                self._topology_stale = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PLACE_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()

    async def _place(self) -> None:
        now = time.monotonic()
        if not self._topology_stale and now - self._checked_at >= TOPOLOGY_CHECK_INTERVAL:
            self._checked_at = now
            async with asyncio.timeout(self._connect_timeout):
                self._topology_stale = await self._placement_outdated()
        if self._topology_stale:
            self._topology_stale = False
            async with asyncio.timeout(self._connect_timeout * 2):
                await self.redis.nodes_manager.initialize()
            before, self._placement = self._placement, {}  # every channel is placed again from the new map
            if any(self._owner(channel) not in (None, node) for channel, node in before.items()):
                # A channel moves between connections: both may hear it for a moment, and a
                # sender's numbers may then come out of order. The store settles it.
                self._catch_up_pending = True
        for node, retry_at in list(self._down.items()):
            if retry_at <= now:
                del self._down[node]
        self._dirty = False
        needed = self._needed()
        for channel in [c for c in self._placement if c not in needed]:
            del self._placement[channel]
            self._slots.pop(channel, None)
        for channel in needed:
            # A slot is hashed once per channel and map (crc16 in Python is not free).
            if channel not in self._placement:
                owner = self._owner(channel)
                if owner is None:
                    self._topology_stale = True  # a slot mid-move: ask for the map again next pass
                    continue
                self._placement[channel] = owner
        placed: dict[str, set[str]] = defaultdict(set)
        for channel, node in self._placement.items():
            placed[node].add(channel)
        for node, link in list(self._links.items()):
            if node not in placed:
                await self._stop_link(link)
        for node, channels in placed.items():
            found = self._links.get(node)
            if found is None and node in self._down:
                continue
            link = found or self._start_link(node)
            if channels != link.target:
                link.target, link.dirty = channels, True
            if self._owner(link.probe_channel) != node:
                link.probe_channel, link.dirty = self._probe_channel_on(node), True

    async def _placement_outdated(self) -> bool:
        """Whether the cluster's slot map now puts a placed channel or a probe on another master.
        Not every move tells the subscriber: a master whose last slot leaves becomes a replica of
        the master that took it and keeps its subscribers, with no sunsubscribe (same shard, so
        they still hear, until that replica moves on). One CLUSTER SLOTS, cheap; the client's own
        refresh is not (redis-py recycles every connection on it), so it runs only when this says."""
        ranges = sorted(
            (start, end, f"{primary['primary'][0]}:{primary['primary'][1]}")
            for (start, end), primary in (await self.redis.cluster_slots()).items()
        )
        starts = [start for start, _, _ in ranges]

        def owner(slot: int) -> str | None:
            index = bisect.bisect_right(starts, slot) - 1
            return ranges[index][2] if index >= 0 and ranges[index][1] >= slot else None

        for channel, node in self._placement.items():
            slot = self._slots.get(channel)
            if slot is None:
                slot = self._slots[channel] = key_slot(channel.encode())
            if owner(slot) != node:
                return True
        return any(owner(key_slot(link.probe_channel.encode())) != link.node for link in self._links.values())

    def _start_link(self, node: str) -> ShardLink:
        log.info("subscribing on Redis Cluster master %s", node)
        host, _, port = node.rpartition(":")
        link = ShardLink(node=node, host=host, port=int(port), probe_channel=self._probe_channel_on(node))
        self._links[node] = link
        self._catch_up_pending = True  # whatever its channels missed before now is in the store
        link.task = asyncio.create_task(self._run_link(link), name=f"testpulse-redis-shard-{node}")
        return link

    async def _stop_link(self, link: ShardLink) -> None:
        log.info("no channel of this node on Redis Cluster master %s any more; closing its subscription", link.node)
        if self._links.get(link.node) is link:
            del self._links[link.node]
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()
            await asyncio.gather(link.task, return_exceptions=True)

    def _link_lost(self, link: ShardLink, why: str) -> None:
        """A link's connection failed or went deaf: back off that master, read the slot map again
        (a failover shows first as a lost connection), and catch up once every channel is back."""
        failures = self._failures.get(link.node, 0) + 1
        self._failures[link.node] = failures
        backoff = min(0.1 * 2**failures, self._backoff_max)
        self._down[link.node] = time.monotonic() + backoff
        log.warning("Redis Cluster shard %s subscription lost (%s); resubscribing", link.node, why)
        metrics.REDIS_RECONNECTS.inc()
        if self._links.get(link.node) is link:
            del self._links[link.node]
        self._lost_heard[link.node] = min(link.last_heard, self._lost_heard.get(link.node, link.last_heard))
        self._topology_stale = True
        self._catch_up_pending = True
        self._wake.set()

    # ---- one link: a pub/sub connection to one master ---------------------------------------------

    async def _run_link(self, link: ShardLink) -> None:
        client = self._clients.shard(link.host, link.port)
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._reconcile_link(link, pubsub)
            link.up = True
            link.last_heard = time.monotonic()
            while True:
                await self._reconcile_link(link, pubsub)
                busy = link.dirty or link.requested or bool(self._waiters)
                message = await pubsub.get_message(timeout=LISTEN_SLICE_BUSY if busy else LISTEN_SLICE_IDLE)
                if message is None:
                    age = time.monotonic() - link.last_heard
                    if age > self._probe_timeout:
                        raise ConnectionError(f"no probe for {age:.1f}s: subscription is deaf")
                    continue
                kind = message.get("type")
                channel = message.get("channel")
                if isinstance(channel, bytes):
                    channel = channel.decode()
                if kind == "ssubscribe":
                    self._confirm_on(link, channel)
                elif kind == "sunsubscribe":
                    self._taken_from(link, channel)
                elif kind == "smessage" and await self._dispatch(channel, message.get("data")):
                    link.last_heard = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: this shard's link starts over
            self._link_lost(link, f"{type(exc).__name__}: {exc}")
        finally:
            link.up = False
            # asyncio.timeout, not wait_for (see ClusterManager._drop_pubsub).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()

    async def _reconcile_link(self, link: ShardLink, pubsub: Any) -> None:
        if not link.dirty:
            return
        link.dirty = False
        target = link.target | {link.probe_channel}
        missing = target - link.subscribed - link.requested
        extra = (link.subscribed | link.requested) - target
        for group in by_slot(missing):
            link.requested.update(group)
            link.leaving.difference_update(group)
            await pubsub.ssubscribe(*group)
        for group in by_slot(extra):
            link.subscribed.difference_update(group)
            link.requested.difference_update(group)
            link.leaving.update(group)
            await pubsub.sunsubscribe(*group)

    def _confirm_on(self, link: ShardLink, channel: str) -> None:
        if channel == link.probe_channel:
            # (A shard client never reconnects by itself, server/bus/clients.py: unlike the
            # single-Redis listener, no second confirmation can mean a reconnect below us.)
            self._failures.pop(link.node, None)
            self._lost_heard.pop(link.node, None)
        link.requested.discard(channel)
        link.subscribed.add(channel)
        if channel not in link.target and channel != link.probe_channel:
            link.dirty = True  # placed elsewhere or left meanwhile: the next reconcile unsubscribes
        for waiter in self._waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)
        self._catch_up_if_whole()

    def _taken_from(self, link: ShardLink, channel: str) -> None:
        """An sunsubscribe: ours (the channel was left or placed elsewhere), or Redis's own when the
        channel's slot moved away from this master (a migration, or a failover that demoted it)."""
        link.requested.discard(channel)
        link.subscribed.discard(channel)
        if channel in link.leaving:
            link.leaving.discard(channel)
            return
        metrics.REDIS_CHANNELS_MOVED.inc()
        log.info("Redis Cluster moved %s away from %s; resubscribing on its new owner", channel, link.node)
        link.dirty = True
        self._topology_stale = True
        self._catch_up_pending = True
        self._wake.set()

    def _catch_up_if_whole(self) -> None:
        if not self._catch_up_pending:
            return
        links = list(self._links.values())
        if not links or any(not link.up or link.probe_channel not in link.subscribed for link in links):
            return
        if self._needed() <= self._confirmed():
            # Every channel is live again: whatever was published meanwhile is in the store.
            self._catch_up_pending = False
            self.on_resubscribed()

    # ---- probes and metrics ----------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            self._export_series()
            links = [link for link in self._links.values() if link.up]
            if links:
                await asyncio.gather(*(self._probe(link) for link in links))

    async def _probe(self, link: ShardLink) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.redis.spublish(link.probe_channel, self._sign({"method": "probe"}))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed probe shows up as probe age
            pass

    def _export_series(self) -> None:
        metrics.REDIS_PROBE_AGE_SECONDS.set(self.probe_age())
        confirmed = self._confirmed()
        metrics.REDIS_CHANNELS.labels("wanted").set(len(self._wanted))
        metrics.REDIS_CHANNELS.labels("confirmed").set(len(self._wanted & confirmed))
        # Per master the channels are placed on, whether or not its link is up: a shard that is
        # down or deaf shows as wanted above confirmed, not as a missing series.
        wanted: dict[str, set[str]] = defaultdict(set)
        for channel, node in self._placement.items():
            if channel in self._wanted:
                wanted[node].add(channel)
        now = time.monotonic()
        for node in set(wanted) | set(self._links):
            link = self._links.get(node)
            on_link = link.confirmed() if link is not None else set()
            metrics.REDIS_SHARD_CHANNELS.labels(node, "wanted").set(len(wanted[node]))
            metrics.REDIS_SHARD_CHANNELS.labels(node, "confirmed").set(len(wanted[node] & on_link))
            last = self._heard_on(node)
            if last is not None:
                metrics.REDIS_SHARD_PROBE_AGE_SECONDS.labels(node).set(now - last)
        for node in self._exported - set(wanted) - set(self._links):
            self._forget_series(node)
            self._lost_heard.pop(node, None)
        self._exported = set(wanted) | set(self._links)

    def _forget_series(self, node: str) -> None:
        for state in ("wanted", "confirmed"):
            with contextlib.suppress(KeyError):
                metrics.REDIS_SHARD_CHANNELS.remove(node, state)
        with contextlib.suppress(KeyError):
            metrics.REDIS_SHARD_PROBE_AGE_SECONDS.remove(node)
