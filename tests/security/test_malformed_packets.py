"""Malformed Engine.IO / Socket.IO packets spoken by hand over a raw WebSocket and raw polling requests.

Whatever arrives, the node keeps serving: other clients keep their acks and their live events, and
stored data stays intact. The sender itself may be answered with an error or disconnected.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.security


class RawSocket:
    """A Socket.IO v5 client written out by hand: Engine.IO v4 text frames over one WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def receive(self, deadline: float = 5.0) -> aiohttp.WSMessage:
        return await asyncio.wait_for(self.ws.receive(), deadline)

    async def receive_text(self, prefix: str, deadline: float = 5.0) -> str:
        """The next text frame starting with `prefix`, answering the server's pings on the way."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline
        while True:
            message = await self.receive(max(0.01, give_up - loop.time()))
            if message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"connection ended while waiting for {prefix!r}: {message.type}")
            if message.data == "2":
                await self.ws.send_str("3")
                continue
            if message.data.startswith(prefix):
                return str(message.data)

    async def ack(self, ack_id: int, deadline: float = 5.0) -> list[Any]:
        """The arguments of the ack with exactly this id (other frames are skipped)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline
        while True:
            frame = await self.receive_text("43", max(0.01, give_up - loop.time()))
            match = re.match(r"43(\d+)(\[.*)$", frame, re.S)
            if match and int(match.group(1)) == ack_id:
                return list(json.loads(match.group(2)))

    async def still_answers(self) -> bool:
        """Whether this connection still takes an event with an ack (False once the server closed it)."""
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str('4277["leave_session",{"session_id":"probe"}]')
            reply = await self.ack(77, deadline=2.0)
        except (AssertionError, ConnectionError, TimeoutError):
            return False
        assert reply == [{"ok": True}], reply
        return True


@pytest.fixture
async def raw(secure_node: NodeUnderTest) -> AsyncIterator[RawSocket]:
    """A raw connection, authenticated with an admin token and past its connection_status."""
    url = secure_node.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        sock = RawSocket(ws)
        opened = await sock.receive_text("0")
        assert "sid" in json.loads(opened[1:])
        await ws.send_str("40" + json.dumps({"token": secure_node.token("admin")}))
        assert (await sock.receive_text("40")).startswith('40{"sid"')
        assert "connection_status" in await sock.receive_text("42")
        yield sock


@pytest.fixture
async def watched(secure_node: NodeUnderTest, connect: Connect) -> tuple[Client, Client, str]:
    """An admin publishing into a running session with three detections, and a viewer watching it."""
    admin = await connect(secure_node, "admin", name="publisher")
    viewer = await connect(secure_node, "viewer", name="watcher")
    session_id = str((await admin.start_session())["id"])
    await viewer.join(session_id)
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(3)]})
    assert await viewer.wait_for_seqs(session_id, 3) == [1, 2, 3]
    return admin, viewer, session_id


async def assert_others_unharmed(node: NodeUnderTest, watched: tuple[Client, Client, str]) -> None:
    admin, viewer, session_id = watched
    seq = await admin.publish(session_id, 99)
    assert seq == 4
    assert await viewer.wait_for_seqs(session_id, 4) == [1, 2, 3, 4]
    async with httpx.AsyncClient(base_url=node.url) as http:
        assert (await http.get("/health")).json() == {"status": "healthy"}
        stored = await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))
    assert [e["seq"] for e in stored.json()["events"]] == [1, 2, 3, 4]


TEXT_FRAMES = {
    "garbage": "garbage",
    "empty": "",
    "unknown-engineio-type": "9hello",
    "message-without-socketio-packet": "4",
    "unknown-socketio-type": "49[]",
    "event-without-data": "42",
    "event-truncated-json": '42["join_session",{"session_id":',
    "event-object-not-array": '42{"event":"join_session"}',
    "event-empty-array": "42[]",
    "event-with-ack-empty-array": "421[]",
    "event-name-number": '42[1,{"session_id":"s"}]',
    "event-name-list": '421[[1],{"session_id":"s"}]',
    "event-name-object": '421[{"a":1}]',
    "event-name-null": '421[null,{"session_id":"s"}]',
    "event-name-true": "421[true]",
    "reserved-connect": '421["connect",{}]',
    "reserved-disconnect": '421["disconnect",{}]',
    "ack-id-not-a-number": '42abc["join_session",{}]',
    "huge-ack-id": '42999999999999999999999999["leave_session",{"session_id":"s"}]',
    "deep-nesting": '421["join_session",' + "[" * 100_000 + "]" * 100_000 + "]",
    "nan-literal": '421["publish_detection",{"session_id":"s","label":"a","confidence":NaN}]',
    "binary-event-without-attachments": '451-["publish_detection",{"_placeholder":true,"num":0}]',
    "binary-event-bad-count": '45x-["publish_detection",{}]',
    "client-ack-for-unknown-id": '4377["whatever"]',
    "unknown-namespace": '42/admin,["join_session",{"session_id":"s"}]',
    "connect-again": "40",
    "connect-error-from-client": '44{"message":"x"}',
    "engineio-upgrade-out-of-place": "5",
    "engineio-noop": "6",
    "engineio-open-from-client": '0{"sid":"x"}',
    "engineio-pong-unprompted": "3",
    "engineio-ping-from-client": "2probe",
    "unicode-junk": '42["\u0000\ud7ff\ufffe", {}]',
}

