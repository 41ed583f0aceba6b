"""TESTPULSE_RETENTION_DAYS on a real node: its job prunes a stopped session and leaves a running one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.client import detection
from support.nodes import NodeUnderTest, node_with
from support.processes import wait_until

pytestmark = pytest.mark.contract

# About 0.9 s: a session stopped by the test is past the retention moments later.
RETENTION_ENV = {
    "TESTPULSE_NODE_ID": "retention",
    "TESTPULSE_RETENTION_DAYS": "0.00001",
    "TESTPULSE_RETENTION_PAUSE_SECONDS": "0",
    "TESTPULSE_RETENTION_CHECK_SECONDS": "0.1",
}


@pytest.fixture(
    params=[pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]
)
async def pruning_node(request: pytest.FixtureRequest, logs_dir: Path, postgres: Any) -> AsyncIterator[NodeUnderTest]:
    pg = await postgres.url() if request.param == "postgres" else None
    async with node_with(request.param, RETENTION_ENV, logs_dir, pg) as running:
        yield running


async def session_with_detections(http: httpx.AsyncClient, node: NodeUnderTest, count: int) -> str:
    created = await http.post("/api/sessions", headers=node.headers("operator"), json={})
    session_id = str(created.json()["session"]["id"])
    assert (await http.post(f"/api/sessions/{session_id}/start", headers=node.headers("operator"))).status_code == 200
    body = {"detections": [detection() for _ in range(count)]}
    posted = await http.post(f"/api/sessions/{session_id}/detections", headers=node.headers("detector"), json=body)
    assert posted.status_code in (200, 201), posted.text
    return session_id


async def events(http: httpx.AsyncClient, node: NodeUnderTest, session_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


async def pruned_total(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    samples = [line for line in text.splitlines() if line.startswith("testpulse_retention_pruned_detections_total ")]
    return float(samples[0].split()[1]) if samples else 0.0


async def test_the_node_prunes_a_stopped_session_past_the_retention_and_keeps_a_running_one(
    pruning_node: NodeUnderTest,
) -> None:
    node = pruning_node
    async with httpx.AsyncClient(base_url=node.url) as http:
        kept = await session_with_detections(http, node, 3)
        pruned = await session_with_detections(http, node, 4)
        stop = await http.post(f"/api/sessions/{pruned}/stop", headers=node.headers("operator"))
        assert stop.status_code == 200

        async def gone() -> bool:
            return await events(http, node, pruned) == []

        await wait_until(gone, deadline=30.0, what="the stopped session's detections pruned")
        assert await pruned_total(http) >= 4
        assert [e["seq"] for e in await events(http, node, kept)] == [1, 2, 3]
        session = (await http.get(f"/api/sessions/{pruned}", headers=node.headers("viewer"))).json()["session"]
        assert session["status"] == "stopped"
