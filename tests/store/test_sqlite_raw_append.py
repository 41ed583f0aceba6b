"""SQLite's append straight on sqlite3 stores exactly what the engine path stores: the same
column values and storage types, row for row, and the same outcomes, for every kind of value."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from testpulse.domain.protocol import DetectionIn, ProtocolError
from testpulse.domain.sessions import Session, Status, utcnow
from testpulse.store.auto import open_database
from testpulse.store.database import Database
from testpulse.store.repository import SqlStore
from testpulse.store.sqlite import SqliteDatabase

from .conftest import EngineAppendSqlite

pytestmark = pytest.mark.store

ITEMS = [
    DetectionIn("car", 0.5, None, None, None, None),
    DetectionIn("bus", 1, [1, 2.5, 3.0, 4], 7, 1_700_000_000_123, {"k": [1, 2], "s": "é"}, "id-1"),
    DetectionIn("van", 0.25, [0.0, 0.0, 1.0, 1.0], 0, 12.75, {}, "id-2"),
    DetectionIn("again", 0.9, None, None, None, None, "id-1"),  # a repeat in the request: no seq
]


async def _store_in(db: Database) -> list[Any]:
    await db.migrate(automatic=True)
    store = SqlStore(db)
    now = utcnow()
    for session_id, status in (("on", Status.RUNNING), ("off", Status.PAUSED)):
        await store.create(Session(session_id, session_id, Status.CREATED, now, now, 0), "test")
        assert await store.change_status(session_id, Status.CREATED, Status.RUNNING, "test", None)
        if status is Status.PAUSED:
            assert await store.change_status(session_id, Status.RUNNING, Status.PAUSED, "test", None)
    first = await store.append_many([("on", ITEMS), ("off", ITEMS[:1]), ("nowhere", ITEMS[:1])])
    second = await store.append_many([("on", [ITEMS[2], ITEMS[0]])])  # a stored id comes back a duplicate
    outcomes = [
        o
        if isinstance(o, ProtocolError)
        else [(d.seq, d.label, d.bbox, d.ts, d.attributes, d.id, d.duplicate) for d in o]
        for o in first + second
    ]
    await db.close()
    return outcomes


def _rows(path: Path) -> list[tuple[Any, ...]]:
    raw = sqlite3.connect(path)
    try:
        columns = "session_id, seq, label, confidence, bbox, frame, ts, attributes, id"
        typed = ", ".join(f"typeof({c})" for c in columns.split(", "))
        return raw.execute(f"SELECT {columns}, {typed}, length(received_at) FROM detections ORDER BY seq").fetchall()
    finally:
        raw.close()


async def test_the_sqlite3_append_stores_what_the_engine_append_stores(tmp_path: Path) -> None:
    straight, engine = tmp_path / "straight.db", tmp_path / "engine.db"

    got = await _store_in(open_database(f"sqlite+aiosqlite:///{straight}"))
    expected = await _store_in(EngineAppendSqlite(f"sqlite+aiosqlite:///{engine}"))

    assert SqliteDatabase.append_many is not Database.append_many  # the sqlite3 path is the one compared
    assert _rows(straight) == _rows(engine)
    assert [o if not isinstance(o, ProtocolError) else (o.code, o.message) for o in got] == [
        o if not isinstance(o, ProtocolError) else (o.code, o.message) for o in expected
    ]
