"""Cross-node delivery: updates and detections reach every member on every node, in seq order, once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from support.client import Client, detection
from support.cluster import OpenClient, Publisher, RunningCluster, sequence_problems, stored_events
from support.processes import wait_until

pytestmark = pytest.mark.cluster


async def placed_members(
    cluster: RunningCluster, open_client: OpenClient, session_id: str, transport: str
) -> dict[str, Client]:
    """A viewer joined to the session on each node (connected to the node's own URL) and one
    through the proxy, keyed by where it was placed."""
    targets = {node.id: node.url for node in cluster.nodes} | {"proxy": cluster.proxy}
    members = dict(
        zip(
            targets,
            await asyncio.gather(
                *(
                    open_client(url, "viewer", transport=transport, name=f"viewer@{where}")
                    for where, url in targets.items()
                )
            ),
            strict=True,
        )
    )
    for where, member in members.items():
        status = member.received("connection_status")[0]
        if where != "proxy":
            assert status["node"] == where, f"{member.name} landed on {status['node']}"
        else:
            assert status["node"] in cluster.node_ids
    await asyncio.gather(*(m.ok("join_session", {"session_id": session_id}) for m in members.values()))
    return members


async def test_session_updates_and_detections_reach_members_on_every_node(
    cluster: RunningCluster, open_client: OpenClient, transport: str
) -> None:
    first, second = cluster.nodes[0], cluster.nodes[1]
    operator = await open_client(first.url, "operator")
    session = (await operator.ok("start_test_session", {"name": "every-node"}))["session"]
    members = await placed_members(cluster, open_client, session["id"], transport)
    detector = await open_client(second.url, "detector")

    for i in (1, 2, 3):
        await detector.ok("publish_detection", {"session_id": session["id"], **detection(i, label=f"every-{i}")})
    await operator.ok("pause_test_session", {"session_id": session["id"]})
    await operator.ok("resume_test_session", {"session_id": session["id"]})

    for member in members.values():
        await member.wait_for(lambda m=member: len(m.updates(session["id"])) >= 2, what="pause and resume updates")
        await member.wait_for_seqs(session["id"], 3)
    for where, member in members.items():
        updates = [(u["status"], u["previous_status"], u["actor"]) for u in member.updates(session["id"])]
        assert updates == [("paused", "running", "cluster-operator"), ("running", "paused", "cluster-operator")], where
        assert [d["label"] for d in member.detections(session["id"])] == ["every-1", "every-2", "every-3"], where
        assert member.seqs(session["id"]) == [1, 2, 3], where
        assert not member.errors(), where


async def test_concurrent_publishers_on_every_node_reach_every_viewer_in_seq_order_exactly_once(
    cluster: RunningCluster, open_client: OpenClient, transport: str
) -> None:
    operator = await open_client(cluster.proxy, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "concurrent"}))["session"]["id"]
    members = await placed_members(cluster, open_client, session_id, transport)
    detectors = await asyncio.gather(*(open_client(n.url, "detector", name=f"detector@{n.id}") for n in cluster.nodes))
    per_publisher = 40

    async def publish_all(client: Client, tag: str) -> list[int]:
        seqs = []
        for i in range(per_publisher):
            ack = await client.ok("publish_detection", {"session_id": session_id, **detection(i, label=f"{tag}-{i}")})
            seqs.append(int(ack["seq"]))
        return seqs

    acked = await asyncio.gather(*(publish_all(d, f"from-{d.name}") for d in detectors))
    total = per_publisher * len(detectors)
    every_ack = sorted(s for seqs in acked for s in seqs)
    assert every_ack == list(range(1, total + 1)), "seqs must be assigned once, without gaps, across nodes"
    for seqs in acked:
        assert seqs == sorted(seqs), "one publisher's acks are in increasing seq order"

    # A last detection fences the stream: a duplicate of anything before it would arrive before it.
    fence = await detectors[0].ok("publish_detection", {"session_id": session_id, **detection(0, label="fence")})
    total += 1
    assert fence["seq"] == total
    stored = {e["seq"]: e["label"] for e in await stored_events(cluster.proxy, cluster.headers("viewer"), session_id)}
    for where, member in members.items():
        await member.wait_for(lambda m=member: total in m.seqs(session_id), deadline=20, what="the fence")
        problems = sequence_problems(member.seqs(session_id), list(range(1, total + 1)))
        assert not problems, f"viewer on {where}: {problems}"
        assert {d["seq"]: d["label"] for d in member.detections(session_id)} == stored, where


async def test_join_with_last_seq_on_another_node_replays_without_gap_or_duplicate(
    cluster: RunningCluster, open_client: OpenClient, transport: str
) -> None:
    first, third = cluster.nodes[0], cluster.nodes[-1]
    operator = await open_client(first.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "replay"}))["session"]["id"]
    detector = await open_client(cluster.nodes[1].url, "detector")
    before = await open_client(first.url, "viewer", transport=transport, name="before")
    await before.ok("join_session", {"session_id": session_id})
    publisher = Publisher(detector, session_id, interval=0.005).start()
    try:
        await before.wait_for_seqs(session_id, 25, deadline=20)
        await before.disconnect()
        seen = before.seqs(session_id)
        assert not sequence_problems(seen, list(range(1, len(seen) + 1)))
        last_seq = seen[-1]
        # Some detections are committed while the viewer is away (so there is something to replay)...
        await wait_until(_acked_beyond(publisher, last_seq + 2), deadline=20, what="detections while away")
        # ...and publishing goes on: the rejoin races live detections on the other node.
        after = await open_client(third.url, "viewer", transport=transport, name="after")
        ack = await after.ok("join_session", {"session_id": session_id, "last_seq": last_seq})
        await publisher.wait_acked(len(publisher.acked) + 25, deadline=20)
    finally:
        acked = await publisher.stop()
    assert acked == list(range(1, len(acked) + 1)), publisher.refusals
    assert ack["replayed"] >= 1, "detections published while the viewer was away are replayed"
    await after.wait_for(lambda: after.seqs(session_id)[-1:] == [acked[-1]], deadline=20, what=f"seq {acked[-1]}")
    problems = sequence_problems(after.seqs(session_id), list(range(last_seq + 1, acked[-1] + 1)))
    assert not problems, f"after rejoining on {third.id} with last_seq={last_seq}: {problems}"
    assert after.received("connection_status")[0]["node"] == third.id


async def test_handshakes_through_the_proxy_spread_over_every_node(
    cluster: RunningCluster, open_client: OpenClient, transport: str
) -> None:
    count = 30
    # One after the other: least_conn then balances by the connections each node holds (WebSocket)
    # or in turn (long-polling), not by which node happens to answer a concurrent burst first.
    clients = [
        await open_client(cluster.proxy, "viewer", transport=transport, name=f"spread-{i}") for i in range(count)
    ]
    nodes = Counter(c.received("connection_status")[0]["node"] for c in clients)
    # Stickiness by client address (ip_hash, a hash of the address) would put all 30 on one node.
    explain = f"30 clients from one address landed on {dict(nodes)}; nginx: {cluster.nginx_errors()}"
    assert set(nodes) == set(cluster.node_ids), explain
    assert min(nodes.values()) >= 3, explain
    # Each client is really held by the node it was told: a round trip over its own session works.
    answers = await asyncio.gather(*(c.call("join_session", {"session_id": "no-such-session"}) for c in clients))
    assert all(a["ok"] is False and a["error"]["code"] == "not_found" for a in answers), answers


def _acked_beyond(publisher: Publisher, seq: int):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        return bool(publisher.acked) and publisher.acked[-1] > seq

    return probe
