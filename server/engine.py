"""Which transport a node runs, decided once, and the Engine.IO server and uvicorn protocol of each.

`TESTPULSE_TRANSPORT`, the way uvicorn picks an implementation behind `auto`:
  - `lean`: server/transport.py and server/wsprotocol.py, built on library internals
    (server/internals.py lists them) for less memory and CPU per client;
  - `stock`: python-engineio's own sockets and queue, python-socketio's own dispatch and uvicorn's
    own WebSocket protocol, with our behaviour added through their public seams only;
  - `auto` (the default): lean when every internal it needs is there, else stock, with one warning
    line naming what is missing.
Both speak the same wire protocol; what only lean has is the write deadline (a peer that stops
reading is aborted after TESTPULSE_WRITE_TIMEOUT_SECONDS; stock leaves it to uvicorn and the PING
timeout) and several WebSocket messages per write; and a malformed Engine.IO frame or long-polling
body is python-engineio's to handle on stock (it logs a traceback; other clients are unharmed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Literal

import engineio

from server import internals

log = logging.getLogger("testpulse.engine")

Kind = Literal["lean", "stock"]

POLL_PACKETS_MAX = 16  # python-engineio clients refuse a long-polling payload of more packets


@functools.cache
def lean_missing() -> tuple[str, ...]:
    return tuple(internals.missing(internals.LEAN))


def select(choice: str) -> Kind:
    """The transport for TESTPULSE_TRANSPORT=`choice`; `auto` probes the libraries (once a process)."""
    if choice == "stock":
        return "stock"
    if choice == "lean":
        return "lean"
    absent = lean_missing()
    if absent:
        log.warning(
            "TESTPULSE_TRANSPORT=auto: running the stock transport, the installed libraries lack what the lean"
            " one needs: %s",
            "; ".join(absent),
        )
        return "stock"
    return "lean"


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
    server/transport.py's LeanEngineServer is the lean one."""

    sid_tag = ""
    write_timeout = 30.0  # seconds a WebSocket write may wait for a peer that does not read (lean only)

    def generate_id(self) -> str:
        return f"{self.sid_tag}.{super().generate_id()}" if self.sid_tag else str(super().generate_id())

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        return CountingQueue()


def engine_server_class(kind: Kind) -> type[TaggedEngineServer]:
    if kind == "stock":
        return TaggedEngineServer
    from server.transport import LeanEngineServer  # imports library internals: only when chosen

    return LeanEngineServer


def uvicorn_ws(kind: Kind) -> Any:
    """uvicorn's `ws=` for the transport: our protocol class, or uvicorn's own pick."""
    if kind == "stock":
        return "auto"
    from server.wsprotocol import LeanWebSocketProtocol

    return LeanWebSocketProtocol
