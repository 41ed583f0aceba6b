"""Hostile payloads from authenticated clients: wrong types, unknown events, oversized messages, floods.

None of them may crash the node, disturb another client, or lose stored data.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.security

EVENTS = [
    "join_session",
    "leave_session",
    "start_test_session",
    "pause_test_session",
    "resume_test_session",
    "stop_test_session",
    "publish_detection",
    "publish_detections",
]

NOT_AN_OBJECT = {
    "list": [1, "two", None],
    "empty-list": [],
    "string": "session-1",
    "number": 42,
    "float": 1.5,
    "bool": True,
    "bytes": b"\x00\xffbinary",
}

NESTED_JUNK = {
    "session_id": {"$ne": None},
    "last_seq": {"n": [1]},
    "name": ["a", {"b": []}],
    "config": [[[[]]]],
    "reason": {"why": None},
    "label": {"text": "car"},
    "confidence": [0.5],
    "bbox": {"x": 1},
    "frame": "7",
    "ts": {"ms": 1},
    "attributes": "k=v",
    "detections": {"0": {"label": "a"}},
}


async def assert_node_unharmed(node: NodeUnderTest, bystander: Client, session_id: str, seqs: int) -> None:
    """The bystander still gets acks and its stored detections are all there."""
    assert await bystander.ok("leave_session", {"session_id": "probe"}) == {"ok": True}
    async with httpx.AsyncClient(base_url=node.url) as http:
        assert (await http.get("/health")).status_code == 200
        events = await http.get(
            f"/api/sessions/{session_id}/events", params={"limit": 1000}, headers=node.headers("viewer")
        )
    assert [e["seq"] for e in events.json()["events"]] == list(range(1, seqs + 1))


@pytest.fixture
async def bystander(secure_node: NodeUnderTest, connect: Connect) -> tuple[Client, str]:
    """An admin with a running session holding three detections, watching it."""
    client = await connect(secure_node, "admin", name="bystander")
    session_id = str((await client.start_session())["id"])
    await client.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(3)]})
    return client, session_id


@pytest.mark.parametrize("payload", list(NOT_AN_OBJECT.values()), ids=list(NOT_AN_OBJECT))
@pytest.mark.parametrize("event", EVENTS)
async def test_payload_that_is_not_an_object_gets_bad_request(
    secure_node: NodeUnderTest, connect: Connect, event: str, payload: Any
) -> None:
    client = await connect(secure_node, "admin")
    error = await client.refused(event, payload)
    assert error["code"] == "bad_request"
    assert error["message"].startswith("payload:"), error


@pytest.mark.parametrize("event", [e for e in EVENTS if e != "start_test_session"])
async def test_null_or_missing_payload_gets_bad_request(
    secure_node: NodeUnderTest, connect: Connect, event: str
) -> None:
    client = await connect(secure_node, "admin")
    assert (await client.refused(event, (None,)))["code"] == "bad_request"
    assert (await client.refused(event))["code"] == "bad_request"


@pytest.mark.parametrize("event", EVENTS)
async def test_nested_junk_in_every_field_gets_bad_request(
    secure_node: NodeUnderTest, connect: Connect, event: str, bystander: tuple[Client, str]
) -> None:
    client = await connect(secure_node, "admin")
    error = await client.refused(event, NESTED_JUNK)
    assert error["code"] == "bad_request"
    field = error["message"].split(":")[0]
    assert field.split("[")[0] in NESTED_JUNK, error
    await assert_node_unharmed(secure_node, *bystander, seqs=3)


@pytest.mark.parametrize("event", ["publish_detection", "join_session", "stop_test_session"])
async def test_extra_arguments_are_ignored_and_junk_first_arguments_refused(
    secure_node: NodeUnderTest, connect: Connect, event: str, bystander: tuple[Client, str]
) -> None:
    client = await connect(secure_node, "admin")
    error = await client.refused(event, ("junk", {"session_id": bystander[1]}, [1, 2]))
    assert error["code"] == "bad_request"
    await assert_node_unharmed(secure_node, *bystander, seqs=3)


@pytest.mark.parametrize(
    "name", ["no_such_event", "JOIN_SESSION", "join_session ", "connection_status", "error", "x" * 500]
)
async def test_unknown_event_gets_bad_request(secure_node: NodeUnderTest, connect: Connect, name: str) -> None:
    client = await connect(secure_node, "viewer")
    error = await client.refused(name, {"session_id": "s"})
    assert error["code"] == "bad_request"
    await client.emit(name, {"session_id": "s"})
    event = await client.wait_for_event("error")
    assert event["code"] == "bad_request" and "event" in event


async def test_unstorable_text_is_refused_without_spoiling_other_publishers_commits(
    secure_node: NodeUnderTest, connect: Connect, bystander: tuple[Client, str]
) -> None:
    admin, session_id = bystander
    hostile = await connect(secure_node, "detector")

    async def good(i: int) -> int:
        return int((await admin.ok("publish_detection", {"session_id": session_id, **detection(i)}))["seq"])

    async def bad(label: str) -> dict[str, Any]:
        return await hostile.refused("publish_detection", {"session_id": session_id, "label": label, "confidence": 0})

    results = await asyncio.gather(*(good(i) for i in range(10)), bad("nul\x00byte"), bad("\ud800"))
    assert sorted(results[:10]) == list(range(4, 14))
    for refusal in results[10:]:
        assert refusal["code"] == "bad_request" and refusal["message"].startswith("label:"), refusal
    await assert_node_unharmed(secure_node, admin, session_id, seqs=13)


# ---- oversized messages ------------------------------------------------------------------------


@pytest.mark.parametrize("overshoot", [1024, 1_048_576], ids=["just-over", "1MiB-over"])
async def test_oversized_websocket_message_closes_only_that_connection(
    secure_node: NodeUnderTest, connect: Connect, bystander: tuple[Client, str], overshoot: int
) -> None:
    admin, session_id = bystander
    viewer = await connect(secure_node, "viewer", name="watcher")
    await viewer.join(session_id)
    attacker = await connect(secure_node, "admin", name="attacker")
    limit = secure_node.settings.max_payload_bytes
    await attacker.emit("publish_detection", {"session_id": session_id, "label": "x" * (limit + overshoot)})
    await attacker.wait_disconnected(deadline=10)
    await assert_node_unharmed(secure_node, admin, session_id, seqs=3)
    assert await admin.publish(session_id, 3) == 4
    assert await viewer.wait_for_seqs(session_id, 1) == [4]
    assert viewer.connected


async def test_message_just_under_the_limit_is_handled_normally(
    secure_node: NodeUnderTest, connect: Connect, bystander: tuple[Client, str]
) -> None:
    _, session_id = bystander
    client = await connect(secure_node, "admin")
    limit = secure_node.settings.max_payload_bytes
    error = await client.refused("publish_detection", {"session_id": session_id, "label": "x" * (limit - 200)})
    assert error["code"] == "bad_request" and error["message"].startswith("label:")
    assert client.connected


async def test_oversized_polling_message_is_refused_and_stores_nothing(
    secure_node: NodeUnderTest, connect: Connect, bystander: tuple[Client, str]
) -> None:
    admin, session_id = bystander
    attacker = await connect(secure_node, "admin", transport="polling", name="attacker")
    limit = secure_node.settings.max_payload_bytes
    await attacker.emit(
        "publish_detections",
        {"session_id": session_id, "detections": [{"label": "x" * 100, "confidence": 0.5}] * (limit // 100)},
    )
    await attacker.wait_disconnected(deadline=10)
    await assert_node_unharmed(secure_node, admin, session_id, seqs=3)


# ---- floods ------------------------------------------------------------------------------------


async def test_flood_is_rate_limited_while_another_client_is_unaffected(
    secure_node: NodeUnderTest, connect: Connect, bystander: tuple[Client, str]
) -> None:
    admin, session_id = bystander
    flooder = await connect(secure_node, "detector", name="flooder")
    calm = await connect(secure_node, "viewer", name="calm")

    async def flood() -> list[Any]:
        payload = {"session_id": session_id, **detection()}
        return list(await asyncio.gather(*(flooder.call("publish_detection", payload) for _ in range(400))))

    async def steady() -> list[Any]:
        return [await calm.call("join_session", {"session_id": session_id}) for _ in range(30)]

    started = time.monotonic()
    flood_acks, calm_acks = await asyncio.gather(flood(), steady())
    elapsed = time.monotonic() - started
    outcomes = [a["error"]["code"] if not a["ok"] else "ok" for a in flood_acks]
    assert set(outcomes) == {"ok", "rate_limited"}, set(outcomes)
    burst, rate = secure_node.settings.rate_limit_burst, secure_node.settings.rate_limit_per_second
    assert outcomes.count("ok") <= burst + rate * elapsed + 1, "more passed than the bucket allows"
    assert all(a["ok"] for a in calm_acks), [a for a in calm_acks if not a["ok"]][:3]
    accepted = outcomes.count("ok")
    await assert_node_unharmed(secure_node, admin, session_id, seqs=3 + accepted)


async def test_flood_without_acks_reports_rate_limited_as_error_events(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    flooder = await connect(secure_node, "viewer", name="flooder")
    for _ in range(300):
        await flooder.emit("leave_session", {"session_id": "s"})
    error = await flooder.wait_for_event("error", lambda e: e["code"] == "rate_limited")
    assert error["event"] == "leave_session"
    assert flooder.connected
