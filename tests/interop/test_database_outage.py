"""PostgreSQL stops mid-stream (a fast shutdown) and starts again on the same port and data
directory: the JS detector is answered `unavailable` meanwhile, nothing acked is lost, and delivery
resumes when the database is back."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cluster import RunningCluster
from support.jsclients import all_connected, viewer_mix

from .conftest import OnDemandPostgresServer, js_clients, start_session

pytestmark = [pytest.mark.interop, pytest.mark.postgres]


@pytest.fixture
def store() -> str:
    return "postgres"


def acked_at_least(count: int):  # type: ignore[no-untyped-def]
    return lambda r: r["detector"]["acked_count"] >= count


async def test_a_postgres_outage_answers_unavailable_loses_nothing_acked_and_delivery_resumes(
    cluster: RunningCluster, interop_postgres: OnDemandPostgresServer, tmp_path: Path
) -> None:
    postgres = await interop_postgres.server()
    scenario = await start_session(cluster, "interop database outage")
    async with js_clients(scenario, tmp_path, viewers=viewer_mix(9), publish_rate=30) as js:
        await js.wait_for(all_connected, deadline=30, what="every JS client connected")
        await js.wait_for(acked_at_least(20), deadline=30, what="publishing under way")
        await postgres.stop()
        try:
            await js.wait_for(
                lambda r: r["detector"]["refusals"].get("unavailable", 0) >= 3,
                deadline=30,
                what="the detector answered `unavailable` while the database is down",
            )
            acked_during_outage = (await js.report())["detector"]["acked_count"]
        finally:
            await postgres.start()
        await js.wait_for(
            acked_at_least(acked_during_outage + 20), deadline=60, what="publishing after the database is back"
        )
        report, _ = await scenario.settle(js)
    refusals = report["detector"]["refusals"]
    assert set(refusals) <= {"unavailable", "timeout"}, refusals
