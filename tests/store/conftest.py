"""Fixtures for the store's own tests: a SqlStore on a fresh, migrated SQLite or PostgreSQL database."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from testpulse.domain.protocol import DetectionIn
from testpulse.domain.sessions import Session, Status, utcnow
from testpulse.store.auto import open_database
from testpulse.store.database import Database
from testpulse.store.repository import SqlStore
from testpulse.store.sqlite import SqliteDatabase

DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    # The seam's default append (SQLAlchemy on write()), which SqliteDatabase overrides with sqlite3.
    pytest.param("sqlite-engine", id="sqlite-engine"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


class EngineAppendSqlite(SqliteDatabase):
    """SQLite with the Database seam's own append_many, so the default path stays tested."""

    append_many = Database.append_many


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(params=DATABASES)
async def store(request: pytest.FixtureRequest, tmp_path: Path, postgres: Any) -> AsyncIterator[SqlStore]:
    """A store on an empty, migrated database: a new SQLite file, or a new database on the run's PostgreSQL."""
    if request.param.startswith("sqlite"):
        url, drop = f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}", None
    else:
        server_url = make_url(await postgres.url())
        drop = f"retention_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(asyncpg_dsn(str(server_url.render_as_string(hide_password=False))))
        await admin.execute(f"CREATE DATABASE {drop}")
        url = server_url.set(database=drop).render_as_string(hide_password=False)
    db = EngineAppendSqlite(url) if request.param == "sqlite-engine" else open_database(url)
    try:
        await db.migrate(automatic=True)
        yield SqlStore(db)
    finally:
        await db.close()
        if drop is not None:
            await admin.execute(f"DROP DATABASE {drop} WITH (FORCE)")
            await admin.close()


async def session_with(store: SqlStore, detections: int, *, ends: Status = Status.RUNNING) -> str:
    """A session that ran, got `detections`, then moved to `ends` (running: stays running)."""
    now = utcnow()
    session_id = f"s-{secrets.token_hex(4)}"
    await store.create(Session(session_id, session_id, Status.CREATED, now, now, 0), "test")
    assert await store.change_status(session_id, Status.CREATED, Status.RUNNING, "test", None)
    item = DetectionIn("car", 0.5, None, None, None, None)
    for _ in range(detections):
        await store.append(session_id, [item])
    if ends is not Status.RUNNING:
        assert await store.change_status(session_id, Status.RUNNING, ends, "test", None)
    return session_id
