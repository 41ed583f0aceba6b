"""Engine.IO heartbeat and close, on a node with a 1 s PING interval and a 1 s PING timeout.

The node sends PINGs from one task per node and reads WebSockets without a per-packet timer
(server/transport/lean.py): these tests prove that live clients stay, mute ones go, and that a
WebSocket closed by the server ends even when the peer ignores the CLOSE packet."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from support.nodes import Connect, NodeUnderTest, node_with
from support.rawclient import RawClient, connected_clients, settles_at

pytestmark = pytest.mark.contract

HEARTBEAT_ENV = {
    "TESTPULSE_NODE_ID": "heartbeat",
    "TESTPULSE_PING_INTERVAL_SECONDS": "1",
    "TESTPULSE_PING_TIMEOUT_SECONDS": "1",
    "TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS": "0",
}


@pytest.fixture(scope="module")
async def beat_node(logs_dir: Path) -> AsyncIterator[NodeUnderTest]:
    async with node_with("sqlite", HEARTBEAT_ENV, logs_dir) as running:
        yield running


async def test_a_client_that_answers_pings_stays_connected_over_many_intervals(
    beat_node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    client = await connect(beat_node, "operator", transport=transport)
    await asyncio.sleep(4.5)  # four and a half PING cycles, each with a 1 s deadline for the PONG
    assert client.connected, client.summary()
    session = await client.start_session()
    assert session["status"] == "running"


async def test_the_node_pings_on_schedule_and_drops_a_client_that_stops_answering(beat_node: NodeUnderTest) -> None:
    async with aiohttp.ClientSession() as http:
        before = await connected_clients(http, beat_node)
        client = await RawClient.connect(http, beat_node, beat_node.token("viewer"))
        await client.listen(answer_pings=True, until=time.monotonic() + 3.5)
        pings = client.pings()
        assert len(pings) >= 2, client.frames  # one per second, sent in one-second slots
        assert all(0.3 <= b - a <= 3.0 for a, b in itertools.pairwise(pings)), pings
        assert client.closed_at is None

        went_mute = time.monotonic()
        await client.listen(answer_pings=False, until=went_mute + 10)
        # The unanswered PING is at most ~1 s away and its deadline 1 s later, when the node's
        # Pinger closes the socket: well inside 10 s.
        assert client.closed_at is not None, "the node kept a client that stopped answering PINGs"
        await settles_at(lambda: connected_clients(http, beat_node), before, "connected clients after the mute one")


async def test_a_server_side_close_ends_the_websocket_even_if_the_peer_ignores_it(beat_node: NodeUnderTest) -> None:
    async with aiohttp.ClientSession() as http:
        before = await connected_clients(http, beat_node)
        client = await RawClient.connect(http, beat_node, beat_node.token("viewer", ttl=2.0))
        # The token expires after 2 s: the node sends `error` (auth_expired) and a Socket.IO
        # DISCONNECT, then closes. The client answers PINGs but never closes its side.
        await client.listen(answer_pings=True, until=time.monotonic() + 15)
        assert [e["code"] for e in client.events("error")] == ["auth_expired"], client.frames
        assert client.closed_at is not None, "the node left a closed session's WebSocket open"
        await settles_at(lambda: connected_clients(http, beat_node), before, "connected clients after the expiry")


async def test_a_long_polling_client_that_stops_polling_is_dropped_at_its_ping_deadline(
    beat_node: NodeUnderTest,
) -> None:
    url = f"{beat_node.url}/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as http:
        before = await connected_clients(http, beat_node)
        async with http.get(url) as resp:
            opened = await resp.text()
        sid = orjson.loads(opened[1:])["sid"]
        connect = "40" + orjson.dumps({"token": beat_node.token("viewer")}).decode()
        async with http.post(f"{url}&sid={sid}", data=connect) as resp:
            assert resp.status == 200
        async with http.get(f"{url}&sid={sid}") as resp:
            assert (await resp.text()).startswith("40"), "the Socket.IO CONNECT was not accepted"
        await settles_at(lambda: connected_clients(http, beat_node), before + 1, "connected clients with the poller")
        # It polls no more: its PING stays queued, unanswered, and the node ends the session at
        # the PING's deadline (1 s interval + 1 s timeout here).
        await settles_at(lambda: connected_clients(http, beat_node), before, "connected clients after it went quiet")
        async with http.get(f"{url}&sid={sid}") as resp:
            assert resp.status == 400, "the session of a client that stopped polling is still open"
