"""Group commit: concurrent detection appends on one node share one store transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from server import metrics
from server.protocol import DetectionIn, ErrorCode, ProtocolError
from server.sessions import StoredDetection
from server.store import SqlStore

log = logging.getLogger("testpulse.writer")


@dataclass(slots=True)
class _Pending:
    session_id: str
    items: Sequence[DetectionIn]
    done: asyncio.Future[list[StoredDetection]]


class GroupCommitLog:
    """EventLog that queues appends and commits whatever queued up while the previous transaction
    ran, in one transaction. One publisher waiting for each ack pays one commit per detection as
    before; many publishers (or one that pipelines) share commits, which is where SQLite and
    PostgreSQL spend their time. The queue is bounded: beyond `queue_max` waiting detections a
    publisher is told `unavailable` instead of growing memory without limit."""

    def __init__(self, store: SqlStore, *, batch_max: int, queue_max: int) -> None:
        self._store = store
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._pending: deque[_Pending] = deque()
        self._pending_items = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="testpulse-group-commit")

    async def close(self, grace_seconds: float) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, grace_seconds)
            except TimeoutError:
                log.error("gave up flushing %d queued detections at shutdown", self._pending_items)
            self._task = None
        for pending in self._pending:
            if not pending.done.done():
                pending.done.set_exception(ProtocolError(ErrorCode.UNAVAILABLE, "node is shutting down; retry"))

    async def append(self, session_id: str, items: Sequence[DetectionIn]) -> list[StoredDetection]:
        if self._closing:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "node is shutting down; retry on another node")
        if self._pending_items + len(items) > self._queue_max:
            metrics.WRITE_QUEUE_REJECTED.inc()
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the store is behind; slow down and retry")
        done: asyncio.Future[list[StoredDetection]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(session_id, items, done))
        self._pending_items += len(items)
        metrics.WRITE_QUEUE_DEPTH.set(self._pending_items)
        self._wakeup.set()
        # shield: a publisher that disconnects mid-write must not cancel a commit others share.
        return await asyncio.shield(done)

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        return await self._store.since(session_id, after_seq, limit)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        items = 0
        while self._pending and (not batch or items + len(self._pending[0].items) <= self._batch_max):
            pending = self._pending.popleft()
            batch.append(pending)
            items += len(pending.items)
        self._pending_items -= items
        metrics.WRITE_QUEUE_DEPTH.set(self._pending_items)
        return batch

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch = self._take_batch()
            started = time.perf_counter()
            try:
                outcomes = await self._store.append_many([(p.session_id, p.items) for p in batch])
            except ProtocolError as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
                continue
            except Exception:
                log.exception("detection append failed")
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(ProtocolError(ErrorCode.INTERNAL, "storing the detection failed"))
                continue
            metrics.STORE_WRITE_SECONDS.observe(time.perf_counter() - started)
            metrics.STORE_BATCH_SIZE.observe(sum(len(p.items) for p in batch))
            for p, outcome in zip(batch, outcomes, strict=True):
                if p.done.done():
                    continue
                if isinstance(outcome, ProtocolError):
                    p.done.set_exception(outcome)
                else:
                    metrics.DETECTIONS_STORED.inc(len(outcome))
                    p.done.set_result(outcome)
