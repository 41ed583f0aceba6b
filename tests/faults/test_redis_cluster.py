"""The cluster on a Redis Cluster (3 masters, 3 replicas): sharded pub/sub carries every session on
its own shard, and through a slot migration, a CLUSTER FAILOVER and a SIGKILL of a master every
viewer still holds every acked seq exactly once, in order."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from support.cluster import (
    CONTROL_CHANNEL,
    OpenClient,
    Publisher,
    RunningCluster,
    Viewer,
    Watch,
    finish_publishing,
    http_status,
    room_channel,
    run_cluster,
)
from support.processes import wait_until
from support.redis_cluster import (
    RedisClusterServers,
    all_listening,
    channel_slot,
    run_redis_cluster,
    settled,
    shard_subscribers,
)

pytestmark = pytest.mark.faults

NODES = 3


@pytest.fixture
async def redis_servers(tmp_path: Path) -> AsyncIterator[RedisClusterServers]:
    async with run_redis_cluster(tmp_path / "redis") as servers:
        yield servers


@pytest.fixture
async def cluster(tmp_path: Path, redis_servers: RedisClusterServers) -> AsyncIterator[RunningCluster]:
    """The faults cluster (open_client and viewers connect to it) on `redis+cluster://`."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}"
    async with run_cluster(tmp_path / "cluster", database_url, nodes=NODES, redis_url=redis_servers.url) as running:
        yield running


async def delivered_everywhere(publisher: Publisher, watching: list[Viewer], *, more: int = 30) -> None:
    """Detections acked from now on reach the viewers of every node (live, not only by catch-up)."""
    target = len(publisher.acked) + more
    await publisher.wait_acked(target, deadline=20)
    for viewer in watching:
        await viewer.wait_for_seq(target, deadline=20)


async def shard_series(url: str) -> dict[tuple[str, str], float]:
    """testpulse_redis_shard_channels of one node: (shard, state) -> value."""
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{url}/metrics")).text
    pattern = r'^testpulse_redis_shard_channels\{shard="([^"]+)",state="(\w+)"\} ([0-9.e+]+)$'
    return {(shard, state): float(value) for shard, state, value in re.findall(pattern, text, re.M)}


async def every_node_ready(cluster: RunningCluster) -> None:
    async def ready() -> bool:
        return all([await http_status(f"{node.url}/ready") == 200 for node in cluster.nodes])

    await wait_until(ready, deadline=30, what="every node's /ready to be 200")


