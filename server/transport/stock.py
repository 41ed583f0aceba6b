"""The stock transport: python-engineio's own server, sockets and queue, with what testpulse needs
added through their public seams only (a node-tagged session id, a counted queue)."""

from __future__ import annotations

import asyncio
from typing import Any

import engineio

from testpulse.transport.queue import POLL_PACKETS_MAX


class CountingQueue(asyncio.Queue[Any]):
    """python-engineio's asyncio.Queue plus what the delivery feeds read: how many packets the
    consumer has taken (a stalled reader from a slow one) and a way to drop the backlog.

    python-engineio's socket empties the queue into every long-poll answer, and its own client
    refuses an answer of more than 16 packets (it drops the connection): after one get() and
    POLL_PACKETS_MAX - 1 get_nowait() the queue reads as empty until the next get(). A WebSocket
    writer, the other consumer, only loops once more per 16 packets."""

    def __init__(self) -> None:
        super().__init__()
        self.taken = 0
        self._batch = 0  # taken since the last get()

    async def get(self) -> Any:
        self._batch = 0
        return await super().get()  # which ends in self.get_nowait()

    def get_nowait(self) -> Any:
        if self._batch >= POLL_PACKETS_MAX:
            raise asyncio.QueueEmpty
        item = super().get_nowait()
        self._batch += 1
        self.taken += 1
        return item

    def consumer_waiting(self) -> bool:
        """Whether a consumer (a held long-poll) waits in get(): asyncio.Queue keeps waiting getters
        in `_getters`, as every CPython since 3.4 does."""
        return any(not getter.done() for getter in self._getters)  # type: ignore[attr-defined]

    def discard(self) -> int:
        """Drop every queued packet (a dropped slow consumer's backlog: it replays on rejoin)."""
        dropped, marks = 0, 0
        while not self.empty():
            if super().get_nowait() is None:
                marks += 1  # an end-of-stream mark is not backlog: the writer still needs it
            else:
                dropped += 1
            self.task_done()
        for _ in range(marks):
            self.put_nowait(None)
        return dropped


class TaggedEngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """Engine.IO server whose session ids start with this node's tag ("node1.Xk3..."), so that the
    proxy can send every later request of a session (long-polling, upgrade) to the node that holds
    it without cookies or client-IP hashing (see nginx.conf). This is the stock transport's server;
    server/transport/lean.py's LeanEngineServer is the lean one."""

    sid_tag = ""
    write_timeout = 30.0  # seconds a WebSocket write may wait for a peer that does not read (lean only)

    def generate_id(self) -> str:
        return f"{self.sid_tag}.{super().generate_id()}" if self.sid_tag else str(super().generate_id())

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        return CountingQueue()
