"""A SIGTERM'd node with 1,000 clients, long-polling ones included, drains within its grace: every
client is told to reconnect by itself (no Socket.IO DISCONNECT), and every detection it acked is
stored. Before the drain stopped waiting on clients, one long-polling client between polls held it
for the whole grace, and the queued appends and the outbox were abandoned at exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.client import detection
from support.nodes import NodeUnderTest, node_with
from support.processes import wait_until

pytestmark = pytest.mark.faults

WEBSOCKET_CLIENTS = 600
POLLING_CLIENTS = 400
CONNECTING_AT_ONCE = 50
GRACE_SECONDS = 10.0
EXIT_SLACK_SECONDS = 3.0  # process start-up of the shutdown path and interpreter exit, not drain work
PUBLISH_WINDOW = 50

SIO_DISCONNECT = "41"
EIO_CLOSE = "1"
RECORD_SEP = "\x1e"


class Wire:
    """What one raw Engine.IO client saw: every packet, and how its transport ended."""

    def __init__(self) -> None:
        self.packets: list[str] = []
        self.ended: str | None = None  # why the transport ended: ws_closed, eio_close, http_<status>, an error
        self.done = asyncio.Event()

    def end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        self.done.set()

    def errors(self) -> list[dict[str, Any]]:
        found = []
        for data in self.packets:
            if data.startswith('42["error",'):
                found.append(json.loads(data[2:])[1])
        return found


class WebSocketClient(Wire):
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        super().__init__()
        self.ws = ws

    @classmethod
    async def join(cls, http: aiohttp.ClientSession, url: str, token: str, session_id: str) -> WebSocketClient:
        ws = await http.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket")
        client = cls(ws)
        assert (await ws.receive_str(timeout=15)).startswith("0{")
        await ws.send_str("40" + json.dumps({"token": token}))
        await client._receive_until("40{")
        await ws.send_str("420" + json.dumps(["join_session", {"session_id": session_id}]))
        answer = await client._receive_until("430")
        assert json.loads(answer[3:])[0]["ok"], answer
        return client

    async def _receive_until(self, prefix: str) -> str:
        while True:
            data = await self.ws.receive_str(timeout=15)
            if data == "2":
                await self.ws.send_str("3")
            elif data.startswith(prefix):
                return data

    async def listen(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                self.packets.append(msg.data)
                if msg.data == "2":
                    await self.ws.send_str("3")
        except (aiohttp.ClientError, OSError) as exc:
            self.end(type(exc).__name__)
        finally:
            self.end("ws_closed")
            await self.ws.close()


class PollingClient(Wire):
    """Long-polling that always holds a GET, as socket.io-client does."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        super().__init__()
        self.http = http
        self.base = f"{url}/socket.io/?EIO=4&transport=polling"
        self.sid = ""

    @classmethod
    async def join(cls, http: aiohttp.ClientSession, url: str, token: str, session_id: str) -> PollingClient:
        client = cls(http, url)
        async with http.get(client.base) as resp:
            opened = await resp.text()
        assert opened.startswith("0{"), opened
        client.sid = json.loads(opened[1:])["sid"]
        await client._post("40" + json.dumps({"token": token}))
        await client._poll_until("40{")
        await client._post("420" + json.dumps(["join_session", {"session_id": session_id}]))
        answer = await client._poll_until("430")
        assert json.loads(answer[3:])[0]["ok"], answer
        client.packets.clear()
        return client

    async def _post(self, payload: str) -> None:
        async with self.http.post(f"{self.base}&sid={self.sid}", data=payload) as resp:
            assert resp.status == 200, (resp.status, await resp.text())

    async def _poll(self) -> tuple[int, list[str]]:
        async with self.http.get(f"{self.base}&sid={self.sid}", timeout=aiohttp.ClientTimeout(total=60)) as resp:
            body = await resp.text()
        packets = body.split(RECORD_SEP) if resp.status == 200 and body else []
        self.packets += packets
        if "2" in packets:
            await self._post("3")
        return resp.status, packets

    async def _poll_until(self, prefix: str) -> str:
        while True:
            status, packets = await self._poll()
            assert status == 200, status
            for data in packets:
                if data.startswith(prefix):
                    return data

    async def listen(self) -> None:
        try:
            while True:
                status, packets = await self._poll()
                if status != 200:
                    self.end(f"http_{status}")
                    return
                if EIO_CLOSE in packets:
                    self.end("eio_close")
                    return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.end(type(exc).__name__)