async def watched_session(
    cluster: RunningCluster, open_client: OpenClient, viewers: Watch, name: str
) -> tuple[str, list[Viewer], Publisher]:
    """A session with a viewer on every node and a publisher on the first: the other nodes' viewers
    see its detections only through the session's shard."""
    operator = await open_client(cluster.nodes[0].url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": name}))["session"]["id"]
    watching = await viewers(session_id, [n.url for n in cluster.nodes])
    publisher = Publisher(await open_client(cluster.nodes[0].url, "detector"), session_id, interval=0.01).start()
    return session_id, watching, publisher


async def test_sessions_on_different_shards_reach_every_node_once_and_a_late_join_replays(
    cluster: RunningCluster, redis_servers: RedisClusterServers, open_client: OpenClient, viewers: Watch
) -> None:
    assert cluster.redis_url == redis_servers.url
    await all_listening(redis_servers, CONTROL_CHANNEL, NODES, what="every node on the control channel's shard")
    operator = await open_client(cluster.nodes[0].url, "operator")
    sessions: list[str] = []
    owners: set[int] = set()
    # Sessions until two live on different masters: each session's traffic stays on its own shard.
    while len(owners) < 2:
        session_id = (await operator.ok("start_test_session", {"name": f"shard-{len(sessions)}"}))["session"]["id"]
        sessions.append(session_id)
        owners.add(await asyncio.to_thread(redis_servers.owner_port, channel_slot(room_channel(session_id))))
    first, last = sessions[0], sessions[-1]
    watching = {s: await viewers(s, [n.url for n in cluster.nodes]) for s in (first, last)}
    for session_id in (first, last):
        assert await shard_subscribers(redis_servers, room_channel(session_id)) == NODES

    # Each node says, per master, how many of the sessions it watches live there and are confirmed.
    shards = {f"127.0.0.1:{port}" for port in owners}

    async def confirmed_per_shard() -> bool:
        for node in cluster.nodes:
            series = await shard_series(node.url)
            for shard in shards:
                wanted = series.get((shard, "wanted"), 0)
                if wanted < 1 or series.get((shard, "confirmed")) != wanted:
                    return False
        return True

    await wait_until(confirmed_per_shard, deadline=15, what="per-shard wanted = confirmed on every node")
    publishers = [
        Publisher(await open_client(node.url, "detector"), s, interval=0.005, label=f"p{i}").start()
        for i, (node, s) in enumerate(zip(cluster.nodes, (first, last), strict=False))
    ]
    try:
        for publisher in publishers:
            await delivered_everywhere(publisher, watching[publisher.session_id])
        # A viewer that joins late with last_seq replays what it missed from the store, then goes live.
        late = (await viewers(first, [cluster.nodes[2].url]))[0]
        await delivered_everywhere(publishers[0], [late])
    finally:
        for publisher in publishers:
            await publisher.stop()
    for publisher in publishers:
        late_viewers = [late] if publisher.session_id == first else []
        await finish_publishing(publisher, watching[publisher.session_id] + late_viewers, cluster)


async def test_migrating_a_watched_sessions_slot_while_publishing_loses_and_repeats_nothing(
    cluster: RunningCluster, redis_servers: RedisClusterServers, open_client: OpenClient, viewers: Watch
) -> None:
    session_id, watching, publisher = await watched_session(cluster, open_client, viewers, "migrate")
    channel = room_channel(session_id)
    slot = channel_slot(channel)
    try:
        await delivered_everywhere(publisher, watching)
        source = await asyncio.to_thread(redis_servers.owner_port, slot)
        target = next(port for port in await asyncio.to_thread(redis_servers.master_ports) if port != source)
        await asyncio.to_thread(redis_servers.migrate_slot, slot, target)
        moved = time.monotonic()
        await settled(redis_servers)
        assert await asyncio.to_thread(redis_servers.owner_port, slot) == target
        await all_listening(redis_servers, channel, NODES, what=f"every node on slot {slot}'s new master :{target}")
        followed = time.monotonic() - moved
        await delivered_everywhere(publisher, watching)

        # And with the operator's tool: `redis-cli --cluster reshard` moves every slot of that
        # master (the session's among them) to the third one while detections keep coming.
        third = next(
            port for port in await asyncio.to_thread(redis_servers.master_ports) if port not in (source, target)
        )
        slots = await asyncio.to_thread(redis_servers.slots_of, target)
        await asyncio.to_thread(redis_servers.reshard, target, third, slots)
        await settled(redis_servers)
        assert await asyncio.to_thread(redis_servers.owner_port, slot) == third
        await all_listening(
            redis_servers, channel, NODES, what=f"every node on slot {slot}'s master after reshard :{third}"
        )
        await delivered_everywhere(publisher, watching)
    finally:
        await publisher.stop()
    print(f"every node listened on the slot's new master {followed:.2f}s after CLUSTER SETSLOT NODE")
    await finish_publishing(publisher, watching, cluster)


async def test_a_failover_and_a_sigkilled_master_lose_and_repeat_nothing(
    cluster: RunningCluster, redis_servers: RedisClusterServers, open_client: OpenClient, viewers: Watch
) -> None:
    session_id, watching, publisher = await watched_session(cluster, open_client, viewers, "failover")
    channel = room_channel(session_id)
    slot = channel_slot(channel)
    try:
        await delivered_everywhere(publisher, watching)

        # 1. The graceful kind: the replica takes over by CLUSTER FAILOVER; the old master stays up.
        first = await asyncio.to_thread(redis_servers.owner_port, slot)
        started = time.monotonic()
        second = await asyncio.to_thread(redis_servers.failover, first)
        await settled(redis_servers)
        assert await asyncio.to_thread(redis_servers.owner_port, slot) == second
        await all_listening(redis_servers, channel, NODES, what=f"every node on the promoted master :{second}")
        timings = {"failover": time.monotonic() - started}
        await delivered_everywhere(publisher, watching)

        # 2. The hard kind: SIGKILL of the master every node listens on; its replica is promoted.
        await wait_until(
            lambda: asyncio.to_thread(redis_servers.replica_synced, first),
            deadline=30,
            what=f"the demoted :{first} to finish its sync with :{second}",
        )
        started = time.monotonic()
        assert await asyncio.to_thread(redis_servers.kill_master, second) == first
        await settled(redis_servers)
        assert await asyncio.to_thread(redis_servers.owner_port, slot) == first
        await all_listening(redis_servers, channel, NODES, what=f"every node on the promoted master :{first}")
        timings["kill"] = time.monotonic() - started
        await delivered_everywhere(publisher, watching)
        await every_node_ready(cluster)
    finally:
        await publisher.stop()
    print(
        f"every node listened on the promoted master {timings['failover']:.2f}s after CLUSTER FAILOVER, "
        f"{timings['kill']:.2f}s after SIGKILL (cluster-node-timeout {redis_servers.node_timeout_ms} ms)"
    )
    await finish_publishing(publisher, watching, cluster)


async def test_pubsub_connections_killed_on_one_master_are_rebuilt_and_lose_and_repeat_nothing(
    cluster: RunningCluster, redis_servers: RedisClusterServers, open_client: OpenClient, viewers: Watch
) -> None:
    session_id, watching, publisher = await watched_session(cluster, open_client, viewers, "client-kill")
    channel = room_channel(session_id)
    try:
        await delivered_everywhere(publisher, watching)
        master = await asyncio.to_thread(redis_servers.owner_port, channel_slot(channel))
        with redis_servers.client(master) as client:
            killed = await asyncio.to_thread(client.execute_command, "CLIENT KILL", "TYPE", "pubsub")
        assert int(killed) >= NODES, "every node had a pub/sub connection to the session's master"
        await all_listening(redis_servers, channel, NODES, what=f"every node subscribed again on :{master}")
        await delivered_everywhere(publisher, watching)
    finally:
        await publisher.stop()
    await finish_publishing(publisher, watching, cluster)
