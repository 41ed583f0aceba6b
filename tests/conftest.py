"""Shared fixtures: real testpulse nodes per database backend, tokens, and recording Socket.IO clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from support.client import Client
from support.nodes import AUDIENCE, Connect, NodeUnderTest, node_with
from support.processes import throwaway_postgres

# Hypothesis profiles of the property and fuzz tests (tests/unit/test_properties_*.py,
# tests/security/test_wire_fuzz.py): `ci`, the default, is bounded and derandomized so a run takes
# seconds and fails the same way twice; HYPOTHESIS_PROFILE=soak runs many more examples, randomized.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "soak",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-logs")


class OnDemandPostgres:
    """Starts the throwaway PostgreSQL at the first `url()` call, so runs that need none start none."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._url: str | None = None
        self._lock = asyncio.Lock()

    async def url(self) -> str:
        async with self._lock:
            if self._url is None:
                self._url = await self._stack.enter_async_context(throwaway_postgres())
            return self._url


@pytest.fixture(scope="session")
async def postgres() -> AsyncIterator[OnDemandPostgres]:
    async with contextlib.AsyncExitStack() as stack:
        yield OnDemandPostgres(stack)


@pytest.fixture(scope="session")
async def postgres_url(postgres: OnDemandPostgres) -> str:
    """The URL of the run's throwaway PostgreSQL (started on first use)."""
    return await postgres.url()


CONTRACT_ENV = {
    # High enough that the concurrency and replay tests never meet the limiter; the rate_limited
    # test floods past the burst on purpose.
    "TESTPULSE_RATE_LIMIT_PER_SECOND": "1000",
    "TESTPULSE_RATE_LIMIT_BURST": "300",
}


# The stock transport (TESTPULSE_TRANSPORT=stock, server/transport/auto.py) runs the contract on a smaller
# matrix: SQLite only, and without the polling-to-WebSocket upgrade (python-engineio's own code).
STOCK = "sqlite-stock"
STOCK_SKIPS_TRANSPORTS = frozenset({"upgrade"})


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param(STOCK, id=STOCK, marks=pytest.mark.stock),
    ],
)
async def node(
    request: pytest.FixtureRequest, logs_dir: Path, postgres: OnDemandPostgres
) -> AsyncIterator[NodeUnderTest]:
    """The contract node, once per database backend, and once on the stock transport."""
    db = "sqlite" if request.param == STOCK else request.param
    pg = await postgres.url() if db == "postgres" else None
    env = {**CONTRACT_ENV, "TESTPULSE_NODE_ID": f"contract-{request.param}"}
    if request.param == STOCK:
        env["TESTPULSE_TRANSPORT"] = "stock"
    async with node_with(db, env, logs_dir, pg) as running:
        yield running


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        smaller = params.get("node") == STOCK and params.get("transport") in STOCK_SKIPS_TRANSPORTS
        (dropped if smaller else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


SECURITY_ENV = {
    "TESTPULSE_NODE_ID": "security",
    "TESTPULSE_JWT_AUDIENCE": AUDIENCE,
    "TESTPULSE_RATE_LIMIT_PER_SECOND": "50",
    "TESTPULSE_RATE_LIMIT_BURST": "100",
    "TESTPULSE_MAX_PAYLOAD_BYTES": str(64 * 1024),
    "TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS": "0",
}


@pytest.fixture(scope="session")
async def secure_node(logs_dir: Path) -> AsyncIterator[NodeUnderTest]:
    """A SQLite node with an audience, default algorithms (HS256 only), a low rate limit and a 64 KiB payload limit."""
    async with node_with("sqlite", SECURITY_ENV, logs_dir) as running:
        yield running


@pytest.fixture
def token(node: NodeUnderTest) -> Callable[..., str]:
    """token(role="admin", sub=None, ttl=600, sessions=None) for the contract node."""
    return node.token


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """connect(target, role="admin", transport="websocket", token=None, name=None, **kw) -> connected Client.

    Every client made here is disconnected after the test."""
    clients: list[Client] = []

    async def make(
        target: NodeUnderTest,
        role: str = "admin",
        *,
        transport: str = "websocket",
        token: str | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> Client:
        client = Client(name or f"{role}-{len(clients)}")
        clients.append(client)
        await client.connect(target.url, token=token or target.token(role), transport=transport, **kwargs)
        return client

    yield make
    await asyncio.gather(*(client.disconnect() for client in clients), return_exceptions=True)


@pytest.fixture
async def http(node: NodeUnderTest) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.url, timeout=15.0) as client:
        yield client


@pytest.fixture(params=["websocket", "polling", "upgrade"])
def transport(request: pytest.FixtureRequest) -> str:
    """The client transport: websocket only, polling only, or polling that upgrades to websocket."""
    return str(request.param)


def pytest_report_header(config: pytest.Config) -> str:
    external = os.environ.get("TESTPULSE_TEST_POSTGRES_URL")
    return f"testpulse postgres: {'external ' + external if external else 'throwaway (initdb per run)'}"
