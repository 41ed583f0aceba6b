"""The Database seam: units of work on one database without blocking the event loop, and the detection
log's statements through SQLAlchemy, which an implementation overrides where its driver does more for less."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError

from testpulse.domain.protocol import DetectionIn, ErrorCode, ProtocolError
from testpulse.domain.sessions import Session, Status, StoredDetection
from testpulse.store import schema
from testpulse.store.shares import not_running, shares_of
from testpulse.store.tables import detection_from_row, detection_row, detections_t, sessions_t

log = logging.getLogger("testpulse.store")

SESSION_READ_BATCH = 500  # ids per shared session read (well under SQLite's bound-parameter limit)
T = TypeVar("T")


class Database:
    """The one seam between the store and its database: runs units of work (functions of a
    SQLAlchemy Connection, one transaction each) without blocking the event loop.

    Guarantees, whichever implementation runs them:
    - write(work) runs `work` in one transaction that commits when it returns and rolls back if
      it raises; a caller that stops waiting never leaves a transaction half done;
    - read(work) runs `work` on a consistent snapshot, concurrently with writes;
    - every operation answers within `timeout` seconds, or raises ProtocolError("unavailable"),
      as it does for a failed database;
    - run_ddl(work) runs in one transaction that concurrent node starts and migrations take in turn.

    store/auto.py's open_database(url) builds the implementation for the URL: server/store/sqlite.py for
    `sqlite+aiosqlite://`, server/store/postgres.py for `postgresql+asyncpg://`, the forms Settings
    normalise every accepted URL to.
    """

    is_sqlite: bool

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    async def write(self, work: Callable[[Connection], T]) -> T:
        raise NotImplementedError

    async def read(self, work: Callable[[Connection], T]) -> T:
        raise NotImplementedError

    async def read_sessions(self, ids: list[str]) -> list[Session]:
        """The sessions among `ids` (at most SESSION_READ_BATCH), as one read: the read every join
        makes, so each implementation does it its cheapest way."""
        raise NotImplementedError

    async def run_ddl(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in one transaction, serialised with other nodes' DDL, without the store timeout."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        """Errors of a driver used directly, beside SQLAlchemy, that mean `unavailable` too."""
        return ()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Turn a slow or failed database into the contract's `unavailable`."""
        failures: tuple[type[BaseException], ...] = (OperationalError, DBAPIError, sqlite3.Error, OSError)
        failures += (ConnectionError, *self.driver_errors())
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except TimeoutError:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the database did not answer in time; retry") from None
        except failures as exc:
            log.warning("database error: %s", exc)
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the database is unavailable; retry") from None

    async def migrate(self, *, automatic: bool) -> schema.SchemaState:
        """At node start: make sure the schema is this build's (see schema.ensure_current), in one
        transaction; safe when several nodes start at once. Without the store timeout: a
        migration of a large table may take a while, and stopping it halfway helps nobody."""
        try:
            return await self.run_ddl(lambda conn: schema.ensure_current(conn, migrate=automatic))
        except schema.SchemaError as exc:
            log.error("refusing to start: %s", exc)
            raise

    async def upgrade(self) -> schema.SchemaState:
        """`testpulse migrate`: bring the schema to head."""
        return await self.run_ddl(schema.upgrade)

    async def schema_state(self) -> schema.SchemaState:
        """Where the schema stands, as a plain read: no DDL and no DDL lock, so a check never waits
        behind a migration in progress (it sees the schema as it was before it) and never changes it.
        Raises ProtocolError("unavailable") like every read."""
        return await self.read(schema.state)

    async def ping(self) -> None:
        await self.read(lambda conn: conn.execute(text("SELECT 1")).scalar())

    # The detection log's statements. These defaults run through SQLAlchemy on write()/read();
    # an implementation overrides them where its driver does the same work for less.

    async def append_many(
        self, requests: Sequence[tuple[str, Sequence[DetectionIn]]], now: datetime
    ) -> list[list[StoredDetection] | ProtocolError]:
        """Store every request in one transaction, stamped `now`; one outcome per request, in
        order (SqlStore.append_many). Sessions are locked in id order so that two nodes committing
        overlapping groups cannot deadlock; a duplicate id takes no seq."""
        return await self.write(lambda conn: _append(conn, requests, now))

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        query = (
            select(detections_t)
            .where(detections_t.c.session_id == session_id, detections_t.c.seq > after_seq)
            .order_by(detections_t.c.seq)
            .limit(limit)
        )
        rows = await self.read(lambda conn: conn.execute(query).all())
        return [detection_from_row(row) for row in rows]

    async def prune_detections(self, cutoff: datetime, batch_rows: int) -> int | None:
        """One bounded step of retention (server/store/retention.py): delete at most `batch_rows`
        detections of one session that stopped before `cutoff`, oldest seqs first; the count, or
        None when another node is pruning (SQLite: its one writer at a time already serialises
        nodes). A stopped session never runs again (sessions.MOVES), so no append races the delete."""
        return await self.write(lambda conn: prune_one_batch(conn, cutoff, batch_rows))


