"""A node killed or stopped under load: its viewers come back through nginx and nothing acked is lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from support.client import Client, detection
from support.cluster import (
    NodeInfo,
    OpenClient,
    Publisher,
    RunningCluster,
    Viewer,
    Watch,
    pid_alive,
    stored_events,
)
from support.processes import wait_until

pytestmark = pytest.mark.faults

TRANSPORT_MIX = ["websocket", "polling", "upgrade"]


async def spread_viewers(viewers: Watch, cluster: RunningCluster, session_id: str, per_transport: int) -> list[Viewer]:
    """Viewers through the proxy, each transport `per_transport` times."""
    started: list[Viewer] = []
    for transport in TRANSPORT_MIX:
        started += await viewers(session_id, [cluster.proxy] * per_transport, transport=transport)
    return started


def busiest(viewers: list[Viewer], candidates: list[NodeInfo]) -> NodeInfo:
    load = Counter(v.node for v in viewers)
    return max(candidates, key=lambda n: load[n.id])


async def test_viewers_of_a_sigkilled_node_rejoin_on_a_survivor_within_10s_and_miss_nothing(
    cluster: RunningCluster, open_client: OpenClient, viewers: Watch
) -> None:
    home = cluster.nodes[0]
    operator = await open_client(home.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "sigkill"}))["session"]["id"]
    watching = await spread_viewers(viewers, cluster, session_id, per_transport=3)
    victim = busiest(watching, cluster.nodes[1:])  # the detector's node survives
    affected = [v for v in watching if v.node == victim.id]
    unaffected = [v for v in watching if v.node != victim.id]
    assert affected and unaffected, f"viewers landed on {Counter(v.node for v in watching)}"

    publisher = Publisher(await open_client(home.url, "detector"), session_id, interval=0.01).start()
    try:
        await publisher.wait_acked(30)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)

        def rejoined(v: Viewer) -> bool:
            return any(j.at > killed_at for j in v.joins)

        for viewer in affected:
            await viewer.wait_for(
                lambda v=viewer: rejoined(v), deadline=max(0.1, killed_at + 10 - time.monotonic()), what="rejoin"
            )
        await publisher.wait_acked(len(publisher.acked) + 30)
    finally:
        acked = await publisher.stop()
    assert acked == list(range(1, len(acked) + 1)), publisher.refusals

    for viewer in affected:
        rejoin = next(j for j in viewer.joins if j.at > killed_at)
        assert rejoin.node in cluster.node_ids and rejoin.node != victim.id, viewer.summary()
        assert rejoin.last_seq > 0, "the viewer resumes where it was, it does not start over"
        assert rejoin.at - killed_at <= 10
    for viewer in watching:
        await viewer.wait_for_seq(acked[-1])
    # A fence: a duplicate of anything before it would arrive before it.
    fence = await publisher.client.ok("publish_detection", {"session_id": session_id, **detection(0)})
    last = int(fence["seq"])
    assert last == acked[-1] + 1
    for viewer in watching:
        await viewer.wait_for_seq(last)
        assert not viewer.problems(last), f"{viewer.name}: {viewer.problems(last)}; {viewer.summary()}"
    for viewer in unaffected:
        assert not viewer.errors and not viewer.disconnects and len(viewer.joins) == 1, viewer.summary()
    stored = [e["seq"] for e in await stored_events(home.url, cluster.headers("viewer"), session_id)]
    assert stored == list(range(1, last + 1))


async def handshake_status(url: str, transport: str = "polling") -> int | None:
    """HTTP status of an Engine.IO handshake sent straight to a node (101 for an accepted WebSocket);
    None when nothing answers."""
    params = {"EIO": "4", "transport": transport}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            if transport == "websocket":
                try:
                    async with http.ws_connect(f"{url}/socket.io/", params=params):
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status
            async with http.get(f"{url}/socket.io/", params=params) as response:
                return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{url}/metrics")).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in {url}/metrics"
    return float(match.group(1))


@contextlib.contextmanager
def sqlite_write_lock(database_url: str) -> Iterator[None]:
    """Hold SQLite's write lock: every node's commits wait (up to their busy timeout) until it is released."""
    conn = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_sigterm_drains_a_node_commits_its_queued_writes_and_loses_nothing_acked(
    cluster: RunningCluster, open_client: OpenClient, viewers: Watch
) -> None:
    home, victim = cluster.nodes[0], cluster.nodes[-1]
    operator = await open_client(home.url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "sigterm"}))["session"]["id"]
    watching = await spread_viewers(viewers, cluster, session_id, per_transport=2)
    assert any(v.node == victim.id for v in watching), Counter(v.node for v in watching)
    direct: list[Client] = []
    for transport in TRANSPORT_MIX:
        client = await open_client(victim.url, "viewer", transport=transport, name=f"direct-{transport}")
        await client.ok("join_session", {"session_id": session_id})
        direct.append(client)
    victim_detector = await open_client(victim.url, "detector", name="victim-detector")
    publisher = Publisher(await open_client(home.url, "detector"), session_id, interval=0.01).start()

    burst = 300
    acked_on_victim: list[int] = []

    async def publish_on_victim(i: int) -> None:
        payload = {"session_id": session_id, **detection(i, label=f"victim-{i}")}
        ack: Any = await victim_detector.call("publish_detection", payload, deadline=30)
        if isinstance(ack, dict) and ack.get("ok"):
            acked_on_victim.append(int(ack["seq"]))

    in_flight: list[asyncio.Task[None]] = []
    refused: dict[str, list[int | None]] = {"polling": [], "websocket": []}
    newcomers: list[str] = []
    try:
        await publisher.wait_acked(20)
        with sqlite_write_lock(cluster.database_url):
            # A slow store: the burst queues up on the victim and is still queued when it is told to stop.
            in_flight = [asyncio.create_task(publish_on_victim(i)) for i in range(burst)]

            async def queued() -> bool:
                return await metric(victim.url, "testpulse_write_queue_depth") >= burst - 50

            await wait_until(queued, deadline=10, what="the burst queued on the victim")
            queued_at_stop = await metric(victim.url, "testpulse_write_queue_depth")
            stopped_at = time.monotonic()
            os.kill(victim.pid, signal.SIGTERM)

            async def draining() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    async with httpx.AsyncClient(timeout=2.0) as http:
                        ready = await http.get(f"{victim.url}/ready")
                    return ready.status_code == 503 and ready.json()["checks"].get("node") == "draining"
                return False

            await wait_until(draining, deadline=5, interval=0.01, what="the victim's /ready to say it is draining")
            # Keep the window short: the victim's drain waits for the store at most its shutdown timeout (3 s).
            for transport in refused:
                refused[transport].append(await handshake_status(victim.url, transport))
            # New clients through the proxy may be offered to the victim (it has the fewest connections
            # now); its 503 must send them on to a survivor.
            arrived = await asyncio.gather(
                *(open_client(cluster.proxy, "viewer", transport=t, name=f"new-{t}") for t in TRANSPORT_MIX)
            )
            newcomers += [c.received("connection_status")[0]["node"] for c in arrived]
            assert pid_alive(victim.pid), "the victim exited before its queued writes could commit"
        for client in direct:
            error = await client.wait_for_event("error", lambda e: e.get("code") == "server_draining")
            assert error["message"]
            await client.wait_disconnected()

        async def exited() -> bool:
            return not pid_alive(victim.pid)

        await wait_until(exited, deadline=8, what="the victim to exit after draining")
        exited_after = time.monotonic() - stopped_at
        await publisher.wait_acked(len(publisher.acked) + 20)
    finally:
        acked = await publisher.stop()
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)

    assert refused == {"polling": [503], "websocket": [503]}, "a draining node refuses handshakes with 503"
    assert victim.id not in newcomers, f"the proxy sent a new client to the draining node: {newcomers}"
    assert exited_after < 3 + 5, f"exit took {exited_after:.1f}s after SIGTERM (shutdown timeout 3 s)"
    events = await stored_events(home.url, cluster.headers("viewer"), session_id)
    stored = [e["seq"] for e in events]
    assert stored == list(range(1, len(stored) + 1)), "the log has no gaps"
    lost = sorted((set(acked) | set(acked_on_victim)) - set(stored))
    assert not lost, f"acknowledged but not stored: {lost[:10]}"
    from_victim = [e for e in events if e["label"].startswith("victim-")]
    assert len(from_victim) >= queued_at_stop, (
        f"{queued_at_stop:.0f} writes were queued at SIGTERM, {len(from_victim)} stored"
    )
    last = stored[-1]
    for viewer in watching:
        await viewer.wait_for_seq(last)
        assert not viewer.problems(last), f"{viewer.name}: {viewer.problems(last)}; {viewer.summary()}"
        if viewer.joins[0].node == victim.id:
            assert any(e.get("code") == "server_draining" for e in viewer.errors), viewer.summary()
            # It came back by itself (its client's own reconnection): a connection after the drain.
            assert viewer.connections >= 2, viewer.summary()
        else:
            assert not viewer.errors and len(viewer.joins) == 1, viewer.summary()
