"""The official socket.io-client on both transports through nginx on 3 nodes: with nothing going
wrong, every viewer gets every detection once and in order and every status change."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cluster import RunningCluster
from support.jsclients import all_connected, viewer_mix

from .conftest import js_clients, start_session

pytestmark = pytest.mark.interop


async def test_js_viewers_on_every_transport_see_every_detection_and_status_change(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "interop baseline")
    async with js_clients(scenario, tmp_path, viewers=viewer_mix(20), publish_rate=40) as js:
        await js.wait_for(all_connected, deadline=30, what="every JS client connected")
        await js.wait_for(lambda r: r["detector"]["acked_count"] >= 30, deadline=30, what="30 acked")
        for action in ("pause", "resume", "pause", "resume"):
            await scenario.transition(action)
        await js.wait_for(lambda r: r["detector"]["acked_count"] >= 60, deadline=30, what="60 acked")
        report, _ = await scenario.settle(js)
        await scenario.transition("stop")
        expected = ["paused", "running", "paused", "running", "stopped"]
        report = await js.wait_for(
            lambda r: all(v["statuses"] == expected for v in r["viewers"]), deadline=20, what=f"statuses {expected}"
        )
    transports = {v["transport"] for v in report["viewers"]}
    assert transports == {"websocket", "polling"}, transports
    assert len({v["node"] for v in report["viewers"]}) == 3, "viewers spread over the 3 nodes"
