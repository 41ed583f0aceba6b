"""GroupCommitLog against an in-memory store port whose commits the test releases one by one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from testpulse.domain.protocol import DetectionIn, ErrorCode, ProtocolError
from testpulse.domain.sessions import StoredDetection
from testpulse.store.writer import GroupCommitLog

pytestmark = pytest.mark.unit

DEADLINE = 2.0  # seconds; only reached when the behaviour under test is broken

Requests = Sequence[tuple[str, Sequence[DetectionIn]]]
Outcomes = list[list[StoredDetection] | ProtocolError]


@dataclass
class Commit:
    """One append_many call, held until the test commits, fails or cancels it."""

    requests: Requests
    store: MemoryStore
    outcome: asyncio.Future[Outcomes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def commit(self) -> None:
        self.outcome.set_result([self.store.assign(session_id, items) for session_id, items in self.requests])

    def answer(self, outcomes: Outcomes) -> None:
        self.outcome.set_result(outcomes)

    def fail(self, exc: BaseException) -> None:
        self.outcome.set_exception(exc)

    def sessions(self) -> list[str]:
        return [session_id for session_id, _ in self.requests]


class MemoryStore:
    """The store port in memory: seq numbers per session, and every call visible to the test.
    With auto_commit the calls commit at once; otherwise each waits for the test."""

    def __init__(self, *, auto_commit: bool = False, ignore_cancellation: bool = False) -> None:
        self.auto_commit = auto_commit
        self.ignore_cancellation = ignore_cancellation
        self.calls: asyncio.Queue[Commit] = asyncio.Queue()
        self.last_seq: dict[str, int] = {}

    def assign(self, session_id: str, items: Sequence[DetectionIn]) -> list[StoredDetection]:
        first = self.last_seq.get(session_id, 0) + 1
        self.last_seq[session_id] = first + len(items) - 1
        return [stored(session_id, first + i, item) for i, item in enumerate(items)]

    async def append_many(self, requests: Requests) -> Outcomes:
        call = Commit(list(requests), self)
        self.calls.put_nowait(call)
        if self.auto_commit:
            call.commit()
        if not self.ignore_cancellation:
            return await call.outcome
        while True:
            # A store that will not be interrupted (a driver call that finishes what it started).
            with contextlib.suppress(asyncio.CancelledError):
                return await asyncio.shield(call.outcome)

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        return []

    async def next_call(self) -> Commit:
        return await asyncio.wait_for(self.calls.get(), DEADLINE)


def stored(session_id: str, seq: int, item: DetectionIn) -> StoredDetection:
    return StoredDetection(
        session_id=session_id,
        seq=seq,
        label=item.label,
        confidence=item.confidence,
        bbox=None,
        frame=None,
        ts=None,
        attributes=None,
        received_at=datetime.now(UTC),
    )


def detections(*labels: str) -> list[DetectionIn]:
    return [
        DetectionIn(label=label, confidence=0.5, bbox=None, frame=None, ts=None, attributes=None) for label in labels
    ]


def publish(log: GroupCommitLog, session_id: str, *labels: str) -> asyncio.Task[list[StoredDetection]]:
    return asyncio.create_task(log.append(session_id, detections(*labels)))


async def outcome(task: asyncio.Task[list[StoredDetection]]) -> list[StoredDetection] | ErrorCode:
    """What the publisher was told: its detections, or the error code."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), DEADLINE)
    except ProtocolError as exc:
        return exc.code


async def queued(log: GroupCommitLog, count: int) -> None:
    """Let `count` just-created publisher tasks reach the queue."""
    for _ in range(count + 1):
        await asyncio.sleep(0)


@pytest.fixture
async def started() -> tuple[GroupCommitLog, MemoryStore]:
    store = MemoryStore()
    log = GroupCommitLog(store, batch_max=100, queue_max=10)
    log.start()
    return log, store


# ---- batching --------------------------------------------------------------------------------


