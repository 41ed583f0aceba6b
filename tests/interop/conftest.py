"""The official socket.io-client through nginx on a fresh 3-node cluster per test, over SQLite and
PostgreSQL, on a redis-server of the test's own.

A module sets `cluster_env` (a fixture) for settings its scenario needs (a small client queue, short
pings). `Scenario` holds what every test asserts at the end: everyone is back by themselves and
every viewer holds 1..N exactly once, N being the session's stored last_seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.cluster import RunningCluster, http_status, run_cluster, stored_events
from support.jsclients import (
    JsClients,
    Report,
    all_connected,
    hold_exactly,
    js_clients_missing,
    run_js_clients,
    viewer_problems,
)
from support.processes import PostgresServer, RedisServer, run_postgres, run_redis, wait_until

# socket.io-client's own reconnection, its backoff made smaller so that the suite is quick.
JS_OPTIONS = {"reconnectionDelay": 200, "reconnectionDelayMax": 2000, "timeout": 5000, "ackTimeout": 5000}

_databases = itertools.count(1)


@pytest.fixture(autouse=True)
def _needs_js_clients() -> None:
    missing = js_clients_missing()
    if missing is not None:
        pytest.fail(f"the interop suite needs the JS clients: {missing}")


class OnDemandPostgresServer:
    """One PostgreSQL for the whole interop run, started by the first test that uses it."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._server: PostgresServer | None = None
        self._lock = asyncio.Lock()

    async def server(self) -> PostgresServer:
        async with self._lock:
            if self._server is None:
                self._server = await self._stack.enter_async_context(run_postgres())
            if not self._server.running:  # a test that stopped it failed before starting it again
                await self._server.start()
            return self._server


@pytest.fixture(scope="session")
async def interop_postgres() -> AsyncIterator[OnDemandPostgresServer]:
    async with contextlib.AsyncExitStack() as stack:
        yield OnDemandPostgresServer(stack)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(store: str, tmp_path: Path, interop_postgres: OnDemandPostgresServer) -> str:
    if store == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}"
    server = await interop_postgres.server()
    return await server.create_database(f"interop_{next(_databases)}")


@pytest.fixture
def cluster_env() -> dict[str, str]:
    """Extra TESTPULSE_* settings for the cluster; modules override this fixture."""
    return {}


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(workdir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def cluster(
    tmp_path: Path, database_url: str, redis: RedisServer, cluster_env: dict[str, str]
) -> AsyncIterator[RunningCluster]:
    async with run_cluster(tmp_path / "cluster", database_url, redis_url=redis.url, env=cluster_env) as running:
        yield running


# ---- sessions over HTTP --------------------------------------------------------------------------


@dataclass
class Scenario:
    """One session of a cluster, controlled over HTTP, and the end-of-test checks."""

    cluster: RunningCluster
    session_id: str

    async def _ready_url(self) -> str:
        """A node that answers /ready (the proxy may still skip a node that just came back)."""
        for node in self.cluster.nodes:
            if await http_status(f"{node.url}/ready") == 200:
                return node.url
        return self.cluster.proxy

    async def session(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=await self._ready_url(), timeout=10.0) as http:
            response = await http.get(f"/api/sessions/{self.session_id}", headers=self.cluster.headers("admin"))
        assert response.status_code == 200, response.text
        return dict(response.json()["session"])

    async def transition(self, action: str) -> dict[str, Any]:
        """pause / resume / stop the session over HTTP, retried while the cluster answers 503."""
        give_up = asyncio.get_running_loop().time() + 30.0
        while True:
            async with httpx.AsyncClient(base_url=await self._ready_url(), timeout=10.0) as http:
                try:
                    response = await http.post(
                        f"/api/sessions/{self.session_id}/{action}", headers=self.cluster.headers("operator")
                    )
                except httpx.HTTPError:
                    response = None
            if response is not None and response.status_code == 200:
                return dict(response.json()["session"])
            assert asyncio.get_running_loop().time() < give_up, f"{action}: {response and response.text}"
            await asyncio.sleep(0.2)

    async def all_nodes_ready(self, deadline: float = 60.0) -> None:
        for node in self.cluster.nodes:

            async def ready(url: str = node.url) -> bool:
                return await http_status(f"{url}/ready") == 200

            await wait_until(ready, deadline=deadline, what=f"{node.id} ready")

    async def settle(self, js: JsClients, *, deadline: float = 60.0) -> tuple[Report, list[int]]:
        """Stop publishing, then assert: every viewer and the detector is connected again by itself,
        every viewer holds exactly 1..N in order (N = the stored last_seq), every acked seq is stored.
        Returns the full report and the stored seqs."""
        await js.stop_publishing()
        await js.wait_for(all_connected, deadline=deadline, what="every JS client connected and joined")
        last_seq = int((await self.session())["last_seq"])
        await js.wait_for(
            lambda r: hold_exactly(r, last_seq), deadline=deadline, what=f"every viewer holds 1..{last_seq}"
        )
        report = await js.report(full=True)
        assert viewer_problems(report, last_seq) == {}
        events = await stored_events(await self._ready_url(), self.cluster.headers("admin"), self.session_id)
        stored = [e["seq"] for e in events]
        assert stored == list(range(1, last_seq + 1)), "stored seqs are gapless up to the session's last_seq"
        detector = report["detector"]
        if detector is not None:
            acked = detector["acked"]
            assert set(acked) <= set(stored), f"acked but not stored: {sorted(set(acked) - set(stored))[:10]}"
            assert len(acked) == len(set(acked)), "a seq was acknowledged twice"
        return report, stored


async def start_session(cluster: RunningCluster, name: str) -> Scenario:
    async with httpx.AsyncClient(base_url=cluster.proxy, timeout=10.0, headers=cluster.headers("operator")) as http:
        created = await http.post("/api/sessions", json={"name": name})
        assert created.status_code == 201, created.text
        session_id = created.json()["session"]["id"]
        started = await http.post(f"/api/sessions/{session_id}/start")
        assert started.status_code == 200, started.text
    return Scenario(cluster, session_id)


def js_clients(scenario: Scenario, log_dir: Path, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[JsClients]:
    """The driver's clients on this scenario's session, through the proxy."""
    cluster = scenario.cluster
    return run_js_clients(
        url=cluster.proxy,
        session_id=scenario.session_id,
        viewer_token=cluster.token("viewer"),
        detector_token=cluster.token("detector"),
        options=JS_OPTIONS,
        log_dir=log_dir,
        **kwargs,
    )
