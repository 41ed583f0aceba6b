"""Idempotent publish across nodes: publishers on two nodes racing the same ids store each once."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
from support.client import detection
from support.cluster import OpenClient, RunningCluster, sequence_problems, stored_events

pytestmark = pytest.mark.cluster

IDS = 40
PUBLISHERS_PER_NODE = 3


async def test_two_nodes_racing_the_same_ids_store_each_once_and_answer_the_same_seq(
    cluster: RunningCluster, open_client: OpenClient
) -> None:
    first, second = cluster.nodes[0], cluster.nodes[1]
    operator = await open_client(first.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "id-race"}))["session"]["id"]
    watchers = [await open_client(node.url, "viewer", name=f"viewer@{node.id}") for node in (first, second)]
    for watcher in watchers:
        await watcher.ok("join_session", {"session_id": session_id})
    publishers = [
        await open_client(node.url, "detector", name=f"detector{i}@{node.id}")
        for node in (first, second)
        for i in range(PUBLISHERS_PER_NODE)
    ]

    async def publish_all(publisher: Any) -> list[dict[str, Any]]:
        # Every publisher sends every id, concurrently: the same id is in flight on both nodes at once.
        return list(
            await asyncio.gather(
                *(
                    publisher.ok("publish_detection", {"session_id": session_id, **detection(i), "id": f"race-{i}"})
                    for i in range(IDS)
                )
            )
        )

    answers = await asyncio.gather(*(publish_all(p) for p in publishers))
    seqs_by_id: dict[int, set[int]] = defaultdict(set)
    fresh_by_id: dict[int, int] = defaultdict(int)
    for acks in answers:
        for i, ack in enumerate(acks):
            seqs_by_id[i].add(ack["seq"])
            fresh_by_id[i] += not ack.get("duplicate", False)
    assert all(len(seqs) == 1 for seqs in seqs_by_id.values()), dict(seqs_by_id)
    assert set(fresh_by_id.values()) == {1}, f"ids stored more or less than once: {dict(fresh_by_id)}"
    assert sorted(next(iter(s)) for s in seqs_by_id.values()) == list(range(1, IDS + 1))

    stored = await stored_events(first.url, cluster.headers("viewer"), session_id)
    assert [e["seq"] for e in stored] == list(range(1, IDS + 1))
    assert sorted(e["id"] for e in stored) == sorted(f"race-{i}" for i in range(IDS))
    for watcher in watchers:
        await watcher.wait_for_seqs(session_id, IDS, deadline=20)
        await watcher.ok("leave_session", {"session_id": "unrelated"})  # a round trip after the last one
        assert not sequence_problems(watcher.seqs(session_id), list(range(1, IDS + 1))), watcher.summary()
