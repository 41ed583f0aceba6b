"""Group commit: concurrent detection appends on one node share one store transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from testpulse import metrics
from testpulse.domain.protocol import DetectionIn, ErrorCode, ProtocolError
from testpulse.domain.sessions import StoredDetection

log = logging.getLogger("testpulse.store.writer")

Outcome = list[StoredDetection] | ProtocolError


class DetectionStore(Protocol):
    """The part of the store the group commit uses (SqlStore in production).

    append_many() stores every request of the group in one transaction and returns one outcome
    per request, in request order: the stored detections, or the ProtocolError of that request
    alone. Raising means no request of the group is known to be stored."""

    async def append_many(self, requests: Sequence[tuple[str, Sequence[DetectionIn]]]) -> list[Outcome]: ...

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]: ...


@dataclass(slots=True)
class _Pending:
    session_id: str
    items: Sequence[DetectionIn]
    done: asyncio.Future[list[StoredDetection]]


@dataclass(frozen=True, slots=True)
class CloseReport:
    """What close() did with the appends it found queued or in flight (counted in appends)."""

    committed: int  # stored, and the publisher told so
    failed: int  # the store answered them with an error (not running, unavailable, ...)
    abandoned: int  # answered `unavailable` by close itself: grace ran out, or no commit task ran


def _shutting_down() -> ProtocolError:
    return ProtocolError(ErrorCode.UNAVAILABLE, "node is shutting down; retry on another node")


class GroupCommitLog:
    """EventLog that queues appends and commits whatever queued up while the previous transaction
    ran, in one transaction. One publisher waiting for each ack pays one commit per detection as
    before; many publishers (or one that pipelines) share commits, which is where SQLite and
    PostgreSQL spend their time. The queue is bounded: beyond `queue_max` waiting detections a
    publisher is told `unavailable` instead of growing memory without limit.

    Guarantees:
    - appends reach the store in the order append() was called, so a session's seqs follow its
      publishers' order; a batch holds at most `batch_max` detections (or one larger append);
    - every append is answered exactly once: with its detections, the store's error for it, or
      `unavailable`. A publisher that goes away does not cancel the commit others share;
    - a batch whose store call fails, is cancelled underneath, or answers nonsense fails alone
      (`unavailable` or `internal`) and the next batch goes on;
    - if the commit task itself ends other than by close() (cancelled, or a bug in its loop), it
      is not restarted: whatever is queued or in flight, and every later append, is answered
      `unavailable` at once, so publishers retry on another node, and `failure` says why (for
      readiness). Restarting would hide a loop bug behind a crash loop of half-done batches;
      failing fast keeps the node's answers honest until it is replaced;
    - close(grace) commits what is queued within `grace`, answers the rest `unavailable`, returns
      within `grace` whatever the store does, and reports the counts. An append abandoned while
      its transaction was running may still have committed: its publisher retries, and the
      retry may store it again (idempotent publish with an `id` is what removes that).
    """

    def __init__(self, store: DetectionStore, *, batch_max: int, queue_max: int) -> None:
        self._store = store
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._pending: deque[_Pending] = deque()
        self._pending_items = 0
        self._in_flight: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._counting = False  # from close() on, outcomes are counted for its report
        self._committed = 0
        self._failed = 0
        self._abandoned = 0
        self.failure: str | None = None  # why the commit task stopped, when it was not close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="testpulse-group-commit")
        self._task.add_done_callback(self._on_task_done)

    async def close(self, grace_seconds: float) -> CloseReport:
        """Commit what is queued within the grace, answer the rest `unavailable`, then stop."""
        self._closing = True
        self._counting = True
        self._committed = self._failed = self._abandoned = 0
        waiting = len(self._pending) + len(self._in_flight)
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            finished, _ = await asyncio.wait({task}, timeout=grace_seconds)
            if not finished:
                # Not awaited: a store call that ignores cancellation must not hold the shutdown.
                task.cancel()
        self._abandon(self._in_flight, _shutting_down())
        self._abandon(self._pending, _shutting_down())
        self._pending.clear()
        self._pending_items = 0
        metrics.WRITE_QUEUE_DEPTH.set(0)
        report = CloseReport(self._committed, self._failed, self._abandoned)
        if report.abandoned:
            log.error(
                "group commit closed: %d of %d queued appends committed, %d failed, %d abandoned (grace ran out)",
                report.committed,
                waiting,
                report.failed,
                report.abandoned,
            )
        elif waiting:
            log.info("group commit closed: %d queued appends committed, %d failed", report.committed, report.failed)
        return report

    async def append(self, session_id: str, items: Sequence[DetectionIn]) -> list[StoredDetection]:
        if self._closing:
            raise _shutting_down()
        if self.failure is not None:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "this node cannot store detections now; retry on another node")
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
            self._in_flight = self._take_batch()
            await self._commit(self._in_flight)
            self._in_flight = []

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._store.append_many([(p.session_id, p.items) for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the store answered {len(outcomes)} outcomes for {len(batch)} requests")
        except ProtocolError as exc:
            self._fail(batch, exc)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task is being stopped; _on_task_done or close answers the batch
            # Cancelled underneath us (the store's own task), not by our owner: this batch fails.
            log.warning("a group commit of %d appends was cancelled inside the store", len(batch))
            self._fail(batch, ProtocolError(ErrorCode.UNAVAILABLE, "storing the detection was interrupted; retry"))
            return
        except Exception:
            log.exception("detection append failed")
            self._fail(batch, ProtocolError(ErrorCode.INTERNAL, "storing the detection failed"))
            return
        metrics.STORE_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.STORE_BATCH_SIZE.observe(sum(len(p.items) for p in batch))
        for p, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ProtocolError):
                self._fail([p], outcome)
            elif not p.done.done():
                metrics.DETECTIONS_STORED.inc(len(outcome))
                p.done.set_result(outcome)
                self._committed += self._counting

    def _fail(self, batch: Iterable[_Pending], exc: ProtocolError) -> None:
        for p in batch:
            if not p.done.done():
                p.done.set_exception(exc)
                self._failed += self._counting

    def _abandon(self, batch: Iterable[_Pending], exc: ProtocolError) -> None:
        for p in batch:
            if not p.done.done():
                p.done.set_exception(exc)
                self._abandoned += self._counting

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return  # close() answers what is left and reports it
        if task.cancelled():
            self.failure = "the group commit task was cancelled"
            log.error("%s; appends are refused from now on", self.failure)
        else:
            exc = task.exception() or RuntimeError("the loop returned")
            self.failure = f"the group commit task died: {type(exc).__name__}: {exc}"
            log.error("%s; appends are refused from now on", self.failure, exc_info=exc)
        unavailable = ProtocolError(
            ErrorCode.UNAVAILABLE, "this node cannot store detections now; retry on another node"
        )
        self._fail(self._in_flight, unavailable)
        self._fail(self._pending, unavailable)
        self._in_flight = []
        self._pending.clear()
        self._pending_items = 0
        metrics.WRITE_QUEUE_DEPTH.set(0)
