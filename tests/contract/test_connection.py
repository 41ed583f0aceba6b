"""On connect: the `connection_status` event, over every transport and database backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import socketio
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.contract


async def test_connection_status_is_sent_on_connect_with_the_contracts_fields(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    client = await connect(node, "viewer", transport=transport)
    status = await client.wait_for_event("connection_status")
    assert set(status) >= {"status", "sid", "node", "server_time", "protocol", "token_expires_at"}
    assert status["status"] == "connected"
    assert status["sid"] == client.sio.get_sid("/")
    assert status["node"] == node.settings.node_id
    assert status["protocol"] == 2  # PROTOCOL.md 1.1 is in whole
    server_time = datetime.fromisoformat(status["server_time"].replace("Z", "+00:00"))
    assert server_time.tzinfo is not None
    assert abs(datetime.now(UTC) - server_time) < timedelta(seconds=30)


async def test_connection_status_is_the_first_event_and_sent_once(node: NodeUnderTest, connect: Connect) -> None:
    client = await connect(node, "operator")
    await client.wait_for_event("connection_status")
    session = await client.start_session()
    await client.ok("pause_test_session", {"session_id": session["id"]})
    await client.wait_for(lambda: client.updates(session["id"]), what="the pause update")
    assert client.events[0][0] == "connection_status"
    assert len(client.received("connection_status")) == 1


async def test_upgrade_transport_ends_on_websocket(node: NodeUnderTest, connect: Connect) -> None:
    client = await connect(node, "viewer", transport="upgrade")
    await client.wait_for(lambda: client.sio.transport() == "websocket", what="upgrade to websocket")


async def test_connection_without_token_is_refused_with_auth_missing(node: NodeUnderTest, connect: Connect) -> None:
    from support.client import Client

    client = Client("anonymous")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(node.url, transport="websocket")
    assert client.connect_errors and client.connect_errors[0]["code"] == "auth_missing"
    await client.disconnect()
