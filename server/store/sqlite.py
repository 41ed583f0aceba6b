"""The Database seam on SQLite: each unit of work runs whole in a thread of its own, on a synchronous engine."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from testpulse.domain.protocol import DetectionIn, ProtocolError
from testpulse.domain.sessions import Session, Status, StoredDetection
from testpulse.store.database import SESSION_READ_BATCH, Database
from testpulse.store.shares import not_running, shares_of
from testpulse.store.tables import DETECTION_COLUMNS, DetectionColumn, columns_sql, derive, detection_of, tuple_of

T = TypeVar("T")
READERS = 2  # reader threads (and connections) per node; WAL readers do not block the writer


class SqliteDatabase(Database):
    """A transaction costs one hop to its thread and one back, however many statements it has
    (aiosqlite would pay a hop per statement, fetch and commit). Writes go through one thread and
    take the write lock up front (BEGIN IMMEDIATE: two processes never deadlock upgrading a read
    lock, and concurrent DDL takes its turn); reads use a few threads of their own (WAL lets them
    run beside a writer)."""

    is_sqlite = True

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        super().__init__(url, pool_size=pool_size, timeout=timeout)
        sync_url = url.replace("sqlite+aiosqlite://", "sqlite://", 1)
        self._writer = self._engine(sync_url, immediate=True)
        self._reader = self._engine(sync_url, immediate=False, pool_size=READERS)
        path = make_url(sync_url).database or ""
        # One thread for every write: SQLAlchemy's and the sqlite3 ones never overlap.
        self._write_thread = SqliteReaders(path, timeout, 1, name="write", prepare=self._prepare_writer)
        self._read_threads = SqliteReaders(path, timeout, READERS)

    def _engine(self, url: str, *, immediate: bool, pool_size: int = 1) -> Engine:
        engine = create_engine(
            url,
            connect_args={"timeout": self.timeout, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=0,
        )

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Hand transaction control to the "begin" hook below instead of pysqlite's own.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            use_wal(cursor, self.timeout)
            # WAL + NORMAL survives a killed process; only an OS crash may lose the last commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    async def write(self, work: Callable[[Connection], T]) -> T:
        def transaction(_raw: sqlite3.Connection) -> T:
            with self._writer.begin() as conn:
                return work(conn)

        async with self._guard():
            # A caller that gives up leaves the job to finish in its thread: never half a transaction.
            return await self._write_thread.run(transaction)

    async def write_raw(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the writer thread's own sqlite3 connection, in one BEGIN IMMEDIATE
        transaction that commits when it returns and rolls back if it raises: write() without
        SQLAlchemy's pool checkout, begin/commit events and per-execution compile and processing,
        for the hot append. One thread runs both, so their transactions never overlap."""

        def transaction(raw: sqlite3.Connection) -> T:
            raw.execute("BEGIN IMMEDIATE")
            try:
                result = work(raw)
                raw.execute("COMMIT")
            except BaseException:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise
            return result

        async with self._guard():
            # A caller that gives up leaves the job to finish in its thread: never half a transaction.
            return await self._write_thread.run(transaction)

    def _prepare_writer(self, raw: sqlite3.Connection) -> None:
        # The engine's connect hook, for the writer thread's own connection too (WAL is the file's).
        raw.execute("PRAGMA synchronous=NORMAL")
        raw.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        raw.execute("PRAGMA foreign_keys=ON")

    async def append_many(
        self, requests: Sequence[tuple[str, Sequence[DetectionIn]]], now: datetime
    ) -> list[list[StoredDetection] | ProtocolError]:
        return await self.write_raw(lambda raw: _append_raw(raw, requests, now))

    async def read(self, work: Callable[[Connection], T]) -> T:
        def transaction(_raw: sqlite3.Connection) -> T:
            with self._reader.begin() as conn:
                return work(conn)

        async with self._guard():
            return await self._read_threads.run(transaction)

    async def read_sessions(self, ids: list[str]) -> list[Session]:
        return await self.read_raw(lambda raw: _sessions_by_id(raw, ids))

    async def read_raw(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on a reader thread's own sqlite3 connection in autocommit mode, for hot
        single-statement reads (a statement is its own snapshot). It skips the pool checkout,
        BEGIN and COMMIT that cost ten times a point query, and the executor's futures."""
        async with self._guard():
            return await self._read_threads.run(work)

    async def run_ddl(self, work: Callable[[Connection], T]) -> T:
        def transaction(_raw: sqlite3.Connection) -> T:
            with self._writer.begin() as conn:
                return work(conn)

        return await self._write_thread.run(transaction)

    async def close(self) -> None:
        # Joins after the jobs already queued (a shutdown finishes its writes first).
        self._write_thread.close()
        self._read_threads.close()
        self._writer.dispose()
        self._reader.dispose()


# The sessions-by-id read in sqlite3's own terms: every join reads its session, and SQLAlchemy's
# per-execution work (expanding the IN list, result processing) costs several times the query.
SESSIONS_BY_ID_SQL = (
    "SELECT id, name, status, config, last_seq, created_at, updated_at FROM test_sessions WHERE id IN ({marks})"
)


def _sessions_by_id(raw: sqlite3.Connection, ids: list[str]) -> list[Session]:
    cursor = raw.execute(SESSIONS_BY_ID_SQL.format(marks=",".join("?" * len(ids))), ids)
    return [
        Session(
            id=session_id,
            name=name,
            status=Status(status),
            config=json.loads(config) if config else {},
            last_seq=last_seq,
            # SQLAlchemy's SQLite DateTime stores ISO text in UTC, without a zone.
            created_at=datetime.fromisoformat(created_at).replace(tzinfo=UTC),
            updated_at=datetime.fromisoformat(updated_at).replace(tzinfo=UTC),
        )
        for session_id, name, status, config, last_seq, created_at, updated_at in cursor.fetchall()
    ]


# The group append (store._append) in sqlite3's own terms, storing what SQLAlchemy's types store:
# JSON columns as json.dumps text (None as 'null'), DateTime as naive ISO text in UTC. BEGIN
# IMMEDIATE already holds the write lock that the engine path's SELECT ... FOR UPDATE stands for.
TAKE_SEQS_SQL = "UPDATE test_sessions SET last_seq = last_seq + ? WHERE id = ? AND status = ? RETURNING last_seq"
STATUS_SQL = "SELECT status FROM test_sessions WHERE id = ?"
STORED_WITH_IDS_SQL = f"SELECT {columns_sql()} FROM detections WHERE session_id = ? AND id IN ({{marks}})"
INSERT_DETECTION_SQL = f"INSERT INTO detections ({columns_sql()}) VALUES ({', '.join('?' * len(DETECTION_COLUMNS))})"


def _append_raw(
    raw: sqlite3.Connection, requests: Sequence[tuple[str, Sequence[DetectionIn]]], now: datetime
) -> list[list[StoredDetection] | ProtocolError]:
    outcomes: list[list[StoredDetection] | ProtocolError] = [[] for _ in requests]
    stamp = _sqlite_time(now)
    rows: list[tuple[Any, ...]] = []
    for share in shares_of(requests):
        ids = share.ids
        # Read before the seq counter moves: a duplicate takes no seq.
        share.decide(_stored_with_ids(raw, share.session_id, ids) if ids else {})
        count = share.count
        base: int | None = 0
        if count:
            bumped = raw.execute(TAKE_SEQS_SQL, (count, share.session_id, Status.RUNNING.value)).fetchall()
            base = bumped[0][0] - count if bumped else None
        refusal = functools.partial(_why_not_running, raw, share.session_id)
        rows += _insert_rows(share.settle(requests, base, refusal, now, outcomes), stamp)
    if rows:
        raw.executemany(INSERT_DETECTION_SQL, rows)
    return outcomes


def _stored_with_ids(raw: sqlite3.Connection, session_id: str, ids: list[str]) -> dict[str, StoredDetection]:
    found: dict[str, StoredDetection] = {}
    for start in range(0, len(ids), SESSION_READ_BATCH):
        chunk = ids[start : start + SESSION_READ_BATCH]
        cursor = raw.execute(STORED_WITH_IDS_SQL.format(marks=",".join("?" * len(chunk))), [session_id, *chunk])
        found.update((d.id, d) for d in map(_detection_from_sqlite, cursor.fetchall()) if d.id is not None)
    return found


def _why_not_running(raw: sqlite3.Connection, session_id: str) -> ProtocolError:
    found = raw.execute(STATUS_SQL, (session_id,)).fetchall()
    return not_running(session_id, found[0][0] if found else None)


def _json_value(stored: Any) -> Any:
    # A JSON column's NUMERIC affinity turns number text (a `ts`) into a number; the rest is JSON text.
    return json.loads(stored) if isinstance(stored, str) else stored


def _sqlite_moment(stored: str) -> datetime:
    return datetime.fromisoformat(stored).replace(tzinfo=UTC)


def _sqlite_time(moment: datetime) -> str:
    """What SQLAlchemy's SQLite DateTime stores: UTC, no zone, always six digits of microseconds."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _stored_sql(c: DetectionColumn, value: str) -> str:
    return f"dumps({value})" if c.kind == "json" else "stamp" if c.kind == "moment" else value


def _read_sql(c: DetectionColumn, value: str) -> str:
    return f"json_value({value})" if c.kind == "json" else f"sqlite_moment({value})" if c.kind == "moment" else value


# The rows of INSERT_DETECTION_SQL for stored detections, all stamped `stamp`, and a row of
# STORED_WITH_IDS_SQL as the stored detection.
_insert_rows: Callable[[list[StoredDetection], str], list[tuple[Any, ...]]] = derive(
    "insert_rows",
    "stored, stamp",
    f"[{tuple_of(_stored_sql(c, f'd.{c.name}') for c in DETECTION_COLUMNS)} for d in stored]",
    {"dumps": json.dumps},
)
_detection_from_sqlite: Callable[[tuple[Any, ...]], StoredDetection] = derive(
    "detection_from_sqlite",
    "row",
    detection_of(_read_sql(c, f"row[{i}]") for i, c in enumerate(DETECTION_COLUMNS)),
    {"json_value": _json_value, "sqlite_moment": _sqlite_moment},
)


class SqliteReaders:
    """Threads that each hold one sqlite3 connection and run functions from one queue (a
    function that works through SQLAlchemy ignores the connection it is given): the readers, and
    the one writer thread, whose connection `prepare` sets up as the engine's hook does.

    A job's result comes back through one call_soon_threadsafe: about half the CPU of
    run_in_executor, whose concurrent and asyncio futures are chained for every call. A caller
    that stops waiting (timeout, cancellation) leaves the job to finish; its result is dropped."""

    def __init__(
        self,
        path: str,
        timeout: float,
        count: int,
        *,
        name: str = "read",
        prepare: Callable[[sqlite3.Connection], None] = lambda _raw: None,
    ) -> None:
        self._path = path
        self._timeout = timeout
        self._prepare = prepare
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"testpulse-sqlite-{name}-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, answer, work))
        return answer

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        raw = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(raw)
            while (job := self._jobs.get()) is not None:
                loop, answer, work = job
                try:
                    outcome: tuple[Any, BaseException | None] = (work(raw), None)
                except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                    outcome = (None, exc)
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                    loop.call_soon_threadsafe(_settle, answer, *outcome)
        finally:
            raw.close()


def _settle(answer: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)


def use_wal(cursor: sqlite3.Cursor, timeout: float) -> None:
    """Switch the database file to WAL, waiting up to `timeout` for another connection's lock.

    The switch of a new file takes a lock that SQLite refuses at once, without the busy handler,
    while another connection holds one: two nodes that open one fresh file at the same moment (a
    local cluster's first start) saw `database is locked` and one of them failed its start-up. Once
    the file is in WAL the pragma is a no-op that takes no such lock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
