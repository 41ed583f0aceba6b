"""Wire-level fuzz over a real node: Hypothesis-made Engine.IO / Socket.IO frames (bad packet types,
namespaces, ack ids, JSON, binary, oversized, garbage event names and arguments) over a raw
WebSocket and over raw long-polling POSTs. Afterwards: no traceback in the node's log, a bystander
connected beforehand still gets its live detections, and every acked detection is stored and
replayable. The frame count follows the Hypothesis profile (tests/conftest.py): ci is bounded,
HYPOTHESIS_PROFILE=soak sends many more."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

from tests.security.test_malformed_packets import log_mark, tracebacks_since

pytestmark = pytest.mark.security

EVENTS = ["join_session", "leave_session", "start_test_session", "pause_test_session", "resume_test_session"]
EVENTS += ["stop_test_session", "publish_detection", "publish_detections", "refresh_token", "get_presence"]
EVENTS += ["connect", "disconnect", "error", "*", "", "connection_status"]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
payload_fields = st.dictionaries(
    st.sampled_from(["session_id", "label", "confidence", "detections", "last_seq", "token", "attributes", "bbox"]),
    json_values,
    max_size=5,
)
event_arrays = st.lists(st.sampled_from(EVENTS) | json_values, min_size=0, max_size=1).flatmap(
    lambda head: st.lists(payload_fields | json_values, max_size=3).map(lambda rest: head + rest)
)
bodies = (
    event_arrays.map(lambda a: json.dumps(a))
    | event_arrays.map(lambda a: json.dumps(a)[: max(1, len(json.dumps(a)) // 2)])  # truncated
    | st.text(max_size=40)
    | st.sampled_from(["[" * 2000 + "]" * 2000, '["publish_detection",{"confidence":NaN}]', "x" * 70_000])
)
socketio_packets = st.tuples(
    st.sampled_from([*"0123456789", "", "x"]),  # Socket.IO packet type
    st.sampled_from(["", "1-", "0-", "99-", "x-"]),  # binary attachment count
    st.sampled_from(["", "/", "/admin,", "/\u0000,", "/,"]),  # namespace
    st.sampled_from(["", "1", "0", "-1", "abc", "9" * 30]),  # ack id
    bodies,
).map("".join)
engineio_frames = st.tuples(st.sampled_from([*"0123456789", "", "x"]), st.text(max_size=10)).map("".join)
text_frames = socketio_packets.map(lambda p: "4" + p) | engineio_frames
frames = text_frames.map(str.encode) | st.binary(max_size=64) | text_frames.map(lambda t: t.encode() + b"\xff\xfe")


def examples(strategy: st.SearchStrategy[Any], factor: int = 2) -> list[Any]:
    """Values drawn from `strategy`, as many as the profile's max_examples times `factor`."""
    drawn: list[Any] = []
    count = hsettings().max_examples * factor

    @hsettings(max_examples=count, phases=[Phase.generate], database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


@pytest.fixture
async def bystander(secure_node: NodeUnderTest, connect: Connect) -> AsyncIterator[tuple[Client, Client, str]]:
    admin = await connect(secure_node, "admin", name="fuzz-publisher")
    viewer = await connect(secure_node, "viewer", name="fuzz-bystander")
    session_id = str((await admin.start_session())["id"])
    await viewer.join(session_id)
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(3)]})
    assert await viewer.wait_for_seqs(session_id, 3) == [1, 2, 3]
    yield admin, viewer, session_id


async def still_unharmed(node: NodeUnderTest, bystander: tuple[Client, Client, str], mark: int) -> None:
    admin, viewer, session_id = bystander
    assert viewer.connected, viewer.summary()
    seq = await admin.publish(session_id, 99)
    assert await viewer.wait_for_seqs(session_id, seq) == list(range(1, seq + 1))
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
        stored = await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))
    assert [e["seq"] for e in stored.json()["events"]] == list(range(1, seq + 1))
    replayer = Client("fuzz-replayer")
    try:
        await replayer.connect(node.url, token=node.token("viewer"), transport="websocket")
        await replayer.join(session_id, last_seq=0)
        assert await replayer.wait_for_seqs(session_id, seq) == list(range(1, seq + 1))
    finally:
        await replayer.disconnect()
    assert tracebacks_since(node, mark) == []


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read whatever the node sends, answering PINGs, until the WebSocket ends."""
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT and message.data == "2":
            await ws.send_str("3")


async def test_websocket_fuzz_never_disturbs_the_node_or_a_bystander(
    secure_node: NodeUnderTest, bystander: tuple[Client, Client, str]
) -> None:
    mark = log_mark(secure_node)
    token = json.dumps({"token": secure_node.token("admin")})
    sent = 0
    async with aiohttp.ClientSession() as http:
        ws: aiohttp.ClientWebSocketResponse | None = None
        reader: asyncio.Task[None] | None = None
        for frame in examples(frames):
            if ws is None or ws.closed:
                if reader is not None:
                    await reader
                ws = await http.ws_connect(f"{secure_node.url}/socket.io/?EIO=4&transport=websocket")
                assert (await ws.receive_str(timeout=10)).startswith("0{")
                await ws.send_str("40" + token)
                reader = asyncio.create_task(_drain(ws))
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionError):
                if isinstance(frame, bytes) and frame.startswith(b"4") and b"\xff" not in frame:
                    await ws.send_str(frame.decode())
                else:
                    await ws.send_bytes(frame)
                sent += 1
        assert ws is not None and reader is not None
        await ws.close()
        await reader
    assert sent > 0
    await still_unharmed(secure_node, bystander, mark)


async def _long_poll(http: httpx.AsyncClient, params: dict[str, Any]) -> None:
    """Hold a long-poll GET on the session until the node ends it, as a client does, so that its
    queue never fills; answers PINGs."""
    while True:
        polled = await http.get("/socket.io/", params=params, timeout=60)
        packets = polled.text.split("\x1e")
        if polled.status_code != 200 or "1" in packets or "" in packets:
            return
        if "2" in packets:
            await http.post("/socket.io/", params=params, content="3")


async def test_polling_fuzz_never_disturbs_the_node_or_a_bystander(
    secure_node: NodeUnderTest, bystander: tuple[Client, Client, str]
) -> None:
    mark = log_mark(secure_node)
    token = json.dumps({"token": secure_node.token("admin")})
    answered = 0
    pollers: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(base_url=secure_node.url, timeout=5) as http:
        params: dict[str, Any] | None = None
        for frame in examples(st.lists(frames, min_size=1, max_size=3)):
            if params is None:
                opened = await http.get("/socket.io/", params={"EIO": 4, "transport": "polling"})
                params = {"EIO": 4, "transport": "polling", "sid": json.loads(opened.text[1:])["sid"]}
                assert (await http.post("/socket.io/", params=params, content="40" + token)).status_code == 200
                pollers.append(asyncio.create_task(_long_poll(http, params)))
            body = b"\x1e".join(frame)  # several packets in one POST, as Engine.IO v4 batches them
            try:
                response = await http.post("/socket.io/", params=params, content=body)
            except httpx.TimeoutException:
                raise AssertionError(f"POST unanswered in 5 s: {body[:300]!r}") from None
            assert response.status_code in (200, 400, 413), (response.status_code, body[:200])
            answered += 1
            if response.status_code != 200 or pollers[-1].done():
                params = None  # the node ended that session: open another
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
    assert answered > 0
    await still_unharmed(secure_node, bystander, mark)
