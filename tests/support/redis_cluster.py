"""A real Redis Cluster on loopback (server/devtools/redis_cluster.py: 3 masters, 3 replicas) under a
running testpulse cluster, and what the tests ask of it, off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from redis import asyncio as aioredis
from redis.crc import key_slot

from support.cluster import CONTROL_CHANNEL, room_channel
from support.processes import wait_until
from testpulse.devtools.redis_cluster import HOST, RedisClusterServers

__all__ = ["CONTROL_CHANNEL", "RedisClusterServers", "room_channel"]


@asynccontextmanager
async def run_redis_cluster(workdir: Path, masters: int = 3) -> AsyncIterator[RedisClusterServers]:
    servers = RedisClusterServers(workdir, masters=masters)
    await asyncio.to_thread(servers.start)
    try:
        yield servers
    finally:
        await asyncio.to_thread(servers.stop)
        assert not servers.running_ports(), "a Redis Cluster server outlived stop()"


def channel_slot(channel: str) -> int:
    return key_slot(channel.encode())


async def shard_subscribers(servers: RedisClusterServers, channel: str) -> int:
    """PUBSUB SHARDNUMSUB of `channel` on the master serving its slot: how many nodes listen there
    (-1 while no master answers for it)."""
    try:
        port = await asyncio.to_thread(servers.owner_port, channel_slot(channel))
    except Exception:  # noqa: BLE001 - mid-failover: nobody serves the slot yet
        return -1
    client = aioredis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=2)
    try:
        reply = await client.execute_command("PUBSUB SHARDNUMSUB", channel)
        return int(reply[0][1])  # parsed to [(channel, count)]
    except (OSError, aioredis.RedisError):
        return -1
    finally:
        await client.aclose()


async def settled(servers: RedisClusterServers) -> None:
    await wait_until(
        lambda: asyncio.to_thread(servers.settled), deadline=30, what="the Redis Cluster to report cluster_state:ok"
    )


async def all_listening(servers: RedisClusterServers, channel: str, nodes: int, *, what: str) -> None:
    async def listening() -> bool:
        return await shard_subscribers(servers, channel) == nodes

    await wait_until(listening, deadline=30, what=what)
