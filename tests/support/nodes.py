"""A running node as the tests see it: its URL, tokens signed for it, and a look into its database."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.client import Client
from support.processes import RunningNode, run_node
from testpulse.domain.auth import issue_token
from testpulse.settings import Settings

TEST_SECRET = "testpulse-test-secret-" + "0123456789abcdef" * 3  # >= 64 bytes, so HS512 tokens are fine
AUDIENCE = "testpulse-tests"

# Short drains keep teardown fast; the contract itself does not depend on them.
BASE_ENV = {
    "TESTPULSE_JWT_SECRET": TEST_SECRET,
    "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "1",
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


Connect = Callable[..., Awaitable[Client]]
