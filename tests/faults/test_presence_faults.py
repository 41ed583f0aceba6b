"""Presence through faults (PROTOCOL.md 1.1): a Redis restart loses the board and the nodes re-assert
it; a SIGKILLed node's members stop counting within 30 s. One cluster for the module, the Redis
restart first: the SIGKILL leaves a node dead."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from support.cluster import RunningCluster, redis_client, run_cluster
from support.presence import ConnectAs, clients_as, join, new_session, presence_at, subs_seen
from support.processes import RedisServer, run_redis, wait_until

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
async def redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    async with run_redis(workdir=tmp_path_factory.mktemp("presence-redis")) as server:
        yield server


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> AsyncIterator[RunningCluster]:
    run_dir: Path = tmp_path_factory.mktemp("presence-cluster")
    async with run_cluster(run_dir, f"sqlite+aiosqlite:///{run_dir / 'testpulse.db'}", redis_url=redis.url) as running:
        yield running


@pytest.fixture
async def connect_as(cluster: RunningCluster) -> AsyncIterator[ConnectAs]:
    async with clients_as(cluster) as make:
        yield make


async def subs_at(url: str, cluster: RunningCluster, session_id: str) -> set[str]:
    return {m["sub"] for m in (await presence_at(url, cluster, session_id))["members"]}


async def subs_once_readable(url: str, cluster: RunningCluster, session_id: str) -> set[str] | None:
    """The subs a node reports, or None while it answers 503 (its Redis connections are being remade)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get(f"/api/sessions/{session_id}/presence", headers=cluster.headers("viewer"))
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return {m["sub"] for m in response.json()["presence"]["members"]}


async def test_presence_is_whole_again_after_a_redis_restart(
    cluster: RunningCluster, redis: RedisServer, connect_as: ConnectAs
) -> None:
    session_id = await new_session(cluster)
    watchers = [await connect_as(node.url, f"before-{node.id}") for node in cluster.nodes]
    for client in watchers:
        await join(client, session_id)
    everyone = {c.name for c in watchers}
    for client in watchers:
        await client.wait_for(lambda c=client: subs_seen(c, session_id) == everyone, what="everyone")

    await redis.kill()
    await redis.start()
    async with redis_client(redis.url) as probe:
        assert await probe.dbsize() == 0, "the restarted Redis holds nothing: the nodes must re-assert"

    # A join after the restart, on one node, is heard on the others too.
    late = await connect_as(cluster.nodes[0].url, "after-restart")
    await join(late, session_id, presence=False)
    everyone.add(late.name)
    for node in cluster.nodes:

        async def whole(url: str = node.url) -> bool:
            return await subs_once_readable(url, cluster, session_id) == everyone

        await wait_until(whole, deadline=15, what=f"whole presence at {node.id}")
    for client in watchers:
        await client.wait_for(lambda c=client: subs_seen(c, session_id) == everyone, deadline=15, what="the late join")


async def test_the_members_of_a_sigkilled_node_leave_within_30s(cluster: RunningCluster, connect_as: ConnectAs) -> None:
    session_id = await new_session(cluster)
    survivor, victim = cluster.nodes[0], cluster.nodes[-1]
    observer = await connect_as(survivor.url, "observer")
    await join(observer, session_id)
    doomed = [await connect_as(victim.url, f"doomed-{i}") for i in range(3)]
    for client in doomed:
        await join(client, session_id, presence=False)  # no reconnection: they stay gone with their node
    everyone = {"observer", *(c.name for c in doomed)}
    await observer.wait_for(lambda: subs_seen(observer, session_id) == everyone, what="the doomed present")

    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    await observer.wait_for(lambda: subs_seen(observer, session_id) == {"observer"}, deadline=30, what="they left")
    assert time.monotonic() - killed_at <= 30
    left = {m["sub"] for u in observer.presence(session_id) for m in u["left"]}
    assert left == everyone - {"observer"}
    assert await subs_at(cluster.nodes[1].url, cluster, session_id) == {"observer"}
