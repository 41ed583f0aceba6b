"""Redis restarted or its subscribers kicked out: local delivery goes on, cross-node delivery comes back,
and every viewer still sees every acked seq once, in order."""

from __future__ import annotations

import time

import pytest
from support.cluster import (
    OpenClient,
    Publisher,
    RunningCluster,
    Viewer,
    Watch,
    control_subscribers,
    finish_publishing,
    http_status,
    redis_client,
)
from support.processes import RedisServer, wait_until

pytestmark = pytest.mark.faults


async def one_viewer_per_node(viewers: Watch, cluster: RunningCluster, session_id: str) -> list[Viewer]:
    """Viewers connected straight to each node (a Redis outage must not move anyone)."""
    return await viewers(session_id, [n.url for n in cluster.nodes])


async def statuses(cluster: RunningCluster, path: str, patience: float = 2.0) -> dict[str, int | None]:
    return {n.id: await http_status(f"{n.url}{path}", patience) for n in cluster.nodes}


async def every_node_answers(cluster: RunningCluster, path: str, status: int, patience: float = 2.0) -> bool:
    return set((await statuses(cluster, path, patience)).values()) == {status}


async def publishing_to_every_node(
    cluster: RunningCluster, open_client: OpenClient, viewers: Watch, name: str
) -> tuple[list[Viewer], Publisher]:
    """A session started on the first node, a viewer straight on each node (the first node's one
    first), and a detector on the first node publishing every 10 ms, already delivered everywhere."""
    home = cluster.nodes[0]
    operator = await open_client(home.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": name}))["session"]["id"]
    watching = await one_viewer_per_node(viewers, cluster, session_id)
    assert watching[0].node == home.id
    publisher = Publisher(await open_client(home.url, "detector"), session_id, interval=0.01).start()
    try:
        await publisher.wait_acked(20)
        for viewer in watching:
            await viewer.wait_for_seq(20)
    except BaseException:
        await publisher.stop()
        raise
    return watching, publisher


async def test_redis_restart_mid_stream_keeps_local_delivery_and_resumes_cross_node_delivery_within_7s(
    cluster: RunningCluster, redis: RedisServer, open_client: OpenClient, viewers: Watch
) -> None:
    watching, publisher = await publishing_to_every_node(cluster, open_client, viewers, "redis-restart")
    local, remote = watching[0], watching[1:]
    try:
        await redis.kill()
        down_at_seq = publisher.acked[-1]
        # Local delivery never stops: the viewer on the publisher's node keeps receiving.
        await local.wait_for_seq(down_at_seq + 150, deadline=15)

        await wait_until(
            lambda: every_node_answers(cluster, "/ready", 503),
            deadline=10,
            what="every node's /ready to be 503 while Redis is down",
        )
        assert set((await statuses(cluster, "/health")).values()) == {200}

        await redis.start()
        up_at = time.monotonic()
        target = publisher.acked[-1]
        for viewer in remote:
            await viewer.wait_for_seq(target, deadline=max(0.1, up_at + 7 - time.monotonic()))
        resumed_after = time.monotonic() - up_at

        await wait_until(
            lambda: every_node_answers(cluster, "/ready", 200),
            deadline=10,
            what="every node's /ready to be 200 after Redis is back",
        )
        await publisher.wait_acked(len(publisher.acked) + 30)
    finally:
        await publisher.stop()
    assert resumed_after <= 7
    await finish_publishing(publisher, watching, cluster)


async def test_a_redis_that_stops_answering_holds_up_no_node_and_loses_nothing_once_it_answers_again(
    cluster: RunningCluster, redis: RedisServer, open_client: OpenClient, viewers: Watch
) -> None:
    # SIGSTOP: every connection to Redis stays open and nothing answers. Each command a node sends
    # must give up on its own deadline (publishes, probes, health, presence), not wait for ever.
    watching, publisher = await publishing_to_every_node(cluster, open_client, viewers, "redis-frozen")
    local, remote = watching[0], watching[1:]
    try:
        redis.freeze()
        try:
            frozen_at_seq = publisher.acked[-1]
            # Acks and local delivery go on: neither waits for Redis.
            await local.wait_for_seq(frozen_at_seq + 150, deadline=15)

            # A node's Redis check waits out its Redis timeout (2 s) before it says 503.
            await wait_until(
                lambda: every_node_answers(cluster, "/ready", 503, patience=5.0),
                deadline=15,
                what="every node's /ready to be 503 while Redis is frozen",
            )
            assert set((await statuses(cluster, "/health")).values()) == {200}
        finally:
            redis.thaw()
        target = publisher.acked[-1]
        for viewer in remote:
            await viewer.wait_for_seq(target, deadline=15)
        await wait_until(
            lambda: every_node_answers(cluster, "/ready", 200),
            deadline=15,
            what="every node's /ready to be 200 after Redis answers again",
        )
        await publisher.wait_acked(len(publisher.acked) + 30)
    finally:
        await publisher.stop()
    await finish_publishing(publisher, watching, cluster)


async def test_nodes_resubscribe_within_seconds_after_client_kill_type_pubsub(
    cluster: RunningCluster, open_client: OpenClient, viewers: Watch
) -> None:
    home = cluster.nodes[0]
    operator = await open_client(home.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "client-kill"}))["session"]["id"]
    watching = await one_viewer_per_node(viewers, cluster, session_id)
    publisher = Publisher(await open_client(cluster.nodes[1].url, "detector"), session_id, interval=0.01).start()
    nodes = len(cluster.nodes)
    try:
        await publisher.wait_acked(20)
        async with redis_client(cluster.redis_url) as redis:
            assert await control_subscribers(cluster.redis_url) == nodes
            before = {c["id"] for c in await redis.client_list(_type="pubsub")}
            killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed >= nodes
            killed_at = time.monotonic()

            async def resubscribed() -> bool:
                now = {c["id"] for c in await redis.client_list(_type="pubsub")}
                return not (now & before) and await control_subscribers(cluster.redis_url) == nodes

            await wait_until(resubscribed, deadline=5, what=f"{nodes} new subscribers on the control channel")
            resubscribed_after = time.monotonic() - killed_at
        target = publisher.acked[-1] + 30
        for viewer in watching:
            await viewer.wait_for_seq(target, deadline=10)
    finally:
        await publisher.stop()
    assert resubscribed_after < 5
    await finish_publishing(publisher, watching, cluster)


