"""SQLModel tables, the Database seam, and SessionStore and EventLog over it (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Float,
    Index,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Field, SQLModel

from server import schema
from server.protocol import DetectionIn, ErrorCode, ProtocolError
from server.sessions import ACTIONS, Session, Status, StoredDetection, first_occurrences, iso, utcnow

log = logging.getLogger("testpulse.store")

SESSION_READ_BATCH = 500  # ids per shared session read (well under SQLite's bound-parameter limit)
SESSION_READ_SPACING = 0.01  # seconds between the starts of shared session reads, under load
T = TypeVar("T")


class SessionRow(SQLModel, table=True):
    __tablename__ = "test_sessions"
    # Counts by status, and retention's walk over stopped sessions by age (migration 0003).
    __table_args__ = (Index("ix_test_sessions_status_updated_at", "status", "updated_at"),)

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(default="", max_length=200)
    status: str = Field(max_length=16)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The session row is the seq counter: appends bump it in the transaction that inserts the rows.
    last_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class DetectionRow(SQLModel, table=True):
    __tablename__ = "detections"
    # NULLs are distinct in a unique index (SQLite and PostgreSQL): only detections given an id are
    # held to one per session. Appends find stored ids first, under the session's lock; the index
    # is the backstop that makes a second copy impossible whatever a writer does.
    __table_args__ = (Index("uq_detections_session_id_id", "session_id", "id", unique=True),)

    session_id: str = Field(primary_key=True, foreign_key="test_sessions.id", max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    label: str = Field(max_length=128)
    confidence: float = Field(sa_column=Column(Float, nullable=False))
    bbox: list[float] | None = Field(default=None, sa_column=Column(JSON))
    frame: int | None = Field(default=None, sa_column=Column(BigInteger))
    # JSON keeps the publisher's number exactly as sent (int stays int), so `ts` echoes unchanged.
    ts: float | None = Field(default=None, sa_column=Column(JSON))
    attributes: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # The publisher's idempotency key (PROTOCOL.md 1.1); added by migration 0002.
    id: str | None = Field(default=None, max_length=64)


class AuditRow(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(index=True, max_length=64)
    action: str = Field(max_length=16)
    actor: str = Field(max_length=256)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str = Field(max_length=16)
    reason: str | None = Field(default=None, max_length=500)
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class SchemaVersionRow(SQLModel, table=True):
    __tablename__ = "schema_version"

    version: int = Field(primary_key=True)
    applied_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


sessions_t = SessionRow.__table__  # type: ignore[attr-defined]
detections_t = DetectionRow.__table__  # type: ignore[attr-defined]
audit_t = AuditRow.__table__  # type: ignore[attr-defined]

# Built once: SQLAlchemy memoizes a statement's cache key on the object, so a join storm's reads
# skip building and keying a new SELECT each time (most of their cost on the event loop).
SESSIONS_BY_ID = select(sessions_t).where(sessions_t.c.id.in_(bindparam("ids", expanding=True)))


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; everything is stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def session_from_row(row: Any) -> Session:
    return Session(
        id=row.id,
        name=row.name,
        status=Status(row.status),
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        last_seq=row.last_seq,
        config=row.config or {},
    )


def _detection(row: Any) -> StoredDetection:
    return StoredDetection(
        session_id=row.session_id,
        seq=row.seq,
        label=row.label,
        confidence=row.confidence,
        bbox=row.bbox,
        frame=row.frame,
        ts=row.ts,
        attributes=row.attributes,
        received_at=_aware(row.received_at),
        id=row.id,
    )


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

    `Database(url)` is the implementation for the URL (the way pathlib.Path() is a PosixPath):
    server/store_sqlite.py for `sqlite+aiosqlite://`, server/store_postgres.py for
    `postgresql+asyncpg://`, the forms Settings normalise every accepted URL to.
    """

    is_sqlite: bool

    def __new__(cls, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> Database:
        if cls is Database:
            cls = _implementation(url)
        return super().__new__(cls)

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
        return [_detection(row) for row in rows]

    async def prune_detections(self, cutoff: datetime, batch_rows: int) -> int | None:
        """One bounded step of retention (server/retention.py): delete at most `batch_rows`
        detections of one session that stopped before `cutoff`, oldest seqs first; the count, or
        None when another node is pruning (SQLite: its one writer at a time already serialises
        nodes). A stopped session never runs again (sessions.MOVES), so no append races the delete."""
        return await self.write(lambda conn: prune_one_batch(conn, cutoff, batch_rows))


def _implementation(url: str) -> type[Database]:
    # Imported here: each implementation builds on this module.
    if url.startswith("sqlite+aiosqlite://"):
        from server.store_sqlite import SqliteDatabase

        return SqliteDatabase
    if url.startswith("postgresql+asyncpg://"):
        from server.store_postgres import PostgresDatabase

        return PostgresDatabase
    raise ValueError(f"no store for {url.split('://')[0]!r} URLs (Settings normalises the accepted forms)")


class SqlStore:
    """SessionStore and EventLog over SQL; see their Protocols in sessions.py for the guarantees."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # Session reads asked for while one is running are answered together by the next one.
        self._wanted: dict[str, list[asyncio.Future[Session | None]]] = {}
        self._reading: asyncio.Task[None] | None = None
        self._next_read_at = 0.0

    # ---- SessionStore ------------------------------------------------------------------------

    async def create(self, session: Session, actor: str) -> None:
        def insert(conn: Connection) -> None:
            conn.execute(
                sessions_t.insert().values(
                    id=session.id,
                    name=session.name,
                    status=session.status.value,
                    config=session.config,
                    last_seq=0,
                    created_at=session.created_at,
                    updated_at=session.updated_at,
                )
            )
            conn.execute(
                audit_t.insert().values(
                    session_id=session.id,
                    action="create",
                    actor=actor[:256],
                    from_status=None,
                    to_status=session.status.value,
                    reason=None,
                    at=session.created_at,
                )
            )

        await self.db.write(insert)

    async def get(self, session_id: str) -> Session | None:
        """The session as stored when the read runs, which is always after this call. A join storm
        asks for thousands of sessions at once: concurrent calls share one `IN (...)` query."""
        answer: asyncio.Future[Session | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(session_id, []).append(answer)
        if self._reading is None:
            self._reading = asyncio.create_task(self._read_wanted(), name="testpulse-session-reads")
        return await answer

    async def _read_wanted(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._wanted:
                # Under load, reads start at most every SESSION_READ_SPACING seconds, so a join storm
                # shares each read (and its trip to a database thread, which on a busy machine costs
                # far more than the query) among the joins of the last few milliseconds. An idle
                # node reads at once.
                wait = self._next_read_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._next_read_at = loop.time() + SESSION_READ_SPACING
                ids = list(itertools.islice(self._wanted, SESSION_READ_BATCH))
                waiting = {session_id: self._wanted.pop(session_id) for session_id in ids}
                try:
                    sessions = await self.db.read_sessions(ids)
                except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
                    for futures in waiting.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                found = {session.id: session for session in sessions}
                for session_id, futures in waiting.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(session_id))
        finally:
            self._reading = None

    async def list_sessions(self, only: frozenset[str] | None, limit: int) -> list[Session]:
        query = select(sessions_t).order_by(sessions_t.c.created_at.desc(), sessions_t.c.id).limit(limit)
        if only is not None:
            query = query.where(sessions_t.c.id.in_(sorted(only)))
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return [session_from_row(row) for row in rows]

    async def change_status(
        self, session_id: str, expected: Status, target: Status, actor: str, reason: str | None
    ) -> Session | None:
        now = utcnow()

        def change(conn: Connection) -> Any:
            row = conn.execute(
                update(sessions_t)
                .where(sessions_t.c.id == session_id, sessions_t.c.status == expected.value)
                .values(status=target.value, updated_at=now)
                .returning(*sessions_t.c)
            ).first()
            if row is not None:
                conn.execute(
                    audit_t.insert().values(
                        session_id=session_id,
                        action=_action(expected, target),
                        actor=actor[:256],
                        from_status=expected.value,
                        to_status=target.value,
                        reason=reason,
                        at=now,
                    )
                )
            return row

        row = await self.db.write(change)
        return None if row is None else session_from_row(row)

    async def count_by_status(self) -> dict[str, int]:
        query = select(sessions_t.c.status, func.count()).group_by(sessions_t.c.status)
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return {status: count for status, count in rows}

    async def audit(self, session_id: str) -> list[dict[str, Any]]:
        query = select(audit_t).where(audit_t.c.session_id == session_id).order_by(audit_t.c.id)
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return [
            {
                "action": r.action,
                "actor": r.actor,
                "from_status": r.from_status,
                "to_status": r.to_status,
                "reason": r.reason,
                "at": _aware(r.at),
            }
            for r in rows
        ]

    async def transitions(self, session_id: str) -> list[dict[str, Any]]:
        """The session's status changes, oldest first, as `test_session_update` payloads."""
        return [
            {
                "session_id": session_id,
                "status": row["to_status"],
                "previous_status": row["from_status"],
                "updated_at": iso(row["at"]),
                "actor": row["actor"],
            }
            for row in await self.audit(session_id)
            if row["from_status"] is not None
        ]

    # ---- EventLog ----------------------------------------------------------------------------

    async def append(self, session_id: str, items: Sequence[DetectionIn]) -> list[StoredDetection]:
        outcome = await self.append_many([(session_id, items)])
        result = outcome[0]
        if isinstance(result, ProtocolError):
            raise result
        return result

    async def append_many(
        self, requests: Sequence[tuple[str, Sequence[DetectionIn]]]
    ) -> list[list[StoredDetection] | ProtocolError]:
        """Append several requests in one transaction (group commit). Each request gets its own
        outcome; a request for a session that is not running fails alone."""
        return await self.db.append_many(requests, utcnow())

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        return await self.db.since(session_id, after_seq, limit)

    async def prune(self, cutoff: datetime, batch_rows: int) -> int | None:
        """Delete up to `batch_rows` detections of a session stopped before `cutoff`: how many went,
        or None when another node is pruning (Database.prune_detections)."""
        return await self.db.prune_detections(cutoff, batch_rows)


@dataclass(slots=True)
class Share:
    """One session's part of a group commit: its requests' items, in request order, and what the
    store said about them. Both implementations fill it the same way: `decide` once the stored
    ids are known (under the session's lock), then `settle` once the seq counter has moved."""

    session_id: str
    indexes: list[int]  # the requests of this session, by index
    items: list[DetectionIn]
    known: dict[str, StoredDetection] = dataclasses.field(default_factory=dict)
    fresh: list[bool] = dataclasses.field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return sorted({item.id for item in self.items if item.id is not None})

    @property
    def count(self) -> int:
        """How many seqs this share takes: its fresh items."""
        return self.fresh.count(True)

    def decide(self, known: dict[str, StoredDetection]) -> None:
        self.known = known
        self.fresh = first_occurrences([item.id for item in self.items], known)

    def fresh_items(self) -> list[DetectionIn]:
        return [item for item, new in zip(self.items, self.fresh, strict=True) if new]

    def settle(
        self,
        requests: Sequence[tuple[str, Sequence[DetectionIn]]],
        base: int | None,
        refusal: Callable[[], ProtocolError],
        now: datetime,
        outcomes: list[list[StoredDetection] | ProtocolError],
    ) -> list[StoredDetection]:
        """Fill this share's outcomes, its fresh items numbered from `base` + 1 (None: the
        session is not running, and `refusal()` says why); the stored detections to insert."""
        if base is None:
            error = refusal()
            for i in self.indexes:
                # A retry of detections already stored still learns their seqs.
                outcomes[i] = _only_known(requests[i][1], self.known) or error
            return []
        seq = base
        by_id = dict(self.known)
        answered: list[StoredDetection] = []
        inserted: list[StoredDetection] = []
        for item, new in zip(self.items, self.fresh, strict=True):
            if not new:
                assert item.id is not None
                answered.append(dataclasses.replace(by_id[item.id], duplicate=True))
                continue
            seq += 1
            stored = StoredDetection(
                self.session_id,
                seq,
                item.label,
                item.confidence,
                item.bbox,
                item.frame,
                item.ts,
                item.attributes,
                now,
                item.id,
            )
            if item.id is not None:
                by_id[item.id] = stored
            answered.append(stored)
            inserted.append(stored)
        position = 0
        for i in self.indexes:
            size = len(requests[i][1])
            outcomes[i] = answered[position : position + size]
            position += size
        return inserted


def shares_of(requests: Sequence[tuple[str, Sequence[DetectionIn]]]) -> list[Share]:
    """The group's shares, in session id order: the order both implementations lock sessions in,
    so that two nodes committing overlapping groups cannot deadlock."""
    by_session: dict[str, list[int]] = {}
    for index, (session_id, _) in enumerate(requests):
        by_session.setdefault(session_id, []).append(index)
    return [
        Share(session_id, indexes, [item for i in indexes for item in requests[i][1]])
        for session_id, indexes in sorted(by_session.items())
    ]


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
        rows += [_detection_row(d) for d in share.settle(requests, base, refusal, now, outcomes)]
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
            found[row.id] = _detection(row)
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


def _only_known(items: Sequence[DetectionIn], known: dict[str, StoredDetection]) -> list[StoredDetection]:
    """The stored detections of `items` when every one of them is already stored, else []."""
    if not all(item.id is not None and item.id in known for item in items):
        return []
    return [dataclasses.replace(known[item.id], duplicate=True) for item in items if item.id is not None]


def _why_not_running(conn: Connection, session_id: str) -> ProtocolError:
    status = conn.execute(select(sessions_t.c.status).where(sessions_t.c.id == session_id)).scalar()
    return not_running(session_id, status)


def not_running(session_id: str, status: str | None) -> ProtocolError:
    """Why an append to `session_id`, found with `status` (None: no such session), was refused."""
    if status is None:
        return ProtocolError(ErrorCode.NOT_FOUND, f"session '{session_id}' does not exist")
    return ProtocolError(ErrorCode.SESSION_NOT_RUNNING, f"session '{session_id}' is {status}, not running")


def _detection_row(d: StoredDetection) -> dict[str, Any]:
    return {
        "session_id": d.session_id,
        "seq": d.seq,
        "label": d.label,
        "confidence": d.confidence,
        "bbox": d.bbox,
        "frame": d.frame,
        "ts": d.ts,
        "attributes": d.attributes,
        "received_at": d.received_at,
        "id": d.id,
    }


def _action(expected: Status, target: Status) -> str:
    return ACTIONS.get((expected, target), target.value)
