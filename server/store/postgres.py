"""The Database seam on PostgreSQL: asyncpg straight for the hot statements, the async engine for the rest.

A join reads its session and a publish appends detections thousands of times a second; through
the async engine each of those paid a pre-ping, a BEGIN, the statement and a COMMIT or ROLLBACK
(a round trip each, and each a wait behind whatever else the event loop runs), plus SQLAlchemy's
per-execution work. On asyncpg's own pool they are one prepared statement and one round trip:
a statement outside a transaction block is its own transaction, committed before PostgreSQL
answers it, so an append's answer still means committed. Everything else (session changes,
lists, the audit, migrations) keeps the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from testpulse.domain.protocol import DetectionIn, ProtocolError
from testpulse.domain.sessions import Session, Status, StoredDetection
from testpulse.store.database import Database, prune_one_batch
from testpulse.store.shares import Share, not_running, shares_of
from testpulse.store.tables import DETECTION_COLUMNS, ITEM_COLUMNS, DetectionColumn, columns_sql, derive, tuple_of

T = TypeVar("T")
DDL_LOCK = 727274  # the advisory lock every node's DDL takes in turn
PRUNE_LOCK = 727275  # held by the one node whose retention step runs now (transaction-scoped)
ENGINE_POOL = 2  # connections kept for the engine's cold paths; the hot ones use the asyncpg pool
# SQLAlchemy's own connect arguments, which asyncpg.connect does not take.
SQLALCHEMY_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")

SESSIONS_BY_ID = (
    "SELECT id, name, status, config, last_seq, created_at, updated_at FROM test_sessions WHERE id = ANY($1::varchar[])"
)
# session_id is the first column (StoredDetection's first field): since() has it already.
DETECTIONS_SINCE = (
    f"SELECT {columns_sql(columns=DETECTION_COLUMNS[1:])} FROM detections"
    " WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)
# Every session's seq counter moves and its rows go in, in one statement. JSON values travel as
# text: in a json[] parameter, a list value (a bbox) would be taken for a dimension of the array. Sessions that are not
# running return no base, so their rows join nothing and are not inserted. Rows carry their
# position `k` within their session's share of the batch; a row's seq is its session's base + k.
# $1-$3: the sessions, their counts, the running status; then one array per column of the rows
# (_append_arguments), then the store's now.
_APPEND_ARRAYS = [("session_id", "varchar"), ("k", "bigint"), *((c.name, c.pg_type) for c in ITEM_COLUMNS)]
_APPEND_NOW = 4 + len(_APPEND_ARRAYS)


def _append_value(c: DetectionColumn) -> str:
    if c.source == "seq":
        return "b.base + d.k"
    if c.source == "clock":
        return f"${_APPEND_NOW}"
    return f"d.{c.name}::json" if c.kind == "json" else f"d.{c.name}"


APPEND = f"""
WITH counts AS (
    SELECT * FROM unnest($1::varchar[], $2::bigint[]) AS c(session_id, n)
), bumped AS (
    UPDATE test_sessions AS s SET last_seq = s.last_seq + c.n
    FROM counts AS c
    WHERE s.id = c.session_id AND s.status = $3
    RETURNING s.id, s.last_seq - c.n AS base
), stored AS (
    INSERT INTO detections ({columns_sql()})
    SELECT {", ".join(map(_append_value, DETECTION_COLUMNS))}
    FROM unnest({", ".join(f"${4 + i}::{pg_type}[]" for i, (_, pg_type) in enumerate(_APPEND_ARRAYS))})
         AS d({", ".join(name for name, _ in _APPEND_ARRAYS)})
    JOIN bumped AS b ON b.id = d.session_id
)
SELECT id, base FROM bumped
"""
# Two nodes committing overlapping groups lock the sessions in id order, as the engine path does.
LOCK_SESSIONS = "SELECT id FROM test_sessions WHERE id = ANY($1::varchar[]) ORDER BY id FOR UPDATE"
STATUSES = "SELECT id, status FROM test_sessions WHERE id = ANY($1::varchar[])"
STORED_WITH_IDS = (
    f"SELECT {columns_sql('d.')} FROM detections AS d JOIN unnest($1::varchar[], $2::varchar[]) AS k(session_id, id)"
    " ON d.session_id = k.session_id AND d.id = k.id"
)


# asyncpg 0.30 added the pool's reset hook; on 0.29 (the lowest admitted) a release runs the default
# reset query, one more round trip, and everything else is the same.
POOL_TAKES_RESET = "reset" in inspect.signature(asyncpg.create_pool).parameters


class PostgresDatabase(Database):
    """No threads: every statement awaits its socket."""

    is_sqlite = False

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        super().__init__(url, pool_size=pool_size, timeout=timeout)
        self._pool_size = pool_size
        # A node frozen inside a transaction (SIGSTOP, a partition, a stalled VM) would hold
        # its session rows' locks, and so every other node's commits to those sessions, until
        # it wakes. PostgreSQL ends such a session after twice the store timeout instead.
        self._server_settings = {"idle_in_transaction_session_timeout": str(int(timeout * 2000))}
        self._engine: AsyncEngine = create_async_engine(
            url,
            pool_size=min(ENGINE_POOL, pool_size),
            max_overflow=max(0, pool_size - ENGINE_POOL),
            pool_pre_ping=True,
            pool_timeout=timeout,
            connect_args={"server_settings": self._server_settings},
        )
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        # InternalClientError: a connection whose protocol state asyncpg no longer trusts (seen as
        # "another operation is in progress" while the server shut down); nothing was committed.
        return (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

    async def _hot(self) -> asyncpg.Pool:
        """asyncpg's pool, made at first use with the engine's own connect arguments."""
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                _, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
                for name in SQLALCHEMY_ONLY:
                    kwargs.pop(name, None)
                if POOL_TAKES_RESET:
                    # The hot statements leave no session state (no LISTEN, SET or session lock);
                    # the default reset would cost one more round trip per statement. An open
                    # transaction is still rolled back (asyncpg does that before calling this).
                    kwargs["reset"] = _nothing_to_reset
                self._pool = await asyncpg.create_pool(
                    **kwargs,
                    min_size=1,
                    max_size=self._pool_size,
                    server_settings=self._server_settings,
                    init=_json_codecs,
                    timeout=self.timeout,
                )
            return self._pool

    async def write(self, work: Callable[[Connection], T]) -> T:
        async with self._guard(), self._engine.begin() as conn:
            return await conn.run_sync(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        async with self._guard(), self._engine.connect() as conn:
            return await conn.run_sync(work)

    async def read_sessions(self, ids: list[str]) -> list[Session]:
        async with self._guard():
            rows = await (await self._hot()).fetch(SESSIONS_BY_ID, ids)
        return [
            Session(
                id=row["id"],
                name=row["name"],
                status=Status(row["status"]),
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                last_seq=row["last_seq"],
                config=row["config"] or {},
            )
            for row in rows
        ]

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        async with self._guard():
            rows = await (await self._hot()).fetch(DETECTIONS_SINCE, session_id, after_seq, limit)
        # asyncpg decodes every column as the domain holds it (json by _json_codecs, timestamptz aware).
        return [StoredDetection(session_id, *row) for row in rows]

    async def append_many(
        self, requests: Sequence[tuple[str, Sequence[DetectionIn]]], now: datetime
    ) -> list[list[StoredDetection] | ProtocolError]:
        outcomes: list[list[StoredDetection] | ProtocolError] = [[] for _ in requests]
        shares = shares_of(requests)
        with_ids = [share for share in shares if share.ids]
        async with self._guard():
            pool = await self._hot()
            async with pool.acquire() as conn, _terminated_on_failure(conn):
                if len(shares) == 1 and not with_ids:
                    # The common case: one statement, its own transaction, one round trip.
                    shares[0].decide({})
                    bases = await conn.fetch(APPEND, *_append_arguments(shares, now))
                else:
                    async with conn.transaction():
                        # Locked before the ids are read: a node appending the same ids waits
                        # here, then sees this transaction's rows (a duplicate takes no seq).
                        await conn.execute(LOCK_SESSIONS, [share.session_id for share in shares])
                        known = await _stored_with_ids(conn, with_ids) if with_ids else {}
                        for share in shares:
                            share.decide(known.get(share.session_id, {}))
                        # Every item a duplicate: nothing takes a seq, nothing to insert.
                        taking = any(share.count for share in shares)
                        bases = await conn.fetch(APPEND, *_append_arguments(shares, now)) if taking else []
                base_of: dict[str, int] = {row["id"]: row["base"] for row in bases}
                # Sessions that took seqs and got no base are not running; say why.
                missing = [share.session_id for share in shares if share.count and share.session_id not in base_of]
                statuses = dict(await conn.fetch(STATUSES, missing)) if missing else {}
        for share in shares:
            base = base_of.get(share.session_id, 0 if not share.count else None)
            refusal = functools.partial(not_running, share.session_id, statuses.get(share.session_id))
            share.settle(requests, base, refusal, now, outcomes)
        return outcomes

    async def prune_detections(self, cutoff: datetime, batch_rows: int) -> int | None:
        def step(conn: Connection) -> int | None:
            if not conn.execute(text(f"SELECT pg_try_advisory_xact_lock({PRUNE_LOCK})")).scalar():
                return None
            # Nothing is acknowledged by a delete: one lost to a crash is simply done again next
            # round, so it need not wait for its WAL to reach disk.
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            return prune_one_batch(conn, cutoff, batch_rows)

        return await self.write(step)

    async def run_ddl(self, work: Callable[[Connection], T]) -> T:
        def locked(conn: Connection) -> T:
            # Serialises concurrent node starts and migrations (SQLite's BEGIN IMMEDIATE does it there).
            conn.execute(text(f"SELECT pg_advisory_xact_lock({DDL_LOCK})"))
            return work(conn)

        async with self._engine.begin() as conn:
            return await conn.run_sync(locked)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self._engine.dispose()


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


# A share's fresh items as rows of the APPEND arrays after $3: session, position k, the item's columns.
_append_rows: Callable[[str, list[DetectionIn]], list[tuple[Any, ...]]] = derive(
    "append_rows",
    "session_id, items",
    "["
    + tuple_of(
        ["session_id", "k"] + [f"json(item.{c.name})" if c.kind == "json" else f"item.{c.name}" for c in ITEM_COLUMNS]
    )
    + " for k, item in enumerate(items, start=1)]",
    {"json": _json},
)


def _append_arguments(shares: list[Share], now: datetime) -> list[Any]:
    """APPEND's parameters: the seqs each session takes, then one array per column of its fresh items."""
    taking = [share for share in shares if share.count]
    rows: list[tuple[Any, ...]] = []
    for share in taking:
        rows += _append_rows(share.session_id, share.fresh_items())
    columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in _APPEND_ARRAYS]
    counts = [share.count for share in taking]
    return [[share.session_id for share in taking], counts, Status.RUNNING.value, *columns, now]


async def _stored_with_ids(conn: asyncpg.Connection, shares: list[Share]) -> dict[str, dict[str, StoredDetection]]:
    """The stored detections among the shares' ids, by session and id, in one statement."""
    pairs = [(share.session_id, item_id) for share in shares for item_id in share.ids]
    rows = await conn.fetch(STORED_WITH_IDS, [p[0] for p in pairs], [p[1] for p in pairs])
    found: dict[str, dict[str, StoredDetection]] = {}
    for stored in (StoredDetection(*row) for row in rows):
        if stored.id is not None:
            found.setdefault(stored.session_id, {})[stored.id] = stored
    return found


async def _json_codecs(conn: asyncpg.Connection) -> None:
    # The schema's JSON columns are `json`; decode them as the engine does (ints stay ints).
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@contextlib.asynccontextmanager
async def _terminated_on_failure(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A connection that failed (or was cancelled) mid-append goes, instead of back to the pool:
    its protocol state is not trusted to serve the next append."""
    try:
        yield
    except BaseException:
        conn.terminate()
        raise


async def _nothing_to_reset(_conn: asyncpg.Connection) -> None:
    return None
