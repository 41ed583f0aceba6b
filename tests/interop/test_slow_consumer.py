"""A JS viewer that stops reading (its WebSocket's TCP socket paused): the node drops it with
`slow_consumer` / `reconnect: "auto"`, it comes back by itself once it reads again and ends complete,
the node's memory stays bounded and the other viewers notice nothing."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from support.cluster import RunningCluster
from support.jsclients import all_connected, summary, viewer_mix
from support.processes import wait_until

from .conftest import js_clients, start_session

pytestmark = pytest.mark.interop

QUEUE_MAX = 100
# Big detections (attributes may take 16 KiB) fill the socket buffers between the node, nginx and
# the paused client (tens of MiB on loopback) in seconds, not minutes.
PAD_BYTES = 15_000


@pytest.fixture
def cluster_env() -> dict[str, str]:
    return {"TESTPULSE_CLIENT_QUEUE_MAX": str(QUEUE_MAX)}


async def slow_consumer_drops(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{url}/metrics")).text
    match = re.search(r"^testpulse_slow_consumer_disconnects_total ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match
    return int(match.group(1)) * 1024


async def test_a_js_viewer_that_stops_reading_is_dropped_and_comes_back_complete(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "interop slow consumer")
    viewers = viewer_mix(6, ("websocket",))
    async with js_clients(scenario, tmp_path, viewers=viewers, publish_rate=100, pad_bytes=PAD_BYTES) as js:
        report = await js.wait_for(all_connected, deadline=30, what="every JS client connected")
        # On the detector's own node a stalled viewer holds the publisher back (the node's
        # backpressure) before its queue can overflow; elsewhere it overflows and is dropped.
        slow = next((v for v in report["viewers"] if v["node"] != report["detector"]["node"]), None)
        assert slow is not None, f"every viewer landed on the detector's node\n{summary(report)}"
        index = report["viewers"].index(slow)
        node = cluster.node(slow["node"])
        drops_before = await slow_consumer_drops(node.url)
        rss_before = rss_bytes(node.pid)
        await js.pause_reading(slow["name"])

        async def dropped() -> bool:
            return await slow_consumer_drops(node.url) > drops_before

        try:
            await wait_until(dropped, deadline=60, what=f"{node.id} to drop the viewer that stopped reading")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{summary(await js.report())}") from None
        rss_growth = rss_bytes(node.pid) - rss_before
        await js.resume_reading(slow["name"])

        def back(r):  # type: ignore[no-untyped-def]
            v = r["viewers"][index]
            return all_connected(r) and v["connects"] > 1

        await js.wait_for(back, deadline=30, what=f"{slow['name']} back by itself")
        report, _ = await scenario.settle(js)
    slow = report["viewers"][index]
    # The node told it `slow_consumer` / `reconnect: "auto"` (counted above); the error sits behind
    # everything the stalled client never read, so it may be cut off with the connection.
    errors = [(e.get("code"), e.get("reconnect")) for e in slow["errors"]]
    assert set(errors) <= {("slow_consumer", "auto")}, summary(report)
    assert all(d["reason"] != "io server disconnect" for d in slow["disconnects"]), slow["disconnects"]
    for other in report["viewers"][:index] + report["viewers"][index + 1 :]:
        assert other["connects"] == 1 and not other["errors"], f"{other['name']} was disturbed\n{summary(report)}"
    assert rss_growth < 64 * 1024 * 1024, f"{node.id} grew {rss_growth / 2**20:.0f} MiB while one viewer stalled"
