"""LeanWebSocketProtocol under a real uvicorn server on loopback: the SEND_BATCH extension frames
each message on its own, in order; the 101 response shares the first frames' write without
waiting for them; the handshake objects are released after accept."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import uvicorn

from testpulse.transport.wiremessage import WireMessage
from testpulse.transport.wsprotocol import SEND_BATCH, WRITE_NOW, Gate, LeanWebSocketProtocol

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self) -> None:
        self.extensions: dict[str, Any] = {}
        self.kept_handshake: bool | None = None
        self.held_after_accept = b""
        self.held_after_batch = b""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        self.extensions = dict(scope.get("extensions") or {})
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        protocol = send.__self__
        self.kept_handshake = hasattr(protocol, "request") or hasattr(protocol, "response")
        self.held_after_accept = protocol._held
        await send({"type": SEND_BATCH, "messages": ["one", b"\x00two", "three"]})
        self.held_after_batch = protocol._held
        await send({"type": "websocket.send", "text": "four"})
        while (await receive())["type"] != "websocket.disconnect":
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: Any, deflate: bool = False) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws=LeanWebSocketProtocol,
        ws_per_message_deflate=deflate,
        lifespan="off",
        log_level="error",
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
    # The 101 response waited for the first frames and went out with them in one write.
    assert app.held_after_accept.startswith(b"HTTP/1.1 101")
    assert app.held_after_batch == b""


async def test_a_held_handshake_is_written_by_the_end_of_the_loop_turn() -> None:
    go = asyncio.Event()

    class AcceptOnly(Recorder):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await go.wait()  # no frame until the client has seen the 101 response
            await send({"type": "websocket.send", "text": "late"})
            while (await receive())["type"] != "websocket.disconnect":
                pass

    async with serving(AcceptOnly()) as url, aiohttp.ClientSession() as http:
        async with asyncio.timeout(10):  # a 101 held for the first frame would never arrive
            ws = await http.ws_connect(url)
        go.set()
        assert (await ws.receive(timeout=5)).data == "late"
        await ws.close()


class WritesNow:
    """Writes with write_now, between ordinary sends; records what write_now answered."""

    def __init__(self) -> None:
        self.extensions: dict[str, Any] = {}
        self.answers: list[bool] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.extensions = dict(scope.get("extensions") or {})
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        protocol = send.__self__
        shared = WireMessage("dé".encode())
        self.answers.append(protocol.write_now([WireMessage(b"one"), shared, WireMessage(b"\x00b", binary=True)]))
        await send({"type": "websocket.send", "text": "middle"})
        protocol.writable.clear()  # as flow control does: nothing may be written now
        self.answers.append(protocol.write_now([WireMessage(b"held back")]))
        protocol.writable.set()
        self.answers.append(protocol.write_now([shared]))  # the same frame bytes, reused
        while (await receive())["type"] != "websocket.disconnect":
            pass


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
async def test_write_now_writes_in_order_with_other_sends_unless_flow_control_holds_it(deflate: bool) -> None:
    app = WritesNow()
    async with (
        serving(app, deflate=deflate) as url,
        aiohttp.ClientSession() as http,
        http.ws_connect(url, compress=15 if deflate else 0) as ws,
    ):
        received = [(await ws.receive(timeout=5)).data for _ in range(5)]
        assert bool(ws.compress) is deflate  # the extension was negotiated or not, as meant
    assert received == ["one", "dé", b"\x00b", "middle", "dé"]
    assert app.answers == [True, False, True]
    assert WRITE_NOW in app.extensions


class Echo:
    """Echoes what the client sends; records whether the parser still holds the upgrade request."""

    def __init__(self) -> None:
        self.parser_holds_request: bool | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        parser = send.__self__.conn.parser
        self.parser_holds_request = "request" in (parser.gi_frame.f_locals if parser.gi_frame else {})
        while (event := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": event.get("text") or "?"})


async def test_after_the_handshake_frames_are_parsed_without_keeping_the_request() -> None:
    app = Echo()
    async with serving(app) as url, aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for text in ("one", "two" * 50_000):  # a short frame and one with a 64-bit length
            await ws.send_str(text)
            assert (await ws.receive(timeout=5)).data == text
    assert app.parser_holds_request is False


async def test_the_gate_lets_waiters_through_once_set() -> None:
    gate = Gate(False)
    assert not gate.is_set()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True]
    assert await gate.wait() is True  # open: no suspension
    gate.clear()
    cancelled = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    assert gate._waiters == []  # a cancelled waiter leaves nothing behind
    gate.set()
