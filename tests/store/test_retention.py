"""Retention (server/store/retention.py) on real SQLite and PostgreSQL: what a step may delete, and how much."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY

from testpulse.domain.protocol import DetectionIn
from testpulse.domain.sessions import Status, utcnow
from testpulse.store.postgres import PRUNE_LOCK
from testpulse.store.repository import SqlStore
from testpulse.store.retention import Retention

from .conftest import asyncpg_dsn, session_with

pytestmark = pytest.mark.store

DAYS = 30.0


async def seqs(store: SqlStore, session_id: str) -> list[int]:
    return [d.seq for d in await store.since(session_id, 0, 10_000)]


def retention(store: SqlStore, *, days_later: float, batch_rows: int = 1000) -> Retention:
    """Retention of DAYS, seen from `days_later` days from now."""
    moment = utcnow() + timedelta(days=days_later)

    def clock() -> datetime:
        return moment

    return Retention(store, days=DAYS, batch_rows=batch_rows, pause_seconds=0, check_seconds=1, clock=clock)


async def prune_all(job: Retention) -> int:
    total = 0
    while pruned := await job.step():
        total += pruned
    return total


async def test_a_session_stopped_longer_ago_than_the_retention_loses_its_detections_and_keeps_its_row(
    store: SqlStore,
) -> None:
    stopped = await session_with(store, 5, ends=Status.STOPPED)

    assert await prune_all(retention(store, days_later=DAYS + 1)) == 5

    assert await seqs(store, stopped) == []
    session = await store.get(stopped)
    assert session is not None and session.status is Status.STOPPED and session.last_seq == 5
    assert [t["status"] for t in await store.transitions(stopped)] == ["running", "stopped"]


async def test_running_paused_and_recently_stopped_sessions_are_never_touched(store: SqlStore) -> None:
    running = await session_with(store, 3, ends=Status.RUNNING)
    paused = await session_with(store, 3, ends=Status.PAUSED)
    stopped = await session_with(store, 3, ends=Status.STOPPED)

    # Long after all three were last changed: only the stopped one goes.
    assert await prune_all(retention(store, days_later=DAYS + 1)) == 3
    assert await seqs(store, running) == [1, 2, 3]
    assert await seqs(store, paused) == [1, 2, 3]
    assert await seqs(store, stopped) == []

    # A running session still appends after a pruning round, from its own next seq.
    appended = await store.append(running, [DetectionIn("car", 0.5, None, None, None, None)])
    assert [d.seq for d in appended] == [4]

    recently = await session_with(store, 3, ends=Status.STOPPED)
    assert await prune_all(retention(store, days_later=DAYS - 1)) == 0
    assert await seqs(store, recently) == [1, 2, 3]


async def test_a_step_deletes_at_most_its_batch_oldest_first_from_one_session(store: SqlStore) -> None:
    first = await session_with(store, 25, ends=Status.STOPPED)
    second = await session_with(store, 4, ends=Status.STOPPED)
    job = retention(store, days_later=DAYS + 1, batch_rows=10)
    before = REGISTRY.get_sample_value("testpulse_retention_pruned_detections_total") or 0.0

    steps = [await job.step() for _ in range(5)]

    # The session stopped last goes first, then the one before, ten at a time; then nothing is left.
    assert steps == [4, 10, 10, 5, 0]
    assert await seqs(store, first) == [] and await seqs(store, second) == []
    after = REGISTRY.get_sample_value("testpulse_retention_pruned_detections_total") or 0.0
    assert after - before == 29


async def test_a_step_leaves_the_rest_of_the_session_in_place(store: SqlStore) -> None:
    stopped = await session_with(store, 25, ends=Status.STOPPED)

    assert await retention(store, days_later=DAYS + 1, batch_rows=10).step() == 10

    assert await seqs(store, stopped) == list(range(11, 26))


# SQLite needs no such test: it runs one writer at a time, so its nodes take turns by themselves.
@pytest.mark.parametrize("store", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_on_postgres_a_node_skips_its_step_while_another_node_prunes(store: SqlStore) -> None:
    stopped = await session_with(store, 5, ends=Status.STOPPED)
    other_node = await asyncpg.connect(asyncpg_dsn(store.db.url))
    try:
        await other_node.execute("SELECT pg_advisory_lock($1)", PRUNE_LOCK)
        assert await retention(store, days_later=DAYS + 1).step() is None
        assert await seqs(store, stopped) == [1, 2, 3, 4, 5]
    finally:
        await other_node.close()

    assert await retention(store, days_later=DAYS + 1).step() == 5