def _append(
    conn: Connection, requests: Sequence[tuple[str, Sequence[DetectionIn]]], now: datetime
) -> list[list[StoredDetection] | ProtocolError]:
    outcomes: list[list[StoredDetection] | ProtocolError] = [[] for _ in requests]
    rows: list[dict[str, Any]] = []
    for share in shares_of(requests):
        ids = share.ids
        # Read under the session's lock, before the seq counter moves: a duplicate takes no seq.
        share.decide(_stored_with_ids(conn, share.session_id, ids) if ids else {})
        count = share.count
        last = _take_seqs(conn, share.session_id, count) if count else 0
        base = None if last is None else last - count
        refusal = functools.partial(_why_not_running, conn, share.session_id)
        rows += [detection_row(d) for d in share.settle(requests, base, refusal, now, outcomes)]
    if rows:
        conn.execute(detections_t.insert(), rows)
    return outcomes


def prune_one_batch(conn: Connection, cutoff: datetime, batch_rows: int) -> int:
    """Delete the oldest `batch_rows` detections of the session stopped most recently before
    `cutoff` that still has any. Newest first: the sessions stopped longer ago are the ones
    already pruned, and this walk down (status, updated_at) meets a session with detections left
    at its first steps instead of probing every pruned one each time. The delete itself repeats
    the status rule, so that no later edit of the pick can make it touch a session that is
    running, paused or stopped too recently."""
    stopped_long_ago = (sessions_t.c.status == Status.STOPPED.value) & (sessions_t.c.updated_at < cutoff)
    has_detections = select(detections_t.c.seq).where(detections_t.c.session_id == sessions_t.c.id).exists()
    victim = conn.execute(
        select(sessions_t.c.id)
        .where(stopped_long_ago, has_detections)
        .order_by(sessions_t.c.updated_at.desc(), sessions_t.c.id.desc())
        .limit(1)
    ).scalar()
    if victim is None:
        return 0
    oldest = (
        select(detections_t.c.seq)
        .where(detections_t.c.session_id == victim)
        .order_by(detections_t.c.seq)
        .limit(batch_rows)
    )
    deleted = conn.execute(
        detections_t.delete().where(
            detections_t.c.session_id == victim,
            detections_t.c.seq.in_(oldest),
            select(sessions_t.c.id).where(sessions_t.c.id == victim, stopped_long_ago).exists(),
        )
    )
    return int(deleted.rowcount)


def _stored_with_ids(conn: Connection, session_id: str, ids: list[str]) -> dict[str, StoredDetection]:
    """The session's stored detections among `ids`, read after locking the session row. Another
    node appending the same ids waits on that lock, then sees this transaction's rows. (SQLite
    has no FOR UPDATE: BEGIN IMMEDIATE already holds the database's write lock.)"""
    conn.execute(select(sessions_t.c.id).where(sessions_t.c.id == session_id).with_for_update())
    found: dict[str, StoredDetection] = {}
    for start in range(0, len(ids), SESSION_READ_BATCH):
        chunk = ids[start : start + SESSION_READ_BATCH]
        query = select(detections_t).where(detections_t.c.session_id == session_id, detections_t.c.id.in_(chunk))
        for row in conn.execute(query):
            found[row.id] = detection_from_row(row)
    return found


def _take_seqs(conn: Connection, session_id: str, count: int) -> int | None:
    """Move the session's seq counter by `count` if it is running; its new last seq, or None."""
    last: int | None = conn.execute(
        update(sessions_t)
        .where(sessions_t.c.id == session_id, sessions_t.c.status == Status.RUNNING.value)
        .values(last_seq=sessions_t.c.last_seq + count)
        .returning(sessions_t.c.last_seq)
    ).scalar()
    return last


def _why_not_running(conn: Connection, session_id: str) -> ProtocolError:
    status = conn.execute(select(sessions_t.c.status).where(sessions_t.c.id == session_id)).scalar()
    return not_running(session_id, status)
