"""The Database seam on PostgreSQL: the async engine (asyncpg), no threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from server.sessions import Session
from server.store import SESSIONS_BY_ID, Database, session_from_row

T = TypeVar("T")
DDL_LOCK = 727274  # the advisory lock every node's DDL takes in turn


class PostgresDatabase(Database):
    """The async engine runs each unit of work through `run_sync`, so every statement awaits the
    socket; no thread is involved."""

    is_sqlite = False

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        super().__init__(url, pool_size=pool_size, timeout=timeout)
        self._engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_timeout=timeout,
            # A node frozen inside a transaction (SIGSTOP, a partition, a stalled VM) would hold
            # its session rows' locks, and so every other node's commits to those sessions, until
            # it wakes. PostgreSQL ends such a session after twice the store timeout instead.
            connect_args={"server_settings": {"idle_in_transaction_session_timeout": str(int(timeout * 2000))}},
        )

    async def write(self, work: Callable[[Connection], T]) -> T:
        async with self._guard(), self._engine.begin() as conn:
            return await conn.run_sync(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        async with self._guard(), self._engine.connect() as conn:
            return await conn.run_sync(work)

    async def read_sessions(self, ids: list[str]) -> list[Session]:
        rows = await self.read(lambda conn: conn.execute(SESSIONS_BY_ID, {"ids": ids}).all())
        return [session_from_row(row) for row in rows]

    async def run_ddl(self, work: Callable[[Connection], T]) -> T:
        def locked(conn: Connection) -> T:
            # Serialises concurrent node starts and migrations (SQLite's BEGIN IMMEDIATE does it there).
            conn.execute(text(f"SELECT pg_advisory_xact_lock({DDL_LOCK})"))
            return work(conn)

        async with self._engine.begin() as conn:
            return await conn.run_sync(locked)

    async def close(self) -> None:
        await self._engine.dispose()