async def test_status_changes_published_while_subscriptions_are_rebuilt_reach_every_viewer_in_order(
    cluster: RunningCluster, open_client: OpenClient, viewers: Watch
) -> None:
    """A pause or resume published while another node resubscribes (right after `CLIENT KILL TYPE
    pubsub`, what Redis does on client-output-buffer-limit) is made good from the audit trail."""
    home = cluster.nodes[0]
    operator = await open_client(home.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "status-blips"}))["session"]["id"]
    watching = await one_viewer_per_node(viewers, cluster, session_id)
    expected: list[str] = []
    async with redis_client(cluster.redis_url) as redis:
        for _ in range(3):
            before = {c["id"] for c in await redis.client_list(_type="pubsub")}
            assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= len(cluster.nodes)
            await operator.ok("pause_test_session", {"session_id": session_id})
            await operator.ok("resume_test_session", {"session_id": session_id})
            expected += ["paused", "running"]

            async def resubscribed(before: set[int] = before) -> bool:
                now = {c["id"] for c in await redis.client_list(_type="pubsub")}
                return not (now & before) and await control_subscribers(cluster.redis_url) == len(cluster.nodes)

            await wait_until(resubscribed, deadline=10, what="every node subscribed again")
    stored = (await operator.ok("join_session", {"session_id": session_id}))["session"]
    assert stored["status"] == "running"
    for viewer in watching:
        await viewer.wait_for(
            lambda v=viewer: [u["status"] for u in v.updates] == expected,
            deadline=15,
            what=f"the status changes {expected}",
        )
        assert [u["previous_status"] for u in viewer.updates] == ["running", "paused"] * 3, viewer.updates
        assert viewer.updates[-1]["updated_at"] == stored["updated_at"]