class Detector(WebSocketClient):
    """Publishes with up to PUBLISH_WINDOW unanswered until its connection ends; keeps the acked seqs."""

    acked: list[int]
    refused: Counter[str]

    async def publish_until_closed(self, session_id: str) -> None:
        self.acked, self.refused = [], Counter()
        window = asyncio.Semaphore(PUBLISH_WINDOW)
        pending: dict[int, asyncio.Future[Any]] = {}

        async def read() -> None:
            try:
                while True:
                    msg = await self.ws.receive()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        return
                    self.packets.append(msg.data)
                    if msg.data == "2":
                        await self.ws.send_str("3")
                    elif msg.data.startswith("43"):
                        bracket = msg.data.index("[")
                        future = pending.pop(int(msg.data[2:bracket]), None)
                        if future is not None:
                            future.set_result(json.loads(msg.data[bracket:])[0])
            except (aiohttp.ClientError, OSError):
                return
            finally:
                self.end("ws_closed")
                for future in pending.values():  # never to be answered: frees the window
                    future.cancel()

        async def answered(future: asyncio.Future[Any]) -> None:
            try:
                answer = await future
            except asyncio.CancelledError:
                return
            finally:
                window.release()
            if answer.get("ok"):
                self.acked.append(answer["seq"])
            else:
                self.refused[answer["error"]["code"]] += 1

        reader = asyncio.create_task(read())
        waiting: set[asyncio.Task[None]] = set()
        ack_id = 0
        with contextlib.suppress(aiohttp.ClientError, OSError, ConnectionResetError):
            while not self.done.is_set():
                await window.acquire()
                if self.done.is_set():
                    break
                ack_id += 1
                pending[ack_id] = asyncio.get_running_loop().create_future()
                task = asyncio.create_task(answered(pending[ack_id]))
                waiting.add(task)
                task.add_done_callback(waiting.discard)
                body = {"session_id": session_id, **detection(ack_id)}
                await self.ws.send_str(f"42{ack_id}" + json.dumps(["publish_detection", body]))
        await reader
        for task in waiting:  # publishes the node never answered: unknowable to the sender
            task.cancel()


@pytest.fixture
async def node(logs_dir: Path) -> AsyncIterator[NodeUnderTest]:
    env = {
        "TESTPULSE_NODE_ID": "drain-1000",
        "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": str(GRACE_SECONDS),
        # One test process is every client's address, and the detector publishes flat out.
        "TESTPULSE_CONNECT_RATE_PER_SECOND": "100000",
        "TESTPULSE_CONNECT_RATE_BURST": "100000",
        "TESTPULSE_RATE_LIMIT_PER_SECOND": "100000",
        "TESTPULSE_RATE_LIMIT_BURST": "100000",
    }
    async with node_with("sqlite", env, logs_dir) as running:
        yield running


