"""Server-initiated disconnects on the wire (PROTOCOL.md 1.1): what a client is told, which packets
end the connection, and that no drop or drain waits on a client that is gone or does not read.

Reconnect advice `auto` must not come with a Socket.IO DISCONNECT packet ("41"): socket.io-client
and python-socketio never reconnect by themselves after one. `refresh` and `no` must."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from support.client import detection
from support.nodes import NodeUnderTest, node_with
from support.processes import wait_until
from support.rawclient import RawClient, connected_clients, settles_at

pytestmark = pytest.mark.contract

SIO_DISCONNECT = "41"
EIO_CLOSE = "1"
RECORD_SEP = "\x1e"


@pytest.fixture
async def fresh_node(logs_dir: Path) -> AsyncIterator[NodeUnderTest]:
    """A node of this test's own: the tests stop it."""
    env = {"TESTPULSE_NODE_ID": "disconnects", "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "20"}
    async with node_with("sqlite", env, logs_dir) as running:
        yield running


class RawPollingClient:
    """Engine.IO v4 long-polling by hand, so a test sees every packet of every poll."""

    def __init__(self, http: aiohttp.ClientSession, node: NodeUnderTest) -> None:
        self.http = http
        self.base = f"{node.url}/socket.io/?EIO=4&transport=polling"
        self.sid = ""
        self.packets: list[str] = []

    async def connect(self, token: str) -> None:
        async with self.http.get(self.base) as resp:
            opened = await resp.text()
        assert opened.startswith("0{"), opened
        self.sid = json.loads(opened[1:])["sid"]
        async with self.http.post(f"{self.base}&sid={self.sid}", data="40" + json.dumps({"token": token})) as resp:
            assert resp.status == 200
        await self.poll()
        assert any(p.startswith("40{") for p in self.packets), self.packets

    async def poll(self) -> int:
        """One GET; returns its status. Its packets are appended to `packets`."""
        async with self.http.get(f"{self.base}&sid={self.sid}", timeout=aiohttp.ClientTimeout(total=60)) as resp:
            body = await resp.text()
        if resp.status == 200 and body:
            self.packets += body.split(RECORD_SEP)
        return resp.status

    def events(self, name: str) -> list[Any]:
        found = []
        for data in self.packets:
            if data.startswith("42"):
                event = json.loads(data[2:])
                if event[0] == name:
                    found.append(event[1] if len(event) > 1 else None)
        return found


async def node_exited(node: NodeUnderTest, deadline: float) -> float:
    started = time.monotonic()

    async def exited() -> bool:
        return not node.node.process.running

    await wait_until(exited, deadline=deadline, what="the node to exit")
    return time.monotonic() - started


def sigterm(node: NodeUnderTest) -> None:
    node.node.process.proc.send_signal(signal.SIGTERM)


async def test_a_drain_tells_a_websocket_client_to_reconnect_and_sends_no_socketio_disconnect(
    fresh_node: NodeUnderTest,
) -> None:
    async with aiohttp.ClientSession() as http:
        client = await RawClient.connect(http, fresh_node, fresh_node.token("viewer"))
        sigterm(fresh_node)
        await client.listen(answer_pings=True, until=time.monotonic() + 15)
    errors = client.events("error")
    assert [(e["code"], e["reconnect"]) for e in errors] == [("server_draining", "auto")], client.frames
    assert errors[0]["message"]
    frames = [data for _, data in client.frames]
    assert SIO_DISCONNECT not in frames, f"a drain must not send the Socket.IO DISCONNECT: {frames}"
    assert EIO_CLOSE not in frames, f"nor Engine.IO's CLOSE, which python-engineio takes as final: {frames}"
    assert client.closed_at is not None, "the node left the WebSocket open"
    await node_exited(fresh_node, deadline=15)


async def test_a_drain_answers_a_held_long_poll_with_the_error_and_then_ends_the_session(
    fresh_node: NodeUnderTest,
) -> None:
    async with aiohttp.ClientSession() as http:
        client = RawPollingClient(http, fresh_node)
        await client.connect(fresh_node.token("viewer"))
        held = asyncio.create_task(client.poll())
        # No observable sign that the GET is held yet: give it time to reach the node. A GET that
        # came after the close would be answered 400 (the socket is gone), and the test would fail.
        await asyncio.sleep(0.5)
        sigterm(fresh_node)
        assert await asyncio.wait_for(held, 15) == 200
        # The session is over: a GET is refused (at most one more may first be answered empty, if
        # it was held as the session closed), which every client takes as a transport error and
        # reconnects from (an Engine.IO CLOSE packet would stop python-engineio's).
        statuses = [await client.poll() for _ in range(2)]
        assert 400 in statuses, statuses
    errors = client.events("error")
    assert [(e["code"], e["reconnect"]) for e in errors] == [("server_draining", "auto")], client.packets
    assert SIO_DISCONNECT not in client.packets, client.packets
    assert EIO_CLOSE not in client.packets, client.packets
    await node_exited(fresh_node, deadline=15)


@pytest.mark.parametrize("transport", ["polling", "websocket"])
async def test_a_node_whose_clients_have_left_stops_long_before_its_grace(
    fresh_node: NodeUnderTest, transport: str
) -> None:
    """The shutdown grace is 20 s here. Once its clients have left (socket.io's own close), the
    node has nothing to wait for: a held long-poll GET of a departed client used to keep it for
    the whole grace."""
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(fresh_node.url, auth={"token": fresh_node.token("operator")}, transports=[transport])
    session = await sio.call("start_test_session", {"name": "leaving"}, timeout=10)
    assert session["ok"], session
    await sio.disconnect()
    async with aiohttp.ClientSession() as http:
        await settles_at(lambda: connected_clients(http, fresh_node), 0, "connected clients after leaving")
    sigterm(fresh_node)
    took = await node_exited(fresh_node, deadline=15)
    assert took < 10, f"stopping took {took:.1f}s with no client left"


async def test_an_expired_token_ends_with_refresh_advice_and_a_socketio_disconnect(logs_dir: Path) -> None:
    env = {"TESTPULSE_NODE_ID": "expiry", "TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS": "0"}
    async with node_with("sqlite", env, logs_dir) as node, aiohttp.ClientSession() as http:
        client = await RawClient.connect(http, node, node.token("viewer", ttl=1.5))
        await client.listen(answer_pings=True, until=time.monotonic() + 10)
    errors = client.events("error")
    assert [(e["code"], e["reconnect"]) for e in errors] == [("auth_expired", "refresh")], client.frames
    frames = [data for _, data in client.frames]
    assert SIO_DISCONNECT in frames, f"an expiry must send the Socket.IO DISCONNECT: {frames}"
    assert frames.index(SIO_DISCONNECT) > next(i for i, f in enumerate(frames) if f.startswith('42["error"'))


async def test_a_websocket_peer_that_stops_reading_is_aborted_after_the_write_timeout(logs_dir: Path) -> None:
    """A peer with a zero TCP window: the node's writes wait on flow control. After
    TESTPULSE_WRITE_TIMEOUT_SECONDS the node aborts the connection (a reset), freeing its socket,
    queue and buffers; before, they were held for as long as the peer stayed."""
    env = {
        "TESTPULSE_NODE_ID": "write-timeout",
        "TESTPULSE_WRITE_TIMEOUT_SECONDS": "1",
        "TESTPULSE_RATE_LIMIT_PER_SECOND": "5000",
        "TESTPULSE_RATE_LIMIT_BURST": "5000",
    }
    async with node_with("sqlite", env, logs_dir) as node:
        operator = socketio.AsyncClient(reconnection=False)
        await operator.connect(node.url, auth={"token": node.token("admin")}, transports=["websocket"])
        started = await operator.call("start_test_session", {"name": "stuck-reader"}, timeout=10)
        session_id = started["session"]["id"]
        stuck = await _stuck_websocket(node, session_id)
        try:
            bulky = {"blob": "x" * 15_000}
            for i in range(40):
                batch = [detection(i * 25 + j, attributes=bulky) for j in range(25)]
                ack = await operator.call("publish_detections", {"session_id": session_id, "detections": batch})
                assert ack["ok"], ack

            async def aborted() -> bool:
                return _tcp_state(stuck) == TCP_CLOSE  # a reset; an orderly close would leave CLOSE_WAIT

            await wait_until(aborted, deadline=20, what="the node to abort the WebSocket of a peer that does not read")
        finally:
            stuck.close()
            await operator.disconnect()


TCP_CLOSE = 7  # include/net/tcp_states.h


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]  # struct tcp_info starts with tcpi_state


