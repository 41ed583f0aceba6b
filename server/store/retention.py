"""Retention (TESTPULSE_RETENTION_DAYS): a node's background job that deletes the detections of
sessions stopped longer ago than the retention, a small batch at a time.

Bounded in cost by construction: one step deletes at most `batch_rows` rows of one session in a
short transaction of its own, steps are `pause_seconds` apart, and only one node prunes at a time
(PostgreSQL: a transaction-scoped advisory lock each step tries to take, and skips when another
node holds it; SQLite: its one writer at a time). A running or paused session is never touched,
nor one stopped more recently than the retention; a stopped session never runs again, so nothing
is ever appended to a session while its detections are being deleted. The session row and its
audit trail stay (one row each per session, and what tells a client why the session has no
detections left); `testpulse_retention_pruned_detections_total` counts what went.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from testpulse import metrics
from testpulse.domain.protocol import ProtocolError
from testpulse.domain.sessions import utcnow

log = logging.getLogger("testpulse.store.retention")


class PruningStore(Protocol):
    async def prune(self, cutoff: datetime, batch_rows: int) -> int | None:
        """Delete at most `batch_rows` detections of one session stopped before `cutoff`: how
        many went, or None when another node is pruning now (SqlStore.prune)."""
        ...


class Retention:
    def __init__(
        self,
        store: PruningStore,
        *,
        days: float,
        batch_rows: int,
        pause_seconds: float,
        check_seconds: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._keep = timedelta(days=days)
        self._batch_rows = batch_rows
        self._pause = pause_seconds
        self._check = check_seconds
        self._clock = clock

    async def step(self) -> int | None:
        """One bounded delete; the rows it deleted, or None when another node is pruning."""
        pruned = await self._store.prune(self._clock() - self._keep, self._batch_rows)
        if pruned:
            metrics.RETENTION_PRUNED.inc(pruned)
        return pruned

    async def run_forever(self) -> None:
        """Steps `pause_seconds` apart while there is work, then a look every `check_seconds`.
        A failing database only delays the next look: retention is never urgent."""
        while True:
            try:
                pruned = await self.step()
            except ProtocolError as exc:
                log.warning("retention step failed, next try in %.0fs: %s", self._check, exc.message)
                pruned = None
            await asyncio.sleep(self._pause if pruned else self._check)
