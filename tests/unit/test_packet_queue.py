"""PacketQueue: the asyncio.Queue subset Engine.IO sockets and the delivery feeds rely on."""

from __future__ import annotations

import asyncio

import pytest

from testpulse.transport.lean import PacketQueue

pytestmark = pytest.mark.unit


async def test_items_come_out_in_order_and_sizes_follow() -> None:
    queue = PacketQueue()
    assert queue.empty() and queue.qsize() == 0
    for item in ("a", "b", "c"):
        await queue.put(item)
    assert queue.qsize() == 3 and not queue.empty()
    assert [queue.get_nowait(), await queue.get(), queue.get_nowait()] == ["a", "b", "c"]
    assert queue.empty()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_an_idle_queue_holds_no_buffer() -> None:
    queue = PacketQueue()
    queue.put_nowait(1)
    queue.get_nowait()
    assert queue._items is None  # the point of the class: an idle client's queue costs a few slots


async def test_a_waiting_get_wakes_on_put() -> None:
    queue = PacketQueue()
    assert not queue.consumer_waiting()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done() and queue.consumer_waiting()
    queue.put_nowait("x")
    assert await asyncio.wait_for(getter, 1) == "x"
    assert not queue.consumer_waiting()


async def test_a_cancelled_get_leaves_the_queue_usable() -> None:
    queue = PacketQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    queue.put_nowait("after")
    assert await asyncio.wait_for(queue.get(), 1) == "after"


async def test_a_second_concurrent_consumer_is_refused() -> None:
    queue = PacketQueue()
    first = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one consumer"):
        await queue.get()
    first.cancel()


async def test_join_waits_until_every_item_is_done() -> None:
    queue = PacketQueue()
    await queue.join()  # nothing outstanding: returns at once
    queue.put_nowait("a")
    queue.put_nowait("b")
    joined = asyncio.create_task(queue.join())
    queue.get_nowait()
    queue.task_done()
    await asyncio.sleep(0)
    assert not joined.done()
    queue.get_nowait()
    queue.task_done()
    await asyncio.wait_for(joined, 1)


async def test_join_does_not_wait_for_end_of_stream_marks() -> None:
    """A WebSocket writer ends at the first None and leaves the marks put after it; a drain
    waiting in join() for them would always wait out its budget."""
    queue = PacketQueue()
    for item in ("a", None, None):
        queue.put_nowait(item)
    assert queue.get_nowait() == "a"
    queue.task_done()
    assert queue.get_nowait() is None  # consumers take a mark without task_done()
    await asyncio.wait_for(queue.join(), 1)
    assert not queue.empty()  # the second mark is still there for the next consumer


async def test_discard_counts_the_packets_it_drops_not_the_marks() -> None:
    queue = PacketQueue()
    for item in ("a", "b", None):
        queue.put_nowait(item)
    assert queue.discard() == 2
    await asyncio.wait_for(queue.join(), 1)


async def test_take_stops_before_an_end_mark_and_counts_what_it_took() -> None:
    queue = PacketQueue()
    for item in ("a", "b", "c", None, "d"):
        queue.put_nowait(item)
    assert queue.take(2) == ["a", "b"]
    assert queue.take(10) == ["c"]  # the mark stays for get()
    assert queue.take(10) == []
    assert queue.taken == 3 and queue.qsize() == 2
    joined = asyncio.create_task(queue.join())
    await asyncio.sleep(0)
    assert not joined.done()  # "d" is still outstanding
    assert queue.get_nowait() is None
    assert queue.get_nowait() == "d"
    queue.task_done()
    await asyncio.wait_for(joined, 1)


async def test_join_returns_once_take_has_taken_everything() -> None:
    queue = PacketQueue()
    queue.put_nowait("a")
    queue.put_nowait("b")
    joined = asyncio.create_task(queue.join())
    await asyncio.sleep(0)
    assert queue.take(10) == ["a", "b"]
    await asyncio.wait_for(joined, 1)
    assert queue.empty()


async def test_unget_puts_packets_back_in_front_as_if_never_taken() -> None:
    queue = PacketQueue()
    for item in ("a", "b", "c"):
        queue.put_nowait(item)
    taken = queue.take(2)
    queue.unget(taken)
    assert queue.taken == 0 and queue.qsize() == 3
    assert queue.take(10) == ["a", "b", "c"]
    queue.unget(["x"])  # onto an empty queue
    assert queue.get_nowait() == "x"


async def test_with_on_put_a_put_calls_it_and_leaves_a_waiting_get_asleep() -> None:
    """A consumer that writes packets out itself (NodeSocket's direct writes) is told of each put,
    the end mark's too; a get() waiting meanwhile wakes only when woken."""
    queue = PacketQueue()
    told: list[int] = []
    queue.on_put = lambda: told.append(queue.qsize())
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("a")
    queue.put_nowait("b")
    await asyncio.sleep(0)
    assert told == [1, 2] and not getter.done() and queue.consumer_waiting()
    assert queue.take(10) == ["a", "b"]
    queue.put_nowait(None)
    await asyncio.sleep(0)
    assert told == [1, 2, 1] and not getter.done()
    queue.wake()
    assert await asyncio.wait_for(getter, 1) is None


async def test_wake_resumes_a_waiting_get_with_what_is_queued() -> None:
    queue = PacketQueue()
    queue.on_put = lambda: None
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("a")
    await asyncio.sleep(0)
    assert not getter.done()
    queue.wake()
    assert await asyncio.wait_for(getter, 1) == "a"
    queue.wake()  # nobody waiting: nothing happens