async def _stuck_websocket(node: NodeUnderTest, session_id: str) -> socket.socket:
    """A WebSocket client with a tiny receive buffer that joins `session_id` and then never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", node.node.port))
    request = (
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    await _read_until(sock, b"0{")  # the 101 response and Engine.IO's OPEN packet
    await loop.sock_sendall(sock, _masked_text("40" + json.dumps({"token": node.token("viewer")})))
    await _read_until(sock, b"40{")  # Socket.IO's CONNECT answer
    await loop.sock_sendall(sock, _masked_text('420["join_session",' + json.dumps({"session_id": session_id}) + "]"))
    return sock


async def _read_until(sock: socket.socket, marker: bytes) -> None:
    loop = asyncio.get_running_loop()
    received = b""
    while marker not in received:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert chunk, f"closed before {marker!r}: {received!r}"
        received += chunk


def _masked_text(text: str) -> bytes:
    """One client-to-server WebSocket text frame (clients must mask; a zero mask keeps it simple)."""
    payload = text.encode()
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + b"\0\0\0\0" + payload


async def test_a_viewer_that_stops_reading_does_not_hold_back_the_sessions_publishers(logs_dir: Path) -> None:
    """Backpressure holds a publisher while its node's viewers are far behind. A viewer that has
    stopped reading altogether must not hold it for as long as its connection lasts: it is dropped
    as a slow consumer once a publisher has waited its patience, and publishing goes on."""
    env = {
        "TESTPULSE_NODE_ID": "stalled-viewer",
        "TESTPULSE_CLIENT_QUEUE_MAX": "400",
        "TESTPULSE_WRITE_TIMEOUT_SECONDS": "300",  # the write deadline is not what frees it here
        "TESTPULSE_RATE_LIMIT_PER_SECOND": "5000",
        "TESTPULSE_RATE_LIMIT_BURST": "5000",
    }
    async with node_with("sqlite", env, logs_dir) as node:
        operator = socketio.AsyncClient(reconnection=False)
        await operator.connect(node.url, auth={"token": node.token("admin")}, transports=["websocket"])
        try:
            started = await operator.call("start_test_session", {"name": "stalled-viewer"}, timeout=10)
            session_id = started["session"]["id"]
            stuck = await _stuck_websocket(node, session_id)
            bulky = {"blob": "x" * 15_000}
            acked, refused = 0, []
            give_up = time.monotonic() + 60
            while acked < 3000:
                assert time.monotonic() < give_up, f"{acked} acked; refusals {refused[-3:]} ({len(refused)})"
                batch = [detection(acked + j, attributes=bulky) for j in range(25)]
                ack = await operator.call("publish_detections", {"session_id": session_id, "detections": batch})
                if ack["ok"]:
                    acked += 25
                else:
                    refused.append(ack["error"]["code"])
            # One publish waits out its patience and is refused; the stalled viewer goes with it.
            # (Before, every publish of the session waited 2 s and was refused, over and over.)
            assert set(refused) <= {"rate_limited"} and len(refused) <= 3, refused
            async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as resp:
                text = await resp.text()
            dropped = [
                line for line in text.splitlines() if line.startswith("testpulse_slow_consumer_disconnects_total")
            ]
            assert dropped and float(dropped[0].rpartition(" ")[2]) >= 1, dropped
            stuck.close()
        finally:
            await operator.disconnect()
