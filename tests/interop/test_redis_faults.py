"""Redis going away under the official socket.io-client: a restart of redis-server, and repeated
`CLIENT KILL TYPE pubsub` (what Redis does on client-output-buffer-limit) followed by status changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cluster import RunningCluster, redis_client
from support.jsclients import Report, all_connected, viewer_mix
from support.processes import RedisServer

from .conftest import js_clients, start_session

pytestmark = pytest.mark.interop


def acked_at_least(count: int):  # type: ignore[no-untyped-def]
    return lambda r: r["detector"]["acked_count"] >= count


async def acked_now(js) -> int:  # type: ignore[no-untyped-def]
    return int((await js.report())["detector"]["acked_count"])


async def test_redis_restart_under_js_clients_loses_nothing(
    cluster: RunningCluster, redis: RedisServer, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "interop redis restart")
    async with js_clients(scenario, tmp_path, viewers=viewer_mix(12), publish_rate=30) as js:
        await js.wait_for(all_connected, deadline=30, what="every JS client connected")
        await js.wait_for(acked_at_least(20), deadline=30, what="publishing under way")
        await redis.kill()
        await redis.start()
        await js.wait_for(acked_at_least(await acked_now(js) + 30), deadline=30, what="publishing after the restart")
        await scenario.settle(js)


async def test_status_changes_reach_every_js_viewer_after_repeated_pubsub_kills(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "interop pubsub kills")
    expected: list[str] = []
    async with js_clients(scenario, tmp_path, viewers=viewer_mix(12), publish_rate=30) as js:
        await js.wait_for(all_connected, deadline=30, what="every JS client connected")
        await js.wait_for(acked_at_least(20), deadline=30, what="publishing under way")
        async with redis_client(cluster.redis_url) as redis:
            for _ in range(3):
                # The pause and resume land while the nodes are re-establishing their subscriptions.
                killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                assert killed >= len(cluster.nodes)
                for action, status in (("pause", "paused"), ("resume", "running")):
                    await scenario.transition(action)
                    expected.append(status)
                await js.wait_for(acked_at_least(await acked_now(js) + 10), deadline=30, what="publishing again")
        stored_status = (await scenario.session())["status"]
        assert stored_status == expected[-1]

        def every_transition(r: Report) -> bool:
            return all(v["statuses"] == expected for v in r["viewers"])

        await js.wait_for(every_transition, deadline=20, what=f"every viewer saw {expected}")
        await scenario.settle(js)
