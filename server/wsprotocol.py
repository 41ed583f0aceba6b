"""uvicorn's WebSocket protocol (websockets, sans-I/O) without the handshake kept for life.

uvicorn keeps the upgrade request and the 101 response, every header parsed into websockets'
Headers, for as long as the connection lives: a few KB per idle client that nothing reads after
the handshake. This subclass lets them go once the connection is accepted.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # uvicorn reads them only before the handshake completes.
            del self.request
            del self.response
