"""uvicorn's WebSocket protocol (websockets, sans-I/O) with two changes for long-lived, busy
connections:

- uvicorn keeps the upgrade request and the 101 response, every header parsed into websockets'
  Headers, for as long as the connection lives (and websockets' parser keeps the request too): a
  few KB per idle client that nothing reads after the handshake. They are released once the
  connection is accepted. uvicorn's receive queue and flow-control event are lighter ones.
- An ASGI extension, SEND_BATCH: one message carries several WebSocket messages, framed one by one
  and handed to the socket in one write. And WRITE_NOW, a plain method (`write_now`) for callers
  that write without a task of their own (server/transport/lean.py's flusher): no suspension, and a
  frame built once for every client that gets the same message. A busy client's writer wakes up to several queued
  Engine.IO packets; written one by one, each costs a system call (most of a frame's cost).
  The 101 response waits for the rest of its loop turn, so the first frames share its write.

The lean transport's protocol (server/transport/auto.py): it relies on uvicorn internals that
server/transport/internals.py lists; the stock transport runs uvicorn's own protocol instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.protocol import Protocol, State

from testpulse.transport.extensions import ABORT, SEND_BATCH, WRITE_NOW
from testpulse.transport.lean import PacketQueue
from testpulse.transport.wiremessage import WireMessage

__all__ = ["ABORT", "SEND_BATCH", "WRITE_NOW", "LeanWebSocketProtocol"]


class _HeldWrites:
    """Stands in for the transport while uvicorn writes the 101 response, and keeps the bytes."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Gate:
    """The part of asyncio.Event that uvicorn's protocol uses for its flow control (`writable`),
    with the list of waiters made only when one waits: almost every connection is writable for
    its whole life, and asyncio.Event gives each a deque up front."""

    __slots__ = ("_open", "_waiters")

    def __init__(self, is_open: bool) -> None:
        self._open = is_open
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        if not self._open:
            self._open = True
            waiters, self._waiters = self._waiters, None
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if self._open:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    _held = b""  # the 101 response, until the first frames (or the end of this loop turn) join it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's receive queue (an asyncio.Queue: three deques and an Event with a fourth) and
        # its flow-control Event, for one consumer each: the lean ones cost a few slots at rest.
        self.queue = PacketQueue()  # type: ignore[assignment]
        self.writable = Gate(True)  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][SEND_BATCH] = {}
            scope["extensions"][ABORT] = {}
            scope["extensions"][WRITE_NOW] = {}

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == SEND_BATCH:
            await self._send_batch(message["messages"])
            return
        if kind == ABORT:
            # Not behind `writable`: flow control is exactly what a peer that does not read holds shut.
            self._abort()
            return
        if kind != "websocket.accept":
            self._release_held()
            await super().send(message)
            return
        # The 101 response is held for the rest of this loop turn: a server that sends its first
        # frames at once (Engine.IO's OPEN packet) sends them in the same write.
        transport, held = self.transport, _HeldWrites(self.transport)
        self.transport = held  # type: ignore[assignment]  # duck-typed for uvicorn's accept path
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if held.data:
            self._held = held.data
            self.loop.call_soon(self._release_held)
        if self.handshake_complete:
            # uvicorn reads them only before the handshake completes.
            del self.request
            del self.response
            self._drop_handshake_parser()

    def _drop_handshake_parser(self) -> None:
        """websockets parses the upgrade request and then the frames in one generator, whose frame
        keeps the request (every header) for as long as the connection lives. Once the request is
        answered, and nothing past it has been read (a client sends no frame before it has the
        101 response), a frame parser of its own takes over, exactly where the other one waits."""
        conn = self.conn
        reader = conn.reader
        if reader.buffer or reader.eof or conn.state is not State.OPEN or conn.parser_exc is not None:
            return
        parser = Protocol.parse(conn)
        next(parser)  # to its first wait for data, as websockets starts its own
        conn.parser = parser

    def _abort(self) -> None:
        # A plain close would leave the kernel sending what the peer never takes (an orphaned
        # socket in FIN-WAIT-1, with its buffers, for minutes); a zero linger time resets it now.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _release_held(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            if not self.transport.is_closing():
                self.transport.write(data)

    def write_now(self, messages: list[WireMessage]) -> bool:
        """WRITE_NOW: write these messages at once, without suspending; False, with nothing
        written, while flow control holds writes back (the caller then waits, with its deadline,
        through SEND_BATCH). On a connection without extensions, each message's frame is the same
        bytes for every client (WireMessage.frame), built once for all of them."""
        if not self.writable.is_set():
            return False
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.close_sent or self.initial_response is not None:
            raise RuntimeError(f"'{WRITE_NOW}' is only valid on an open WebSocket")
        conn = self.conn
        if conn.state is not State.OPEN:
            raise ClientDisconnected()
        if conn.extensions or conn.expect_continuation_frame:
            for message in messages:
                if message.binary:
                    conn.send_binary(message.payload)
                else:
                    conn.send_text(message.payload)
            frames = conn.data_to_send()
        elif len(messages) == 1 and not conn.writes and not self._held:
            # The common case, one packet and nothing else to send: its shared bytes as they are.
            self.transport.write(messages[0].frame)
            return True
        else:
            # Control frames websockets has queued (a PONG) go first, as send_text would order them.
            frames = conn.data_to_send()
            frames.extend([message.frame for message in messages])
        held, self._held = self._held, b""
        self.transport.write(b"".join([held, *frames]))
        return True

    async def _send_batch(self, messages: list[str | bytes]) -> None:
        await self.writable.wait()  # the transport's flow control, as for a single message
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.close_sent or self.initial_response is not None:
            raise RuntimeError(f"'{SEND_BATCH}' is only valid on an open WebSocket")
        try:
            for data in messages:
                if isinstance(data, bytes):
                    self.conn.send_binary(data)
                else:
                    self.conn.send_text(data.encode())
        except InvalidState:
            raise ClientDisconnected() from None
        held, self._held = self._held, b""
        self.transport.write(b"".join([held, *self.conn.data_to_send()]))
