"""The outbound queue of one Engine.IO socket: the contract the feeds, the handlers and the drain rely on."""

from __future__ import annotations

from typing import Any, Protocol

POLL_PACKETS_MAX = 16  # python-engineio clients refuse a long-polling payload of more packets


class OutboundQueue(Protocol):
    """What is queued for one client, in the order it goes out. stock.CountingQueue and lean.PacketQueue
    implement it, and every Engine.IO socket of a node has one as `socket.queue`.

    Guarantees: packets leave in put order; `taken` only grows and counts packets handed to the
    consumer (a writer or a long-poll), so an unchanged `taken` over an interval with packets queued
    means a stalled reader; None is the end-of-stream mark, not a packet (discard() keeps it, qsize()
    may count it); join() returns once every packet put so far has been taken and marked done; a
    long-poll answer never carries more than POLL_PACKETS_MAX packets."""

    taken: int

    def qsize(self) -> int: ...

    def empty(self) -> bool: ...

    def put_nowait(self, item: Any) -> None: ...

    def consumer_waiting(self) -> bool:
        """Whether a consumer (a held long-poll) waits for the next packet now."""
        ...

    def discard(self) -> int:
        """Drop every queued packet (a dropped slow consumer's backlog: it replays on rejoin); how many."""
        ...

    async def join(self) -> None: ...
