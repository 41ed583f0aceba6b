"""Redis behind Sentinel: the cluster follows the master through a SENTINEL FAILOVER and through a
SIGKILL of the master it listens on; cross-node delivery resumes and every viewer still sees every
acked seq once, in order."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis import asyncio as aioredis
from support.cluster import (
    CONTROL_CHANNEL,
    OpenClient,
    Publisher,
    RunningCluster,
    Viewer,
    Watch,
    finish_publishing,
    run_cluster,
)
from support.processes import HOST, wait_until
from support.sentinels import SentinelGroup, role_is, run_sentinel_group

pytestmark = pytest.mark.faults

NODES = 3


@pytest.fixture
async def sentinels(tmp_path: Path) -> AsyncIterator[SentinelGroup]:
    async with run_sentinel_group(tmp_path / "redis") as group:
        await wait_until(group.settled, deadline=20, what="the Sentinels to agree on a master and a healthy replica")
        yield group


@pytest.fixture
async def cluster(tmp_path: Path, sentinels: SentinelGroup) -> AsyncIterator[RunningCluster]:
    """The faults cluster (open_client and viewers connect to it) on `redis+sentinel://`."""
    database_url = f"sqlite:///{tmp_path / 'testpulse.db'}"
    async with run_cluster(tmp_path / "cluster", database_url, nodes=NODES, redis_url=sentinels.url) as running:
        yield running


async def listeners_on(port: int) -> int:
    """How many nodes subscribe to the control channel on the Redis at `port`."""
    client = aioredis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=2)
    try:
        return int((await client.pubsub_numsub(CONTROL_CHANNEL))[0][1])
    except (OSError, aioredis.RedisError):
        return -1
    finally:
        await client.aclose()


async def follow(sentinels: SentinelGroup, old_port: int) -> int:
    """Wait until the Sentinels name a new master and every node listens there; its port."""

    async def moved() -> bool:
        port = await sentinels.master_port()
        return port is not None and port != old_port and await listeners_on(port) == NODES

    await wait_until(moved, deadline=20, what=f"every node listening on the master that replaced :{old_port}")
    port = await sentinels.master_port()
    assert port is not None
    return port


async def delivered_everywhere(publisher: Publisher, watching: list[Viewer], *, more: int = 30) -> None:
    """Detections acked from now on reach the viewers of every node (live, not only by catch-up)."""
    target = len(publisher.acked) + more
    await publisher.wait_acked(target, deadline=15)
    for viewer in watching:
        await viewer.wait_for_seq(target, deadline=15)


async def test_cluster_on_sentinel_follows_a_failover_and_a_killed_master_without_losing_an_acked_detection(
    cluster: RunningCluster, sentinels: SentinelGroup, open_client: OpenClient, viewers: Watch
) -> None:
    assert cluster.redis_url == sentinels.url
    first = await sentinels.master_port()
    assert first is not None and await listeners_on(first) == NODES
    operator = await open_client(cluster.nodes[0].url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "sentinel"}))["session"]["id"]
    watching = await viewers(session_id, [n.url for n in cluster.nodes])
    # The publisher's node is not any viewer's but one: the others see its detections only through Redis.
    publisher = Publisher(await open_client(cluster.nodes[0].url, "detector"), session_id, interval=0.01).start()
    timings: dict[str, float] = {}
    try:
        await delivered_everywhere(publisher, watching)

        # 1. The graceful kind: the master is demoted on purpose and stays up as a replica.
        started = time.monotonic()
        await sentinels.failover()
        second = await follow(sentinels, first)
        timings["failover"] = time.monotonic() - started
        # The nodes moved by themselves, before the Sentinels got round to demoting the old master
        # (about ten seconds on), whose CLIENT KILL would have moved them too. Until then it takes
        # PUBLISH and SUBSCRIBE as a master of nobody: a node that stays there while another moves
        # (a restart, a reconnect) splits the cluster in two.
        assert await role_is(first, "master"), "the nodes only moved when the old master was demoted"
        await delivered_everywhere(publisher, watching)
        # The demoted master must not keep a node: it is the replica that may be promoted next.
        assert await listeners_on(first) == 0

        # 2. The hard kind: SIGKILL of the master every node listens on.
        await wait_until(sentinels.settled, deadline=30, what="the old master to be a healthy replica")
        started = time.monotonic()
        await sentinels.kill(sentinels.server(second))
        third = await follow(sentinels, second)
        timings["kill"] = time.monotonic() - started
        assert third == first
        await delivered_everywhere(publisher, watching)

        # The killed master comes back (empty, as a master of its own until the Sentinels demote it).
        await sentinels.server(second).start()
        await wait_until(sentinels.settled, deadline=30, what="the restarted server to be a healthy replica")
        assert await sentinels.master_port() == third and await listeners_on(third) == NODES
        await delivered_everywhere(publisher, watching)
    finally:
        await publisher.stop()
    print(
        f"nodes followed the new master {timings['failover']:.1f}s after SENTINEL FAILOVER, "
        f"{timings['kill']:.1f}s after SIGKILL"
    )
    await finish_publishing(publisher, watching, cluster)