async def test_a_node_with_1000_clients_drains_within_its_grace_and_stores_every_acked_detection(
    node: NodeUnderTest,
) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(
            f"{node.url}/api/sessions", json={"name": "drain-1000"}, headers=node.headers("operator")
        ) as resp:
            assert resp.status == 201, await resp.text()
            session_id = (await resp.json())["session"]["id"]
        async with http.post(f"{node.url}/api/sessions/{session_id}/start", headers=node.headers("operator")) as resp:
            assert resp.status == 200, await resp.text()

        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
        token = node.token("viewer")

        async def viewer(kind: type[WebSocketClient] | type[PollingClient]) -> Wire:
            async with gate:
                return await kind.join(http, node.url, token, session_id)

        clients: list[Wire] = list(
            await asyncio.gather(
                *(viewer(WebSocketClient) for _ in range(WEBSOCKET_CLIENTS)),
                *(viewer(PollingClient) for _ in range(POLLING_CLIENTS)),
            )
        )
        listeners = [asyncio.create_task(c.listen()) for c in clients]  # type: ignore[attr-defined]
        detector = await Detector.join(http, node.url, node.token("detector"), session_id)
        publishing = asyncio.create_task(detector.publish_until_closed(session_id))
        await wait_until(lambda: _acked_at_least(detector, 200), deadline=30, what="the detector's first acks")

        node.node.process.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        async def exited() -> bool:
            return not node.node.process.running

        await wait_until(exited, deadline=GRACE_SECONDS + EXIT_SLACK_SECONDS, what="the node to exit within its grace")
        took = time.monotonic() - signalled
        await asyncio.wait([*listeners, publishing], timeout=30)
        unfinished = [c for c in [*clients, detector] if not c.done.is_set()]
        assert not unfinished, f"{len(unfinished)} transports still open after the node exited"

    ended = Counter(c.ended for c in clients)
    advice = Counter((e.get("code"), e.get("reconnect")) for c in clients for e in c.errors())
    sent_disconnect = [c for c in clients if SIO_DISCONNECT in c.packets]
    summary = f"stopped after {took:.1f}s; transports ended {dict(ended)}; errors {dict(advice)}"
    assert not sent_disconnect, f"{len(sent_disconnect)} clients got a Socket.IO DISCONNECT: {summary}"
    assert set(advice) == {("server_draining", "auto")}, summary
    # A WebSocket client gets the error, then the close. A long-polling client gets the error in
    # the GET it holds, or, between polls, in its next one (the node holds the session for it
    # briefly, its backlog discarded: the rejoin replays it); then its session is gone (an empty
    # answer or a 400, or the port closed), which every client reconnects from.
    websockets, polling = clients[:WEBSOCKET_CLIENTS], clients[WEBSOCKET_CLIENTS:]
    assert all(c.errors() and c.ended == "ws_closed" for c in websockets), summary
    missed = [c.ended for c in polling if not c.errors()]
    assert not missed, f"{len(missed)} polling clients never got the error ({Counter(missed)}): {summary}"

    drained = re.search(r"drained in ([\d.]+)s: (\d+) clients sent elsewhere", node.node.log_path.read_text())
    assert drained is not None, node.node.log_tail()
    assert int(drained.group(2)) == len(clients) + 1, drained.group(0)  # the viewers and the detector
    assert float(drained.group(1)) < GRACE_SECONDS, drained.group(0)  # it did not wait for a client

    assert node.sqlite_path is not None
    with contextlib.closing(sqlite3.connect(node.sqlite_path)) as db:
        stored = [
            row[0] for row in db.execute("SELECT seq FROM detections WHERE session_id = ? ORDER BY seq", (session_id,))
        ]
    assert detector.acked, detector.refused
    missing = sorted(set(detector.acked) - set(stored))
    assert not missing, f"{len(missing)} acked detections not stored, e.g. {missing[:10]}"
    assert stored == list(range(1, len(stored) + 1)), "stored seqs are not consecutive"


async def _acked_at_least(detector: Detector, count: int) -> bool:
    return len(getattr(detector, "acked", ())) >= count


async def test_a_drain_sees_that_websocket_clients_which_read_took_everything(node: NodeUnderTest) -> None:
    """Clients that read everything leave nothing unsent, so the drain does not spend its flush
    budget waiting on them. The writer used to leave its end-of-stream mark counted as unsent
    work, so every WebSocket client counted as `with packets still unsent` and the drain always
    waited out the budget."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{node.url}/api/sessions", json={"name": "flushed"}, headers=node.headers()) as resp:
            session_id = (await resp.json())["session"]["id"]
        async with http.post(f"{node.url}/api/sessions/{session_id}/start", headers=node.headers()) as resp:
            assert resp.status == 200, await resp.text()
        clients = [await WebSocketClient.join(http, node.url, node.token("viewer"), session_id) for _ in range(20)]
        listeners = [asyncio.create_task(c.listen()) for c in clients]
        node.node.process.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*listeners), 30)
    assert all(c.errors() for c in clients)

    async def drained() -> bool:
        return "drained in" in node.node.log_path.read_text()

    await wait_until(drained, deadline=GRACE_SECONDS + EXIT_SLACK_SECONDS, what="the drain's log line")
    line = re.search(r"drained in .*", node.node.log_path.read_text())
    assert line is not None and "(0 with packets still unsent)" in line.group(0), line
