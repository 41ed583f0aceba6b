"""uvicorn's WebSocket protocol (websockets, sans-I/O) with two changes for long-lived, busy
connections:

- uvicorn keeps the upgrade request and the 101 response, every header parsed into websockets'
  Headers, for as long as the connection lives: a few KB per idle client that nothing reads after
  the handshake. They are released once the connection is accepted.
- An ASGI extension, SEND_BATCH: one message carries several WebSocket messages, framed one by one
  and handed to the socket in one write. A busy client's writer wakes up to several queued
  Engine.IO packets; written one by one, each costs a system call (most of a frame's cost).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

# Advertised in scope["extensions"]; the message is {"type": SEND_BATCH, "messages": [str | bytes, ...]}.
SEND_BATCH = "testpulse.websocket.send_batch"


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][SEND_BATCH] = {}

    async def send(self, message: Any) -> None:
        if message["type"] == SEND_BATCH:
            await self._send_batch(message["messages"])
            return
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # uvicorn reads them only before the handshake completes.
            del self.request
            del self.response

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
        self.transport.write(b"".join(self.conn.data_to_send()))
