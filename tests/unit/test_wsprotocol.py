"""LeanWebSocketProtocol under a real uvicorn server on loopback: the SEND_BATCH extension frames
each message on its own, in order, and the handshake objects are released after accept."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import uvicorn

from server.wsprotocol import SEND_BATCH, LeanWebSocketProtocol

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self) -> None:
        self.extensions: dict[str, Any] = {}
        self.kept_handshake: bool | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        self.extensions = dict(scope.get("extensions") or {})
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        protocol = send.__self__
        self.kept_handshake = hasattr(protocol, "request") or hasattr(protocol, "response")
        await send({"type": SEND_BATCH, "messages": ["one", b"\x00two", "three"]})
        await send({"type": "websocket.send", "text": "four"})
        while (await receive())["type"] != "websocket.disconnect":
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: Recorder) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws=LeanWebSocketProtocol, lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn has no event to wait on
        assert not task.done(), "uvicorn stopped during start-up"
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await task


async def test_a_batch_arrives_as_separate_messages_in_order_and_the_handshake_is_released() -> None:
    app = Recorder()
    async with serving(app) as url, aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        received = [(await ws.receive(timeout=5)).data for _ in range(4)]
    assert received == ["one", b"\x00two", "three", "four"]
    assert SEND_BATCH in app.extensions
    assert app.kept_handshake is False
