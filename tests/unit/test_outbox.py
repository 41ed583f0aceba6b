"""Outbox against an in-memory publisher whose attempts the test answers one by one, and the
cluster's cross-node messages through it: order, overflow while a batch is in flight, retries,
flush, and a re-sent message reaching another node once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from testpulse import metrics
from testpulse.bus.broker import ClusterManager
from testpulse.bus.outbox import Message, Outbox, RepeatFilter

pytestmark = pytest.mark.unit

DEADLINE = 2.0  # seconds; only reached when the behaviour under test is broken
KEY = b"k" * 32


@dataclass
class Attempt:
    """One publish_many call, held until the test answers it."""

    messages: list[Message]
    publisher: MemoryPublisher
    answer: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def succeed(self) -> None:
        self.publisher.delivered.extend(self.messages)
        self.answer.set_result(None)

    def fail(self, delivered_first: int = 0) -> None:
        """Deliver a prefix, then fail: the outbox cannot tell how much went out."""
        self.publisher.delivered.extend(self.messages[:delivered_first])
        self.answer.set_exception(ConnectionError("connection reset"))

    def deliver_and_hang(self) -> None:
        """Everything reached Redis, but its answer never comes back (the outbox times out)."""
        self.publisher.delivered.extend(self.messages)

    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.messages]


class MemoryPublisher:
    def __init__(self) -> None:
        self.attempts: asyncio.Queue[Attempt] = asyncio.Queue()
        self.delivered: list[Message] = []

    async def publish_many(self, messages: Sequence[Message]) -> None:
        attempt = Attempt(list(messages), self)
        self.attempts.put_nowait(attempt)
        await attempt.answer

    async def next_attempt(self) -> Attempt:
        return await asyncio.wait_for(self.attempts.get(), DEADLINE)


@contextlib.asynccontextmanager
async def running(outbox: Outbox) -> AsyncIterator[None]:
    task = asyncio.create_task(outbox.publish_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def outbox_with(publisher: MemoryPublisher, **overrides: Any) -> Outbox:
    options: dict[str, Any] = {"capacity": 100, "timeout": DEADLINE * 5, "backoff_max": 0.001, "backoff_initial": 0.001}
    options.update(overrides)
    return Outbox(publisher, **options)


def put(outbox: Outbox, *names: str) -> None:
    for name in names:
        outbox.put("channel", name.encode())


def counter(metric: Any) -> float:
    return float(metric._value.get())


async def test_messages_go_out_in_order_in_batches_of_batch_max() -> None:
    publisher = MemoryPublisher()
    outbox = outbox_with(publisher, batch_max=2)
    put(outbox, "m1", "m2", "m3", "m4", "m5")
    async with running(outbox):
        batches = []
        for _ in range(3):
            attempt = await publisher.next_attempt()
            batches.append(attempt.payloads())
            attempt.succeed()
        assert await outbox.flush(DEADLINE)
    assert batches == [[b"m1", b"m2"], [b"m3", b"m4"], [b"m5"]]
    assert len(outbox) == 0


async def test_overflow_while_a_batch_is_in_flight_keeps_the_messages_it_did_not_send() -> None:
    publisher = MemoryPublisher()
    resyncs: list[str] = []
    outbox = outbox_with(publisher, capacity=3)
    outbox.after_overflow = lambda: (resyncs.append("resync"), put(outbox, "resync"))[0]
    put(outbox, "m1", "m2", "m3")
    async with running(outbox):
        first = await publisher.next_attempt()
        put(outbox, "m4")  # full: m1, which is in flight, is the one dropped
        first.succeed()
        second = await publisher.next_attempt()
        second.succeed()
        assert await outbox.flush(DEADLINE)
    assert [payload for _, payload in publisher.delivered] == [b"m1", b"m2", b"m3", b"m4", b"resync"]
    assert resyncs == ["resync"]


async def test_overflow_drops_the_oldest_counts_it_and_announces_one_resync_after_the_next_publish() -> None:
    publisher = MemoryPublisher()
    outbox = outbox_with(publisher, capacity=2)
    outbox.after_overflow = lambda: put(outbox, "resync")
    failures = counter(metrics.REDIS_PUBLISH_FAILURES)
    put(outbox, "m1", "m2", "m3", "m4")
    assert counter(metrics.REDIS_PUBLISH_FAILURES) - failures == 2
    async with running(outbox):
        (await publisher.next_attempt()).succeed()
        (await publisher.next_attempt()).succeed()
        assert await outbox.flush(DEADLINE)
    assert [payload for _, payload in publisher.delivered] == [b"m3", b"m4", b"resync"]


async def test_a_failed_or_timed_out_publish_is_retried_in_order_and_nothing_is_lost() -> None:
    publisher = MemoryPublisher()
    outbox = outbox_with(publisher, timeout=0.01)
    failures, published = counter(metrics.REDIS_PUBLISH_FAILURES), counter(metrics.REDIS_PUBLISHED)
    put(outbox, "m1", "m2")
    async with running(outbox):
        (await publisher.next_attempt()).fail(delivered_first=1)
        put(outbox, "m3")
        (await publisher.next_attempt()).deliver_and_hang()  # times out after 0.01 s
        last = await publisher.next_attempt()
        assert last.payloads() == [b"m1", b"m2", b"m3"]
        last.succeed()
        assert await outbox.flush(DEADLINE)
    assert counter(metrics.REDIS_PUBLISH_FAILURES) - failures == 2 + 3
    assert counter(metrics.REDIS_PUBLISHED) - published == 3
    # At least once: the publisher saw repeats; receivers drop them (see the cluster test below).
    assert [payload for _, payload in publisher.delivered][-3:] == [b"m1", b"m2", b"m3"]


async def test_flush_is_true_once_empty_and_false_when_the_grace_runs_out() -> None:
    publisher = MemoryPublisher()
    outbox = outbox_with(publisher)
    assert await outbox.flush(0)
    put(outbox, "m1")
    async with running(outbox):
        attempt = await publisher.next_attempt()
        assert not await outbox.flush(0.01)
        attempt.succeed()
        assert await outbox.flush(DEADLINE)


# ---- the cluster's messages through the outbox -----------------------------------------------


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[ClusterManager, ClusterManager, MemoryPublisher]]:
    """A sending and a receiving ClusterManager that never touch Redis: the sender publishes into
    memory, the test hands what was delivered to the receiver as its listener would."""
    publisher = MemoryPublisher()
    sender = ClusterManager("redis://127.0.0.1:9", key=KEY, publisher=publisher, connect_timeout=0.01)
    receiver = ClusterManager("redis://127.0.0.1:9", key=KEY)
    async with running(sender._outbox):
        yield sender, receiver, publisher
    await sender.redis.aclose()
    await receiver.redis.aclose()


async def receive_all(receiver: ClusterManager, publisher: MemoryPublisher) -> None:
    for channel, payload in publisher.delivered:
        await receiver._dispatch(channel, payload)


async def test_a_status_update_resent_after_a_timeout_reaches_another_node_once(
    two_nodes: tuple[ClusterManager, ClusterManager, MemoryPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender, receiver, publisher = two_nodes
    handled: list[Any] = []

    async def record(message: dict[str, Any]) -> None:
        handled.append(message["data"][0])  # python-socketio sends the emit arguments as a list

    monkeypatch.setattr(receiver, "_handle_emit", record)
    await sender.emit("test_session_update", {"status": "paused"}, room="session:s1")
    await sender.emit("test_session_update", {"status": "running"}, room="session:s1")
    (await publisher.next_attempt()).deliver_and_hang()  # Redis took both; its answer was lost
    (await publisher.next_attempt()).succeed()  # so both go out again
    assert await sender.flush(DEADLINE)
    assert len(publisher.delivered) == 4
    await receive_all(receiver, publisher)
    assert handled == [{"status": "paused"}, {"status": "running"}]


async def test_callbacks_from_several_nodes_to_one_host_are_all_delivered(
    two_nodes: tuple[ClusterManager, ClusterManager, MemoryPublisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A callback message's host_id names its destination, not its sender: de-duplication must
    not mistake callbacks from two senders for repeats of each other."""
    sender, receiver, publisher = two_nodes
    other = ClusterManager("redis://127.0.0.1:9", key=KEY, publisher=publisher)
    handled: list[Any] = []

    async def record(message: dict[str, Any]) -> None:
        handled.append(message["id"])

    monkeypatch.setattr(receiver, "_handle_callback", record)
    async with running(other._outbox):
        for manager, callback_id in ((sender, 1), (other, 2), (sender, 3)):
            manager._enqueue(manager.channel, {"method": "callback", "host_id": receiver.host_id, "id": callback_id})
        for _ in range(2):  # one batch from each sender
            (await publisher.next_attempt()).succeed()
    await other.redis.aclose()
    await receive_all(receiver, publisher)
    assert sorted(handled) == [1, 2, 3]


def test_the_repeat_filter_keeps_one_mark_for_each_recent_sender() -> None:
    repeats = RepeatFilter(senders_max=2)
    assert [repeats.is_repeat("a", n) for n in (1, 1, 3, 2, 4)] == [False, True, False, True, False]
    assert not repeats.is_repeat("b", 1)
    assert not repeats.is_repeat("c", 1)  # a third sender: "a", silent longest, is forgotten
    assert not repeats.is_repeat("a", 4)
    assert repeats.is_repeat("c", 1)
