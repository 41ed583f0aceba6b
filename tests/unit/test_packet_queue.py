"""PacketQueue: the asyncio.Queue subset Engine.IO sockets and the delivery feeds rely on."""

from __future__ import annotations

import asyncio

import pytest

from server.transport import PacketQueue

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