async def test_appends_queued_during_a_commit_share_the_next_one_in_arrival_order(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    first = publish(log, "a", "a1")
    call = await store.next_call()
    later = [publish(log, "a", "a2", "a3"), publish(log, "b", "b1"), publish(log, "a", "a4")]
    await queued(log, 3)
    call.commit()
    second = await store.next_call()
    assert second.sessions() == ["a", "b", "a"]
    second.commit()
    results = [await outcome(t) for t in [first, *later]]
    assert [[(d.session_id, d.seq, d.label) for d in r] for r in results if isinstance(r, list)] == [
        [("a", 1, "a1")],
        [("a", 2, "a2"), ("a", 3, "a3")],
        [("b", 1, "b1")],
        [("a", 4, "a4")],
    ]
    await log.close(DEADLINE)


async def test_a_batch_never_exceeds_batch_max_detections_unless_one_append_does() -> None:
    store = MemoryStore()
    log = GroupCommitLog(store, batch_max=3, queue_max=100)
    log.start()
    blocker = publish(log, "a", "x")
    call = await store.next_call()
    tasks = [publish(log, "a", "1", "2"), publish(log, "a", "3", "4"), publish(log, "a", "5", "6", "7", "8")]
    await queued(log, 3)
    call.commit()
    sizes = []
    for _ in range(3):
        nxt = await store.next_call()
        sizes.append(sum(len(items) for _, items in nxt.requests))
        nxt.commit()
    assert sizes == [2, 2, 4]
    assert [len(r) for r in [await outcome(t) for t in [blocker, *tasks]] if isinstance(r, list)] == [1, 2, 2, 4]
    await log.close(DEADLINE)


async def test_a_full_queue_answers_unavailable_at_once_and_keeps_what_it_holds(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    in_flight = publish(log, "a", "0")
    call = await store.next_call()
    waiting = publish(log, "a", *[str(i) for i in range(10)])  # queue_max is 10 detections
    await queued(log, 1)
    assert await outcome(publish(log, "a", "one too many")) == ErrorCode.UNAVAILABLE
    call.commit()
    (await store.next_call()).commit()
    assert isinstance(await outcome(in_flight), list) and isinstance(await outcome(waiting), list)
    await log.close(DEADLINE)


async def test_per_request_errors_and_a_failed_commit_answer_only_their_own_publishers(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    ok, stopped = publish(log, "a", "1"), publish(log, "b", "1")
    await queued(log, 2)
    call = await store.next_call()
    call.answer([store.assign("a", detections("1")), ProtocolError(ErrorCode.SESSION_NOT_RUNNING, "stopped")])
    assert isinstance(await outcome(ok), list)
    assert await outcome(stopped) == ErrorCode.SESSION_NOT_RUNNING
    failed = publish(log, "a", "2")
    (await store.next_call()).fail(ProtocolError(ErrorCode.UNAVAILABLE, "database away"))
    assert await outcome(failed) == ErrorCode.UNAVAILABLE
    crashed = publish(log, "a", "3")
    (await store.next_call()).fail(RuntimeError("driver bug"))
    assert await outcome(crashed) == ErrorCode.INTERNAL
    after = publish(log, "a", "4")
    (await store.next_call()).commit()
    assert isinstance(await outcome(after), list)
    await log.close(DEADLINE)


async def test_a_publisher_that_gives_up_does_not_cancel_the_commit_it_shares(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    leaver, stayer = publish(log, "a", "1"), publish(log, "a", "2")
    call = await store.next_call()
    leaver.cancel()
    await queued(log, 1)
    assert not call.outcome.cancelled()
    call.commit()
    assert isinstance(await outcome(stayer), list)
    await log.close(DEADLINE)


# ---- cancellation and task death -------------------------------------------------------------


async def test_a_cancelled_commit_task_answers_the_batch_in_flight_and_what_is_queued(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    in_flight = publish(log, "a", "1")
    await store.next_call()
    queued_behind = publish(log, "a", "2")
    await queued(log, 1)
    assert log._task is not None
    log._task.cancel()
    assert await outcome(in_flight) == ErrorCode.UNAVAILABLE
    assert await outcome(queued_behind) == ErrorCode.UNAVAILABLE


async def test_a_store_call_that_is_cancelled_fails_its_batch_and_commits_continue(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    in_flight = publish(log, "a", "1")
    (await store.next_call()).outcome.cancel()  # e.g. a driver task cancelled underneath
    assert await outcome(in_flight) == ErrorCode.UNAVAILABLE
    after = publish(log, "a", "2")
    (await store.next_call()).commit()
    assert isinstance(await outcome(after), list)
    await log.close(DEADLINE)


async def test_a_store_answering_the_wrong_number_of_outcomes_fails_that_batch_only(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, store = started
    first, second = publish(log, "a", "1"), publish(log, "b", "1")
    await queued(log, 2)
    (await store.next_call()).answer([])
    assert await outcome(first) == ErrorCode.INTERNAL and await outcome(second) == ErrorCode.INTERNAL
    after = publish(log, "a", "2")
    (await store.next_call()).commit()
    assert isinstance(await outcome(after), list)
    await log.close(DEADLINE)


async def test_after_the_commit_task_dies_every_publish_fails_fast_with_unavailable(
    started: tuple[GroupCommitLog, MemoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    log, store = started

    def broken_loop() -> None:
        raise RuntimeError("a bug in the commit loop itself")

    monkeypatch.setattr(log, "_take_batch", broken_loop)
    victim = publish(log, "a", "1")
    assert await outcome(victim) == ErrorCode.UNAVAILABLE
    assert await outcome(publish(log, "a", "2")) == ErrorCode.UNAVAILABLE
    assert store.calls.empty()
    assert log.failure is not None and "commit loop" in log.failure


async def test_a_commit_task_cancelled_from_outside_makes_later_publishes_fail_fast(
    started: tuple[GroupCommitLog, MemoryStore],
) -> None:
    log, _ = started
    assert log._task is not None
    log._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await log._task
    assert await outcome(publish(log, "a", "1")) == ErrorCode.UNAVAILABLE


# ---- close -----------------------------------------------------------------------------------


async def test_close_commits_everything_queued_and_reports_it(started: tuple[GroupCommitLog, MemoryStore]) -> None:
    log, store = started
    first = publish(log, "a", "1")
    call = await store.next_call()
    rest = [publish(log, "a", "2"), publish(log, "b", "1")]
    await queued(log, 2)
    closing = asyncio.create_task(log.close(DEADLINE * 5))
    await queued(log, 1)
    assert await outcome(publish(log, "a", "late")) == ErrorCode.UNAVAILABLE
    call.commit()
    (await store.next_call()).commit()
    report = await asyncio.wait_for(closing, DEADLINE)
    assert all(isinstance(answer, list) for answer in [await outcome(t) for t in [first, *rest]])
    assert (report.committed, report.failed, report.abandoned) == (3, 0, 0)


async def test_close_past_its_grace_answers_the_batch_in_flight_and_the_queue() -> None:
    store = MemoryStore()
    log = GroupCommitLog(store, batch_max=1, queue_max=10)
    log.start()
    in_flight = publish(log, "a", "1")
    await store.next_call()  # never answered: the database hangs
    behind = [publish(log, "a", "2"), publish(log, "a", "3")]
    await queued(log, 2)
    report = await asyncio.wait_for(log.close(0.01), DEADLINE)
    assert [await outcome(t) for t in [in_flight, *behind]] == [ErrorCode.UNAVAILABLE] * 3
    assert (report.committed, report.abandoned) == (0, 3)


async def test_close_returns_within_its_grace_even_when_the_store_ignores_cancellation() -> None:
    store = MemoryStore(ignore_cancellation=True)
    log = GroupCommitLog(store, batch_max=10, queue_max=10)
    log.start()
    in_flight = publish(log, "a", "1")
    call = await store.next_call()
    report = await asyncio.wait_for(log.close(0.01), DEADLINE)
    assert await outcome(in_flight) == ErrorCode.UNAVAILABLE
    assert report.abandoned == 1
    call.commit()  # lets the stubborn store call, and with it the task, finish


async def test_close_without_start_answers_what_was_queued() -> None:
    log = GroupCommitLog(MemoryStore(), batch_max=10, queue_max=10)
    waiting = publish(log, "a", "1")
    await queued(log, 1)
    report = await asyncio.wait_for(log.close(0.01), DEADLINE)
    assert await outcome(waiting) == ErrorCode.UNAVAILABLE
    assert report.abandoned == 1


async def test_every_publisher_is_answered_exactly_once_whatever_the_store_does() -> None:
    store = MemoryStore()
    log = GroupCommitLog(store, batch_max=2, queue_max=100)
    log.start()
    tasks = [publish(log, f"s{i % 3}", str(i)) for i in range(12)]
    await queued(log, 12)
    behaviours = ["commit", "fail", "cancel", "commit", "wrong"]
    for step in range(len(behaviours)):
        call = await store.next_call()
        match behaviours[step]:
            case "commit":
                call.commit()
            case "fail":
                call.fail(ProtocolError(ErrorCode.UNAVAILABLE, "away"))
            case "cancel":
                call.outcome.cancel()
            case "wrong":
                call.answer([])
    (await store.next_call()).commit()
    report = await asyncio.wait_for(log.close(DEADLINE), DEADLINE)
    answers = [await outcome(t) for t in tasks]
    assert len(answers) == 12
    committed = [a for a in answers if isinstance(a, list)]
    assert len(committed) == 6 and report.abandoned == 0
    assert sorted(a for a in answers if not isinstance(a, list)) == sorted(
        [ErrorCode.UNAVAILABLE] * 4 + [ErrorCode.INTERNAL] * 2
    )
    for session in ("s0", "s1", "s2"):
        seqs = [d.seq for a in committed for d in a if d.session_id == session]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
