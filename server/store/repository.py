"""SqlStore: the domain's SessionStore and EventLog over the Database seam (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, update

from testpulse.domain.protocol import DetectionIn, ProtocolError
from testpulse.domain.sessions import ACTIONS, Session, Status, StoredDetection, iso, utcnow
from testpulse.store.database import SESSION_READ_BATCH, Database
from testpulse.store.tables import audit_t, aware, session_from_row, sessions_t

SESSION_READ_SPACING = 0.01  # seconds between the starts of shared session reads, under load


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
                "at": aware(r.at),
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


def _action(expected: Status, target: Status) -> str:
    return ACTIONS.get((expected, target), target.value)