BINARY_FRAMES = {
    "binary-junk": b"\x00\x01\xfe\xff",
    "binary-message": b"\x04\x00\xff",
    "binary-empty": b"",
}


def log_mark(node: NodeUnderTest) -> int:
    return node.node.log_path.stat().st_size


def tracebacks_since(node: NodeUnderTest, mark: int) -> list[str]:
    """Traceback headers the node logged after `mark`: client garbage must cost one line, not a
    traceback (a client sending junk in a loop would otherwise fill the disk)."""
    with node.node.log_path.open("rb") as log:
        log.seek(mark)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines() if line.startswith("Traceback")]


@pytest.mark.parametrize("frame", list(TEXT_FRAMES.values()), ids=list(TEXT_FRAMES))
async def test_malformed_text_frame_never_disturbs_the_node_or_other_clients(
    secure_node: NodeUnderTest, raw: RawSocket, watched: tuple[Client, Client, str], frame: str
) -> None:
    mark = log_mark(secure_node)
    await raw.ws.send_str(frame)
    await raw.still_answers()  # either the sender is still served, or it was cut off; both are fine
    await assert_others_unharmed(secure_node, watched)
    assert tracebacks_since(secure_node, mark) == []


@pytest.mark.parametrize("frame", list(BINARY_FRAMES.values()), ids=list(BINARY_FRAMES))
async def test_binary_junk_never_disturbs_the_node_or_other_clients(
    secure_node: NodeUnderTest, raw: RawSocket, watched: tuple[Client, Client, str], frame: bytes
) -> None:
    mark = log_mark(secure_node)
    await raw.ws.send_bytes(frame)
    await raw.still_answers()
    await assert_others_unharmed(secure_node, watched)
    assert tracebacks_since(secure_node, mark) == []


async def test_a_burst_of_every_malformed_frame_on_one_connection_never_disturbs_others(
    secure_node: NodeUnderTest, raw: RawSocket, watched: tuple[Client, Client, str]
) -> None:
    for frame in TEXT_FRAMES.values():
        try:
            await raw.ws.send_str(frame)
        except ConnectionError:  # the server cut this connection off: that is allowed
            break
    await raw.still_answers()
    await assert_others_unharmed(secure_node, watched)


async def test_unknown_event_by_name_number_is_answered_with_bad_request(raw: RawSocket) -> None:
    await raw.ws.send_str('4217[1,{"session_id":"s"}]')
    reply = await raw.ack(17)
    assert reply[0]["ok"] is False and reply[0]["error"]["code"] == "bad_request"
    assert await raw.still_answers()


@pytest.mark.parametrize("name", [["x"], {"a": 1}, None, True, 1.5])
async def test_event_name_that_is_not_a_string_is_answered_with_bad_request(raw: RawSocket, name: Any) -> None:
    await raw.ws.send_str(f'4218[{json.dumps(name)},{{"session_id":"s"}}]')
    reply = await raw.ack(18)
    assert reply[0]["ok"] is False and reply[0]["error"]["code"] == "bad_request"
    assert await raw.still_answers()


async def test_connect_event_from_a_client_cannot_swap_its_token_or_reset_its_rate_limit(
    secure_node: NodeUnderTest,
) -> None:
    url = secure_node.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        sock = RawSocket(ws)
        await sock.receive_text("0")
        await ws.send_str("40" + json.dumps({"token": secure_node.token("viewer")}))
        await sock.receive_text("40")
        forged = {"HTTP_AUTHORIZATION": f"Bearer {secure_node.token('admin')}", "REMOTE_ADDR": "10.9.9.9"}
        await ws.send_str(f'4220["connect",{json.dumps(forged)}]')
        reply = await sock.ack(20)
        assert reply[0]["ok"] is False and reply[0]["error"]["code"] == "bad_request"
        await ws.send_str('4221["start_test_session",{}]')
        assert (await sock.ack(21))[0]["error"]["code"] == "unauthorized", "the viewer became an admin"


