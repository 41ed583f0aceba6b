"""Socket.IO over a bare WebSocket, for tests that must see every frame (and choose whether to
answer PINGs), and the node's connected-clients gauge."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from support.nodes import NodeUnderTest


class RawClient:
    """An Engine.IO v4 / Socket.IO v5 client over a bare WebSocket that answers PINGs only when told to."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[tuple[float, str]] = []
        self.closed_at: float | None = None

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, node: NodeUnderTest, token: str) -> RawClient:
        ws = await http.ws_connect(f"{node.url}/socket.io/?EIO=4&transport=websocket", autoping=True)
        client = cls(ws)
        opened = await ws.receive_str(timeout=10)
        assert opened.startswith("0{")
        await ws.send_str("40" + json.dumps({"token": token}))
        connected = await ws.receive_str(timeout=10)
        assert connected.startswith("40{"), connected
        return client

    async def listen(self, *, answer_pings: bool, until: float) -> None:
        """Record frames until the server closes the WebSocket or `until` (monotonic) passes."""
        while (left := until - time.monotonic()) > 0:
            try:
                msg = await self.ws.receive(timeout=left)
            except TimeoutError:
                return
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.closed_at = time.monotonic()
                return
            self.frames.append((time.monotonic(), msg.data))
            if msg.data == "2" and answer_pings:
                await self.ws.send_str("3")

    def pings(self) -> list[float]:
        return [at for at, data in self.frames if data == "2"]

    def events(self, name: str) -> list[Any]:
        found = []
        for _, data in self.frames:
            if data.startswith("42"):
                event = json.loads(data[2:])
                if event[0] == name:
                    found.append(event[1] if len(event) > 1 else None)
        return found


async def connected_clients(http: aiohttp.ClientSession, node: NodeUnderTest) -> float:
    async with http.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("testpulse_connected_clients{")
    )


async def settles_at(fetch: Callable[[], Awaitable[float]], expected: float, what: str, deadline: float = 10.0) -> None:
    give_up = time.monotonic() + deadline
    while (value := await fetch()) != expected:
        assert time.monotonic() < give_up, f"{what}: still {value}, expected {expected}"
        await asyncio.sleep(0.1)
