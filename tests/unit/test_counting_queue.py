"""CountingQueue: the stock transport's Engine.IO queue (python-engineio's asyncio.Queue, counted)."""

from __future__ import annotations

import asyncio

import pytest

from testpulse.transport.queue import POLL_PACKETS_MAX
from testpulse.transport.stock import CountingQueue

pytestmark = pytest.mark.unit


def drain_as_engineio_polls(queue: CountingQueue) -> list[int]:
    """What python-engineio's AsyncSocket.poll does after its first get(): get_nowait until empty."""
    taken = []
    while True:
        try:
            taken.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return taken


async def test_a_poll_takes_at_most_what_python_engineio_clients_accept_in_one_payload() -> None:
    queue = CountingQueue()
    for n in range(40):
        queue.put_nowait(n)
    first = [await queue.get(), *drain_as_engineio_polls(queue)]
    assert first == list(range(POLL_PACKETS_MAX))
    second = [await queue.get(), *drain_as_engineio_polls(queue)]
    assert second == list(range(POLL_PACKETS_MAX, 2 * POLL_PACKETS_MAX))
    assert queue.qsize() == 40 - 2 * POLL_PACKETS_MAX


async def test_taken_counts_what_the_consumer_took_and_discard_drops_the_rest_uncounted() -> None:
    queue = CountingQueue()
    for n in range(5):
        queue.put_nowait(n)
    await queue.get()
    queue.task_done()
    queue.get_nowait()
    queue.task_done()
    assert queue.taken == 2
    assert queue.discard() == 3
    assert queue.empty() and queue.taken == 2
    await asyncio.wait_for(queue.join(), 1.0)  # every packet is accounted for


def test_discard_keeps_the_end_of_stream_mark() -> None:
    queue = CountingQueue()
    for item in (1, 2, None):
        queue.put_nowait(item)
    assert queue.discard() == 2
    assert queue.qsize() == 1 and queue.get_nowait() is None
