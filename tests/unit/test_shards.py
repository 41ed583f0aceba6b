"""The Redis Cluster topology's pure parts: SSUBSCRIBE groups, and repeats told apart per channel when
several shard connections interleave one sender's messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.crc import key_slot

from testpulse.bus.broker import NUMBER_KEY, SENDER_KEY, ClusterManager
from testpulse.bus.cluster import RedisClusterShards
from testpulse.bus.link import by_slot

pytestmark = pytest.mark.unit

KEY = b"k" * 32
UNREACHABLE = "redis+cluster://127.0.0.1:9"  # nothing is sent: these tests never start the manager


def numbered(number: int) -> dict[str, object]:
    return {"method": "detections", SENDER_KEY: "node-a", NUMBER_KEY: number}


@pytest.fixture
async def sharded() -> AsyncIterator[ClusterManager]:
    manager = ClusterManager(UNREACHABLE, key=KEY)
    assert isinstance(manager.topology, RedisClusterShards)
    yield manager
    await manager.redis.aclose()


def test_ssubscribe_groups_hold_channels_of_one_slot_each() -> None:
    channels = ["a{x}", "b{x}", "c{y}", "testpulse:control", "testpulse:room:session:1"]
    groups = by_slot(channels)
    assert sorted(c for group in groups for c in group) == sorted(channels)
    for group in groups:
        assert len({key_slot(c.encode()) for c in group}) == 1
    assert ["a{x}", "b{x}"] in groups  # one hash tag, one slot, one command


async def test_messages_of_one_sender_interleaved_by_two_shards_are_all_handled_and_repeats_are_not(
    sharded: ClusterManager,
) -> None:
    # The sender's outbox numbered them 5 (session A's shard) then 6 (session B's shard); the
    # receiver's connection to B's shard happened to be read first.
    assert not sharded._is_repeat(numbered(6), "testpulse:room:session:B")
    assert not sharded._is_repeat(numbered(5), "testpulse:room:session:A")
    assert sharded._is_repeat(numbered(5), "testpulse:room:session:A")  # the outbox sent it again
    assert sharded._is_repeat(numbered(6), "testpulse:room:session:B")


async def test_one_connection_takes_a_lower_number_after_a_higher_one_as_a_repeat() -> None:
    # Why the sharded manager keys by channel: on one connection the same order means a repeat.
    single = ClusterManager("redis://127.0.0.1:9", key=KEY)
    try:
        assert not single._is_repeat(numbered(6), "testpulse:room:session:B")
        assert single._is_repeat(numbered(5), "testpulse:room:session:A")
    finally:
        await single.redis.aclose()


async def test_the_sharded_topology_takes_only_redis_cluster_urls() -> None:
    single = ClusterManager("redis://127.0.0.1:9", key=KEY)
    try:
        with pytest.raises(ValueError, match="redis\\+cluster://"):
            RedisClusterShards(single._wiring)
    finally:
        await single.redis.aclose()