async def test_disconnect_event_from_a_client_does_not_break_its_connection(raw: RawSocket) -> None:
    await raw.ws.send_str('4222["disconnect","io server disconnect"]')
    assert (await raw.ack(22))[0]["error"]["code"] == "bad_request"
    await raw.ws.send_str('4223["start_test_session",{"name":"still me"}]')
    assert (await raw.ack(23))[0]["ok"] is True


async def test_catch_all_event_name_cannot_send_errors_to_other_clients(
    raw: RawSocket, watched: tuple[Client, Client, str]
) -> None:
    admin, viewer, session_id = watched
    # Without an ack id, a failure is reported as an `error` event: it must go to the sender only.
    await raw.ws.send_str(f'42["*","session:{session_id}"]')
    await raw.ws.send_str(f'42["*",{json.dumps(viewer.sio.get_sid("/"))}]')
    assert await raw.still_answers()
    await admin.publish(session_id, 50)
    await viewer.wait_for_seqs(session_id, 4)  # delivered after the injections were handled
    assert viewer.errors() == [] and admin.errors() == []


async def test_well_formed_frames_by_hand_work(raw: RawSocket) -> None:
    await raw.ws.send_str('421["start_test_session",{"name":"by hand"}]')
    ack: list[dict[str, Any]] = json.loads((await raw.receive_text("431"))[3:])
    assert ack[0]["ok"] is True and ack[0]["session"]["name"] == "by hand"


async def test_socketio_connect_without_auth_on_a_raw_socket_is_refused(secure_node: NodeUnderTest) -> None:
    url = secure_node.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        sock = RawSocket(ws)
        await sock.receive_text("0")
        await ws.send_str("40")
        refusal = json.loads((await sock.receive_text("44"))[2:])
        assert refusal["code"] == "auth_missing"


POLLING_BODIES = {
    "garbage": b"garbage",
    "bad-event-json": b'42["join_session",{',
    "record-separator-junk": b"\x1e\x1e4\x1e42[]\x1e",
    "binary-base64-junk": b"b!!!not-base64",
    "invalid-utf8": b'42["\xff\xfe"]',
}


@pytest.mark.parametrize("body", list(POLLING_BODIES.values()), ids=list(POLLING_BODIES))
async def test_malformed_polling_body_never_disturbs_the_node_or_other_clients(
    secure_node: NodeUnderTest, watched: tuple[Client, Client, str], body: bytes
) -> None:
    mark = log_mark(secure_node)
    async with httpx.AsyncClient(base_url=secure_node.url, timeout=10) as http:
        opened = await http.get("/socket.io/", params={"EIO": 4, "transport": "polling"})
        assert opened.status_code == 200
        sid = json.loads(opened.text[1:])["sid"]
        params = {"EIO": 4, "transport": "polling", "sid": sid}
        token = json.dumps({"token": secure_node.token("admin")})
        assert (await http.post("/socket.io/", params=params, content="40" + token)).status_code == 200
        response = await http.post("/socket.io/", params=params, content=body)
        assert response.status_code in (200, 400), response.status_code
        unknown = await http.post("/socket.io/", params={**params, "sid": "no-such-sid"}, content=b"42[]")
        assert unknown.status_code == 400
    await assert_others_unharmed(secure_node, watched)
    assert tracebacks_since(secure_node, mark) == []


async def test_concurrent_long_polls_on_one_session_are_answered_without_a_server_error(
    secure_node: NodeUnderTest, watched: tuple[Client, Client, str]
) -> None:
    async with httpx.AsyncClient(base_url=secure_node.url, timeout=60) as http:
        opened = await http.get("/socket.io/", params={"EIO": 4, "transport": "polling"})
        sid = json.loads(opened.text[1:])["sid"]
        params = {"EIO": 4, "transport": "polling", "sid": sid}
        token = json.dumps({"token": secure_node.token("admin")})
        assert (await http.post("/socket.io/", params=params, content="40" + token)).status_code == 200
        assert (await http.get("/socket.io/", params=params)).text.startswith("40")  # CONNECT (+ status)
        # Two GETs held at once: one waits for packets, the other must get an answer, not a 500.
        first = asyncio.create_task(http.get("/socket.io/", params=params))
        await asyncio.sleep(0.2)
        second = await http.get("/socket.io/", params=params)
        assert second.status_code in (200, 400), (second.status_code, second.text)
        # A packet for the session releases the waiting one.
        await http.post("/socket.io/", params=params, content='42["no_such_event"]')
        answered = await asyncio.wait_for(first, 30)
        assert answered.status_code in (200, 400), (answered.status_code, answered.text)
    await assert_others_unharmed(secure_node, watched)
