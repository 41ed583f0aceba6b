"""Shared fixtures: real testpulse nodes per database backend, tokens, and recording Socket.IO clients."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.client import Client
from support.processes import RunningNode, run_node, throwaway_postgres

from server.auth import issue_token
from server.settings import Settings

TEST_SECRET = "testpulse-test-secret-0123456789abcdef-XYZ"
AUDIENCE = "testpulse-tests"

# Short drains keep teardown fast; the contract itself does not depend on them.
BASE_ENV = {
    "TESTPULSE_JWT_SECRET": TEST_SECRET,
    "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "3",
    "TESTPULSE_LOG_LEVEL": "info",
}


@dataclass
class NodeUnderTest:
    """A running node plus what tests need to talk to it and inspect its database."""

    db: str
    node: RunningNode
    settings: Settings
    database_url: str
    sqlite_path: Path | None = None

    @property
    def url(self) -> str:
        return self.node.url

    def token(
        self,
        role: str = "admin",
        *,
        sub: str | None = None,
        ttl: float = 600.0,
        sessions: list[str] | None = None,
    ) -> str:
        return issue_token(self.settings, role=role, sub=sub or f"test-{role}", ttl_seconds=ttl, sessions=sessions)

    def headers(self, role: str = "admin", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, **kwargs)}"}

    async def audit_rows(self, session_id: str) -> list[dict[str, Any]]:
        """The audit log of one session, read straight from the node's database."""
        query = "SELECT action, actor, from_status, to_status, reason FROM audit_log WHERE session_id = {} ORDER BY id"
        if self.sqlite_path is not None:
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as conn:
                conn.row_factory = sqlite3.Row
                return [dict(r) for r in conn.execute(query.format("?"), (session_id,))]
        import asyncpg

        conn = await asyncpg.connect(self.database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return [dict(r) for r in await conn.fetch(query.format("$1"), session_id)]
        finally:
            await conn.close()


def _settings(env: dict[str, str]) -> Settings:
    return Settings.from_env({**env, "TESTPULSE_DATABASE_URL": "sqlite+aiosqlite:///unused.db"})


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-logs")


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    async with throwaway_postgres() as url:
        yield url


@contextlib.asynccontextmanager
async def node_with(
    db: str, env: dict[str, str], logs_dir: Path, postgres_url: str | None = None
) -> AsyncIterator[NodeUnderTest]:
    """A node on a fresh SQLite file, or on `postgres_url` (shared by every postgres node of the run)."""
    full = {**BASE_ENV, **env}
    with tempfile.TemporaryDirectory(prefix="tp-sqlite-") as tmp:
        sqlite_path = Path(tmp) / "testpulse.db" if db == "sqlite" else None
        url = f"sqlite+aiosqlite:///{sqlite_path}" if sqlite_path is not None else postgres_url
        assert url is not None
        full["TESTPULSE_DATABASE_URL"] = url
        async with run_node(full, log_dir=logs_dir) as node:
            yield NodeUnderTest(db, node, _settings(full), url, sqlite_path)


CONTRACT_ENV = {
    # High enough that the concurrency and replay tests never meet the limiter; the rate_limited
    # test floods past the burst on purpose.
    "TESTPULSE_RATE_LIMIT_PER_SECOND": "2000",
    "TESTPULSE_RATE_LIMIT_BURST": "300",
}


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
async def node(request: pytest.FixtureRequest, logs_dir: Path) -> AsyncIterator[NodeUnderTest]:
    """The contract node, once per database backend."""
    pg = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    env = {**CONTRACT_ENV, "TESTPULSE_NODE_ID": f"contract-{request.param}"}
    async with node_with(request.param, env, logs_dir, pg) as running:
        yield running


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


Connect = Callable[..., Awaitable[Client]]


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
    for client in clients:
        with contextlib.suppress(Exception):
            await client.disconnect()


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
