"""The switch of a fresh SQLite file to WAL waits for a lock held elsewhere instead of failing:
SQLite refuses that switch at once, without its busy handler, and a node starting beside another
on one new file failed its start-up with `database is locked`."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from testpulse.store.sqlite import use_wal

pytestmark = pytest.mark.store


def held_lock(path: Path, seconds: float) -> threading.Thread:
    """A connection in rollback-journal mode that holds a write lock on `path` for `seconds`."""
    locked = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("CREATE TABLE IF NOT EXISTS t (a)")
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t VALUES (1)")
        locked.set()
        threading.Event().wait(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(5)
    return thread


def test_the_switch_waits_for_the_other_connections_lock(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    holder = held_lock(path, 0.5)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        conn.execute("PRAGMA journal_mode=WAL")  # what SQLite does on its own: no wait at all
    use_wal(conn.cursor(), timeout=5)
    holder.join()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_lock_held_past_the_timeout_still_fails(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    holder = held_lock(path, 1.0)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(conn.cursor(), timeout=0.2)
    holder.join()
