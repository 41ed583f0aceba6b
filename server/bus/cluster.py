"""A Redis Cluster: the node's channels placed on the masters owning their slots, one sharded
pub/sub link (SSUBSCRIBE, link.py) per master that owns a channel this node needs; SPUBLISH goes
through the RedisCluster client.

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
from typing import Any

from redis.crc import key_slot
from redis.exceptions import SlotNotCoveredError

from testpulse import metrics
from testpulse.bus.link import SHARDED, Backoff, PubSubLink
from testpulse.bus.topology import Wiring
from testpulse.transport import internals
from testpulse.urls import is_cluster_url

log = logging.getLogger("testpulse.bus.broker")

PLACE_INTERVAL = 0.5  # seconds between placement passes when nothing asks for one sooner
TOPOLOGY_CHECK_INTERVAL = 5.0  # seconds between comparisons of the cluster's slot map with the placement
REPEAT_KEYS_MAX = 65_536  # (sender, channel) pairs the repeat filter remembers


class ShardLink:
    """A master's link and the task that runs it."""

    def __init__(self, node: str, link: PubSubLink, client: Any) -> None:
        self.node = node
        self.link = link
        self.client = client
        self.task: asyncio.Task[None] | None = None


class RedisClusterShards:
    """The Topology of a `redis+cluster://` URL."""

    sharded = True
    repeat_keys_max = REPEAT_KEYS_MAX

    def __init__(self, wiring: Wiring) -> None:
        lacking = internals.missing(internals.REDIS_CLUSTER)
        if lacking:
            raise RuntimeError(f"this redis-py lacks what Redis Cluster support relies on: {'; '.join(lacking)}")
        if not wiring.clients.cluster_mode or not is_cluster_url(wiring.clients.url):
            raise ValueError("RedisClusterShards needs a redis+cluster:// URL")
        self._wiring = wiring
        self._redis = wiring.redis
        self._subscriptions = wiring.subscriptions
        self._links: dict[str, ShardLink] = {}
        self._down: dict[str, float] = {}  # master -> when it may be tried again (backing off)
        self._backoffs: dict[str, Backoff] = {}  # master -> its reconnection backoff
        self._placement: dict[str, str] = {}  # needed channel -> the master it is placed on
        self._slots: dict[str, int] = {}  # placed channel -> its hash slot (crc16 once per channel)
        self._checked_at = time.monotonic()
        self._started = time.monotonic()
        self._exported: set[str] = set()  # masters with per-shard series
        self._lost_heard: dict[str, float] = {}  # master -> when its lost link last heard anything
        self._topology_stale = True
        self._dirty = True
        self._wake = asyncio.Event()
        self._subscriptions.on_change = self._changed

    def repeat_key(self, sender: str, channel: str) -> str:
        # Each shard connection hears a sender's numbers rising, but two connections interleave
        # them: repeats are told apart per (sender, channel), which one connection carries.
        return f"{sender}\x00{channel}"

    async def close(self) -> None:
        shards = list(self._links.values())
        for shard in shards:
            if shard.task is not None:
                shard.task.cancel()
        await asyncio.gather(*(s.task for s in shards if s.task is not None), return_exceptions=True)

    def _changed(self) -> None:
        self._dirty = True
        self._wake.set()

    # ---- what the manager asks --------------------------------------------------------------------

    def reachable(self, channel: str) -> bool:
        owner = self._owner(channel)
        return owner is not None and owner not in self._down

    def probe_age(self) -> float:
        """The oldest shard's: a link that is up, or one lost while its master still holds channels."""
        heard = [self._heard_on(node) for node in set(self._placement.values()) | set(self._links)]
        known = [last for last in heard if last is not None]
        return time.monotonic() - (min(known) if known else self._started)

    def _heard_on(self, node: str) -> float | None:
        """When this node last heard anything from `node`'s shard: its link's, or while the link is
        down or still connecting, the lost link's."""
        shard = self._links.get(node)
        if shard is not None and shard.link.up:
            return shard.link.last_heard
        return self._lost_heard.get(node, shard.link.last_heard if shard is not None else None)

    def failure(self) -> str | None:
        down = sorted(name for name, shard in self._links.items() if not shard.link.up) + sorted(self._down)
        if down or not self._links:
            return f"no subscription on shard {', '.join(down) or '(none yet)'}"
        missing = self._subscriptions.needed() - self.confirmed()
        if missing:
            return f"{len(missing)} sharded channels not confirmed"
        return None

    def confirmed(self) -> set[str]:
        confirmed: set[str] = set()
        for shard in self._links.values():
            confirmed |= shard.link.confirmed()
        return confirmed

    # ---- placement: which master holds which channel ---------------------------------------------

    def _owner(self, channel: str) -> str | None:
        """The master owning the channel's slot in the client's slot map, or None when not covered."""
        try:
            return str(self._redis.get_node_from_key(channel).name)
        except (SlotNotCoveredError, AttributeError, IndexError, KeyError):
            return None

    def _probe_channel_on(self, node: str) -> str:
        """A probe channel of this process whose slot `node` owns (a hash tag picked to land there)."""
        for tag in range(100_000):
            channel = f"{self._wiring.probe_prefix}:{{{tag}}}"
            if self._owner(channel) == node:
                return channel
        raise RuntimeError(f"no probe channel found on {node}")

    async def listen_forever(self) -> None:
        """Places channels on masters, and starts and stops one link per master that holds any."""
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
        timeout = self._wiring.connect_timeout
        now = time.monotonic()
        if not self._topology_stale and now - self._checked_at >= TOPOLOGY_CHECK_INTERVAL:
            self._checked_at = now
            async with asyncio.timeout(timeout):
                self._topology_stale = await self._placement_outdated()
        if self._topology_stale:
            self._topology_stale = False
            async with asyncio.timeout(timeout * 2):
                await self._redis.nodes_manager.initialize()
            before, self._placement = self._placement, {}  # every channel is placed again from the new map
            if any(self._owner(channel) not in (None, node) for channel, node in before.items()):
                # A channel moves between connections: both may hear it for a moment, and a
                # sender's numbers may then come out of order. The store settles it.
                self._subscriptions.lost()
        for node, retry_at in list(self._down.items()):
            if retry_at <= now:
                del self._down[node]
        self._dirty = False
        needed = self._subscriptions.needed()
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
        for node, shard in list(self._links.items()):
            if node not in placed:
                await self._stop(shard)
        for node, channels in placed.items():
            found = self._links.get(node)
            if found is None and node in self._down:
                continue
            shard = found or self._start(node)
            shard.link.retarget(channels)
            if self._owner(shard.link.probe_channel) != node:
                shard.link.move_probe(self._probe_channel_on(node))

    async def _placement_outdated(self) -> bool:
        """Whether the cluster's slot map now puts a placed channel or a probe on another master.
        Not every move tells the subscriber: a master whose last slot leaves becomes a replica of
        the master that took it and keeps its subscribers, with no sunsubscribe (same shard, so
        they still hear, until that replica moves on). One CLUSTER SLOTS, cheap; the client's own
        refresh is not (redis-py recycles every connection on it), so it runs only when this says."""
        ranges = sorted(
            (start, end, f"{primary['primary'][0]}:{primary['primary'][1]}")
            for (start, end), primary in (await self._redis.cluster_slots()).items()
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
        return any(owner(key_slot(s.link.probe_channel.encode())) != s.node for s in self._links.values())

    def _start(self, node: str) -> ShardLink:
        log.info("subscribing on Redis Cluster master %s", node)
        host, _, port = node.rpartition(":")
        client = self._wiring.clients.shard(host, int(port))
        link = PubSubLink(
            client.pubsub(),
            SHARDED,
            self._subscriptions,
            self._wiring.dispatch,
            probe_channel=self._probe_channel_on(node),
            probe_timeout=self._wiring.probe_timeout,
        )
        link.on_confirmed = self._confirmed_on
        link.on_taken = self._taken_from
        shard = ShardLink(node, link, client)
        self._links[node] = shard
        self._subscriptions.lost()  # whatever its channels missed before now is in the store
        shard.task = asyncio.create_task(self._run(shard), name=f"testpulse-redis-shard-{node}")
        return shard

    async def _stop(self, shard: ShardLink) -> None:
        log.info("no channel of this node on Redis Cluster master %s any more; closing its subscription", shard.node)
        if self._links.get(shard.node) is shard:
            del self._links[shard.node]
        if shard.task is not None and shard.task is not asyncio.current_task():
            shard.task.cancel()
            await asyncio.gather(shard.task, return_exceptions=True)

    async def _run(self, shard: ShardLink) -> None:
        try:
            async with asyncio.timeout(self._wiring.connect_timeout):
                await shard.link.open()
            await shard.link.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: this shard's link starts over
            self._lost(shard, f"{type(exc).__name__}: {exc}")
        finally:
            await shard.link.close()
            with contextlib.suppress(Exception):  # being thrown away anyway
                async with asyncio.timeout(1.0):
                    await shard.client.aclose()

    def _lost(self, shard: ShardLink, why: str) -> None:
        """A link's connection failed or went deaf: back off that master, read the slot map again
        (a failover shows first as a lost connection), and catch up once every channel is back."""
        backoff = self._backoffs.setdefault(shard.node, Backoff(self._wiring.backoff_max))
        self._down[shard.node] = time.monotonic() + backoff.next_delay()
        log.warning("Redis Cluster shard %s subscription lost (%s); resubscribing", shard.node, why)
        metrics.REDIS_RECONNECTS.inc()
        if self._links.get(shard.node) is shard:
            del self._links[shard.node]
        last = shard.link.last_heard
        self._lost_heard[shard.node] = min(last, self._lost_heard.get(shard.node, last))
        self._topology_stale = True
        self._subscriptions.lost()
        self._wake.set()

    def _confirmed_on(self, link: PubSubLink, channel: str) -> None:
        if channel == link.probe_channel:
            node = next((n for n, s in self._links.items() if s.link is link), None)
            if node is not None:
                self._backoffs.pop(node, None)
                self._lost_heard.pop(node, None)
        shards = list(self._links.values())
        if shards and all(s.link.up and s.link.probe_channel in s.link.subscribed for s in shards):
            self._subscriptions.catch_up_if_whole(self.confirmed())

    def _taken_from(self, link: PubSubLink, channel: str) -> None:
        """Redis's own sunsubscribe: the channel's slot moved off this master (a migration, or a
        failover that demoted it)."""
        node = next((n for n, s in self._links.items() if s.link is link), "?")
        metrics.REDIS_CHANNELS_MOVED.inc()
        log.info("Redis Cluster moved %s away from %s; resubscribing on its new owner", channel, node)
        self._topology_stale = True
        self._subscriptions.lost()
        self._wake.set()

    # ---- probes and metrics ----------------------------------------------------------------------

    async def probe_once(self) -> None:
        shards = [shard for shard in self._links.values() if shard.link.up]
        if shards:
            await asyncio.gather(*(self._probe(shard.link) for shard in shards))

    async def _probe(self, link: PubSubLink) -> None:
        try:
            async with asyncio.timeout(self._wiring.connect_timeout):
                await self._redis.spublish(link.probe_channel, self._wiring.sign({"method": "probe"}))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed probe shows up as probe age
            pass

    def export_series(self) -> None:
        # Per master the channels are placed on, whether or not its link is up: a shard that is
        # down or deaf shows as wanted above confirmed, not as a missing series.
        wanted_here = self._subscriptions.wanted
        wanted: dict[str, set[str]] = defaultdict(set)
        for channel, node in self._placement.items():
            if channel in wanted_here:
                wanted[node].add(channel)
        now = time.monotonic()
        for node in set(wanted) | set(self._links):
            shard = self._links.get(node)
            on_link = shard.link.confirmed() if shard is not None else set()
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
