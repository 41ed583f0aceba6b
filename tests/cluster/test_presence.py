"""Presence across nodes (PROTOCOL.md 1.1): every member on every node counts, a sub counts once
however many nodes its connections are on, and every node answers get_presence the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support.cluster import RunningCluster
from support.presence import ConnectAs, clients_as, join, new_session, presence_at, subs_seen

pytestmark = pytest.mark.cluster


@pytest.fixture
async def connect_as(cluster: RunningCluster) -> AsyncIterator[ConnectAs]:
    async with clients_as(cluster) as make:
        yield make


@pytest.mark.parametrize("nodes", [2, 3])
async def test_members_on_every_node_count_and_each_opted_in_member_hears_of_the_others(
    cluster: RunningCluster, connect_as: ConnectAs, nodes: int
) -> None:
    session_id = await new_session(cluster)
    used = cluster.nodes[:nodes]
    watchers = [await connect_as(node.url, f"watcher-{node.id}") for node in used]
    for client in watchers:
        await join(client, session_id)
    everyone = {c.name for c in watchers}
    for client in watchers:
        await client.wait_for(lambda c=client: subs_seen(c, session_id) == everyone, deadline=10, what="everyone")
    for node in used:
        presence = await presence_at(node.url, cluster, session_id)
        assert presence["count"] == nodes and [m["sub"] for m in presence["members"]] == sorted(everyone)
    leaver = watchers[-1]
    await leaver.ok("leave_session", {"session_id": session_id})
    for client in watchers[:-1]:
        await client.wait_for(
            lambda c=client: subs_seen(c, session_id) == everyone - {leaver.name}, deadline=10, what="the leave"
        )
        assert client.presence(session_id)[-1]["left"] == [{"sub": leaver.name, "role": "viewer"}]


async def test_one_sub_on_two_nodes_counts_once_and_leaves_only_with_its_last_connection(
    cluster: RunningCluster, connect_as: ConnectAs
) -> None:
    session_id = await new_session(cluster)
    first, second, third = cluster.nodes
    observer = await connect_as(first.url, "observer")
    await join(observer, session_id)
    here = await connect_as(second.url, "roaming")
    there = await connect_as(third.url, "roaming", role="operator")
    await join(here, session_id, presence=False)
    await join(there, session_id, presence=False)
    await observer.wait_for(lambda: subs_seen(observer, session_id) == {"observer", "roaming"}, what="roaming")

    async def roaming_connections() -> int | None:
        # Read where neither connection is: what that node answers comes from the shared state only.
        members = (await presence_at(first.url, cluster, session_id))["members"]
        return next((m["connections"] for m in members if m["sub"] == "roaming"), None)

    # Each node writes its members in batches: the second connection of "roaming" may be a batch late.
    await wait_value(roaming_connections, 2)
    presence = await presence_at(first.url, cluster, session_id)
    assert presence["count"] == 2
    assert {"sub": "roaming", "role": "operator", "connections": 2} in presence["members"], "the highest role"
    updates_before = len(observer.presence(session_id))
    await here.disconnect()
    await wait_value(roaming_connections, 1)
    assert subs_seen(observer, session_id) == {"observer", "roaming"}
    assert len(observer.presence(session_id)) == updates_before, "a sub that stays is not announced again"
    await there.disconnect()
    await observer.wait_for(lambda: subs_seen(observer, session_id) == {"observer"}, what="roaming left")


async def wait_value(read: Callable[[], Awaitable[Any]], expected: Any, deadline: float = 10.0) -> None:
    give_up = asyncio.get_running_loop().time() + deadline
    while (value := await read()) != expected:
        assert asyncio.get_running_loop().time() < give_up, f"still {value!r}, expected {expected!r}"
        await asyncio.sleep(0.1)
