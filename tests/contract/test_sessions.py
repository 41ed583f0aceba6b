"""Session control over Socket.IO: acks, the state machine on the wire, room updates, errors and the audit trail."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import httpx
import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.contract

SESSION_FIELDS = {"id", "name", "status", "created_at", "updated_at", "last_seq", "config"}
UPDATE_FIELDS = {"session_id", "status", "previous_status", "updated_at", "actor"}


def assert_session(session: dict[str, Any], **expected: Any) -> None:
    assert set(session) == SESSION_FIELDS
    assert isinstance(session["id"], str) and 1 <= len(session["id"]) <= 64
    for stamp in ("created_at", "updated_at"):
        assert datetime.fromisoformat(session[stamp].replace("Z", "+00:00")).tzinfo is not None
    for key, value in expected.items():
        assert session[key] == value, (key, session)


async def session_in(node: NodeUnderTest, client: Client, status: str) -> str:
    """A fresh session brought to `status` through the wire; the client is in its room."""
    if status == "created":
        session_id = await created_session(node)
        await client.join(session_id)
        return session_id
    session_id = str((await client.start_session())["id"])
    if status in ("paused", "stopped"):
        await client.ok("pause_test_session", {"session_id": session_id})
    if status == "stopped":
        await client.ok("stop_test_session", {"session_id": session_id})
    return session_id


async def created_session(node: NodeUnderTest, name: str = "made over http") -> str:
    """A session in `created`, which only HTTP makes (start_test_session also starts what it creates)."""
    async with httpx.AsyncClient(base_url=node.url) as http:
        response = await http.post("/api/sessions", headers=node.headers("operator"), json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["session"]["id"])


# ---- start -------------------------------------------------------------------------------------


async def test_start_without_id_creates_and_starts_a_session(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    ack = await operator.ok("start_test_session", {"name": "nightly", "config": {"fps": 30, "tags": ["a"]}})
    assert set(ack) == {"ok", "session"}
    assert_session(ack["session"], name="nightly", status="running", last_seq=0, config={"fps": 30, "tags": ["a"]})


async def test_start_with_no_payload_at_all_creates_and_starts_a_session(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    ack = await operator.ok("start_test_session")
    assert_session(ack["session"], name="", status="running", config={})


async def test_start_without_id_joins_the_caller_to_the_sessions_room(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    operator = await connect(node, "operator", transport=transport)
    detector = await connect(node, "detector")
    session_id = (await operator.start_session())["id"]
    await operator.ok("pause_test_session", {"session_id": session_id})
    update = await operator.wait_for_event("test_session_update", lambda u: u["session_id"] == session_id)
    assert update["status"] == "paused"
    await operator.ok("resume_test_session", {"session_id": session_id})
    seq = await detector.publish(session_id, 1)
    event = await operator.wait_for_event("detection_event", lambda d: d["session_id"] == session_id)
    assert event["seq"] == seq == 1


async def test_start_with_the_id_of_a_created_session_starts_it(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    session_id = await created_session(node)
    session = await operator.start_session(session_id=session_id)
    assert_session(session, id=session_id, status="running", name="made over http")
    await operator.ok("stop_test_session", {"session_id": session_id})
    update = await operator.wait_for_event("test_session_update", lambda u: u["session_id"] == session_id)
    assert (update["previous_status"], update["status"]) == ("running", "stopped")


async def test_each_start_without_id_makes_a_distinct_session(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    ids = {(await operator.start_session())["id"] for _ in range(5)}
    assert len(ids) == 5


# ---- pause / resume / stop ---------------------------------------------------------------------


async def test_pause_resume_stop_acks_carry_the_updated_session(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    started = await operator.start_session(name="lifecycle")
    session_id = started["id"]
    previous = started
    for event, status in [
        ("pause_test_session", "paused"),
        ("resume_test_session", "running"),
        ("pause_test_session", "paused"),
        ("stop_test_session", "stopped"),
    ]:
        ack = await operator.ok(event, {"session_id": session_id})
        assert set(ack) == {"ok", "session"}
        assert_session(ack["session"], id=session_id, status=status, name="lifecycle")
        assert ack["session"]["created_at"] == started["created_at"]
        assert ack["session"]["updated_at"] >= previous["updated_at"]
        previous = ack["session"]


async def test_session_update_reaches_every_room_member_with_the_contracts_payload(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    operator = await connect(node, "operator", transport=transport)
    viewers = [await connect(node, "viewer", transport=transport) for _ in range(2)]
    detector = await connect(node, "detector", transport=transport)
    outsider = await connect(node, "viewer", transport=transport)
    session_id = (await operator.start_session())["id"]
    for member in [*viewers, detector]:
        await member.join(session_id)
    paused = (await operator.ok("pause_test_session", {"session_id": session_id}))["session"]
    await operator.ok("stop_test_session", {"session_id": session_id, "reason": "done"})
    for member in [operator, *viewers, detector]:
        await member.wait_for(lambda m=member: len(m.updates(session_id)) == 2, what="two updates")
        first, second = member.updates(session_id)
        assert set(first) == UPDATE_FIELDS
        assert first == {
            "session_id": session_id,
            "status": "paused",
            "previous_status": "running",
            "updated_at": paused["updated_at"],
            "actor": "test-operator",
        }
        assert (second["previous_status"], second["status"]) == ("paused", "stopped")
    await outsider.ok("leave_session", {"session_id": session_id})  # a round trip after the updates went out
    assert outsider.updates(session_id) == []


async def test_actor_of_an_update_is_the_tokens_subject(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator", token=node.token("operator", sub="alice@example"))
    session_id = (await operator.start_session())["id"]
    await operator.ok("pause_test_session", {"session_id": session_id})
    update = await operator.wait_for_event("test_session_update", lambda u: u["session_id"] == session_id)
    assert update["actor"] == "alice@example"


# ---- the whole transition table over the wire --------------------------------------------------

VERBS = {
    "start": "start_test_session",
    "pause": "pause_test_session",
    "resume": "resume_test_session",
    "stop": "stop_test_session",
}
# (verb, from) -> resulting status; every other pair is invalid_transition.
ALLOWED = {
    ("start", "created"): "running",
    ("pause", "running"): "paused",
    ("resume", "paused"): "running",
    ("stop", "running"): "stopped",
    ("stop", "paused"): "stopped",
}
STATUSES = ["created", "running", "paused", "stopped"]


@pytest.mark.parametrize("source", STATUSES)
@pytest.mark.parametrize("verb", list(VERBS))
async def test_transition_table_over_the_wire(node: NodeUnderTest, connect: Connect, verb: str, source: str) -> None:
    operator = await connect(node, "operator")
    session_id = await session_in(node, operator, source)
    expected = ALLOWED.get((verb, source))
    if expected is None:
        error = await operator.refused(VERBS[verb], {"session_id": session_id})
        assert error["code"] == "invalid_transition", error
        assert session_id in error["message"]
        status = (await operator.ok("join_session", {"session_id": session_id}))["session"]["status"]
        assert status == source, "a refused transition changed the session"
    else:
        ack = await operator.ok(VERBS[verb], {"session_id": session_id})
        assert ack["session"]["status"] == expected
        update = await operator.wait_for_event(
            "test_session_update", lambda u: u["session_id"] == session_id and u["status"] == expected
        )
        assert update["previous_status"] == source


async def test_stopped_session_stays_stopped(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    session_id = await session_in(node, operator, "stopped")
    for event in VERBS.values():
        assert (await operator.refused(event, {"session_id": session_id}))["code"] == "invalid_transition"


# ---- errors ------------------------------------------------------------------------------------

CONTROL_EVENTS = ["pause_test_session", "resume_test_session", "stop_test_session"]


@pytest.mark.parametrize("role", ["viewer", "detector"])
@pytest.mark.parametrize("event", ["start_test_session", *CONTROL_EVENTS])
async def test_roles_without_control_get_unauthorized(
    node: NodeUnderTest, connect: Connect, role: str, event: str
) -> None:
    operator = await connect(node, "operator")
    session_id = (await operator.start_session())["id"]
    client = await connect(node, role)
    error = await client.refused(event, {"session_id": session_id})
    assert error["code"] == "unauthorized"
    assert (await operator.ok("join_session", {"session_id": session_id}))["session"]["status"] == "running"


@pytest.mark.parametrize("event", ["start_test_session", *CONTROL_EVENTS])
async def test_admin_may_control_sessions(node: NodeUnderTest, connect: Connect, event: str) -> None:
    admin = await connect(node, "admin")
    session_id = await session_in(node, admin, "paused" if event == "resume_test_session" else "running")
    if event == "start_test_session":
        await admin.start_session()
    else:
        await admin.ok(event, {"session_id": session_id})


@pytest.mark.parametrize(
    "event", ["join_session", "start_test_session", *CONTROL_EVENTS, "publish_detection", "publish_detections"]
)
async def test_token_limited_to_other_sessions_gets_forbidden(
    node: NodeUnderTest, connect: Connect, event: str
) -> None:
    admin = await connect(node, "admin")
    session_id = (await admin.start_session())["id"]
    limited = await connect(node, "admin", token=node.token("admin", sessions=["some-other-session"]))
    payload: dict[str, Any] = {"session_id": session_id, "label": "x", "confidence": 0.5}
    payload["detections"] = [{"label": "x", "confidence": 0.5}]
    error = await limited.refused(event, payload)
    assert error["code"] == "forbidden", error


async def test_token_limited_to_a_session_may_use_it(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = (await admin.start_session())["id"]
    limited = await connect(node, "admin", token=node.token("admin", sessions=[session_id]))
    await limited.join(session_id)
    await limited.ok("pause_test_session", {"session_id": session_id})
    await limited.ok("resume_test_session", {"session_id": session_id})
    assert await limited.publish(session_id) == 1


async def test_token_limited_to_listed_sessions_may_not_create_new_ones(node: NodeUnderTest, connect: Connect) -> None:
    limited = await connect(node, "operator", token=node.token("operator", sessions=["a"]))
    assert (await limited.refused("start_test_session", {}))["code"] == "forbidden"


@pytest.mark.parametrize("event", ["join_session", "start_test_session", *CONTROL_EVENTS])
async def test_unknown_session_is_not_found(node: NodeUnderTest, connect: Connect, event: str) -> None:
    admin = await connect(node, "admin")
    error = await admin.refused(event, {"session_id": "no-such-session"})
    assert error["code"] == "not_found"
    assert "no-such-session" in error["message"]


@pytest.mark.parametrize(
    ("event", "payload", "field"),
    [
        ("join_session", {}, "session_id"),
        ("join_session", {"session_id": "x" * 65}, "session_id"),
        ("join_session", {"session_id": "s", "last_seq": -1}, "last_seq"),
        ("join_session", {"session_id": "s", "last_seq": True}, "last_seq"),
        ("leave_session", {"session_id": 5}, "session_id"),
        ("start_test_session", {"name": "n" * 201}, "name"),
        ("start_test_session", {"config": [1, 2]}, "config"),
        ("start_test_session", {"config": {"blob": "x" * 17000}}, "config"),
        ("start_test_session", {"session_id": ""}, "session_id"),
        ("pause_test_session", {"session_id": None}, "session_id"),
        ("resume_test_session", {"session_id": ["s"]}, "session_id"),
        ("stop_test_session", {"session_id": "s", "reason": "r" * 501}, "reason"),
        ("stop_test_session", {"session_id": "s", "reason": 7}, "reason"),
        # Text no database can store is refused up front (PostgreSQL used to answer `unavailable`).
        ("join_session", {"session_id": "a\x00b"}, "session_id"),
        ("pause_test_session", {"session_id": "\ud800"}, "session_id"),
        ("start_test_session", {"name": "nul\x00name"}, "name"),
        ("stop_test_session", {"session_id": "s", "reason": "\udfff"}, "reason"),
    ],
)
async def test_bad_payload_gets_bad_request_naming_the_field(
    node: NodeUnderTest, connect: Connect, event: str, payload: dict[str, Any], field: str
) -> None:
    admin = await connect(node, "admin")
    error = await admin.refused(event, payload)
    assert error["code"] == "bad_request"
    assert error["message"].startswith(f"{field}:"), error


EVERY_EVENT = [
    "join_session",
    "leave_session",
    "start_test_session",
    "pause_test_session",
    "resume_test_session",
    "stop_test_session",
    "publish_detection",
    "publish_detections",
]


@pytest.mark.parametrize("event", EVERY_EVENT)
async def test_failure_without_ack_arrives_as_an_error_event_naming_the_event(
    node: NodeUnderTest, connect: Connect, event: str
) -> None:
    admin = await connect(node, "admin")
    await admin.emit(event, {"session_id": 12345})
    error = await admin.wait_for_event("error")
    assert set(error) == {"code", "message", "event"}
    assert error == {"code": "bad_request", "message": error["message"], "event": event}
    assert error["message"].startswith("session_id:")


async def test_success_without_ack_sends_no_error_event(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator")
    session_id = (await operator.start_session())["id"]
    await operator.emit("pause_test_session", {"session_id": session_id})
    await operator.wait_for(lambda: operator.updates(session_id), what="the pause update")
    await operator.ok("resume_test_session", {"session_id": session_id})
    assert operator.errors() == []


async def test_error_event_goes_only_to_the_client_concerned(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    bystander = await connect(node, "admin")
    session_id = (await admin.start_session())["id"]
    await bystander.join(session_id)
    await admin.emit("pause_test_session", {"session_id": "no-such-session"})
    error = await admin.wait_for_event("error")
    assert (error["code"], error["event"]) == ("not_found", "pause_test_session")
    await bystander.ok("leave_session", {"session_id": session_id})
    assert bystander.errors() == []


# ---- audit -------------------------------------------------------------------------------------


async def test_every_state_change_leaves_an_audit_row(node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(node, "operator", token=node.token("operator", sub="auditor-1"))
    session_id = (await operator.start_session())["id"]
    await operator.ok("pause_test_session", {"session_id": session_id})
    await operator.ok("resume_test_session", {"session_id": session_id})
    await operator.ok("stop_test_session", {"session_id": session_id, "reason": "finished early"})
    await operator.refused("pause_test_session", {"session_id": session_id})
    rows = await node.audit_rows(session_id)
    assert [(r["action"], r["from_status"], r["to_status"]) for r in rows] == [
        ("create", None, "created"),
        ("start", "created", "running"),
        ("pause", "running", "paused"),
        ("resume", "paused", "running"),
        ("stop", "running", "stopped"),
    ]
    assert {r["actor"] for r in rows} == {"auditor-1"}
    assert rows[-1]["reason"] == "finished early"


async def test_a_rejoin_with_status_since_replays_the_status_changes_the_client_missed(
    node: NodeUnderTest, connect: Connect
) -> None:
    """Extension: a viewer that was away while the session was paused and resumed gets each change
    it missed on rejoin, in order, before its ack; the ack's session is the last of them."""
    operator = await connect(node, "operator")
    session_id = (await operator.start_session())["id"]
    viewer = await connect(node, "viewer")
    seen = (await viewer.ok("join_session", {"session_id": session_id}))["session"]["updated_at"]
    await viewer.disconnect()
    for verb in ("pause", "resume", "pause"):
        await operator.ok(f"{verb}_test_session", {"session_id": session_id})
    back = await connect(node, "viewer")
    ack = await back.ok("join_session", {"session_id": session_id, "last_seq": 0, "status_since": seen})
    updates = back.updates(session_id)
    assert [(u["previous_status"], u["status"]) for u in updates] == [
        ("running", "paused"),
        ("paused", "running"),
        ("running", "paused"),
    ]
    assert updates[-1]["updated_at"] == ack["session"]["updated_at"]
    again = await connect(node, "viewer")
    await again.ok("join_session", {"session_id": session_id, "status_since": ack["session"]["updated_at"]})
    assert again.updates(session_id) == [], "a client that is up to date is sent nothing"


@pytest.mark.parametrize("bad", ["yesterday", 12, "x" * 65])
async def test_status_since_must_be_an_iso_time(node: NodeUnderTest, connect: Connect, bad: Any) -> None:
    operator = await connect(node, "operator")
    session_id = (await operator.start_session())["id"]
    error = await operator.refused("join_session", {"session_id": session_id, "status_since": bad})
    assert error["code"] == "bad_request" and "status_since" in error["message"], error


async def test_a_join_asked_again_before_its_ack_supersedes_the_one_still_replaying(
    node: NodeUnderTest, connect: Connect
) -> None:
    """A client whose join ack is late asks again on the same connection (socket.io-client's own
    timeout, then a retry): the first join stops before sending more, its ack says it was
    superseded, and the client holds each detection once, from the second join's replay."""
    admin = await connect(node, "admin")
    session_id = (await admin.start_session())["id"]
    total = 1500  # three replay pages of 500: the second join arrives while the first is replaying
    for start in range(0, total, 100):
        batch = [detection(i) for i in range(start, start + 100)]
        await admin.ok("publish_detections", {"session_id": session_id, "detections": batch})
    viewer = await connect(node, "viewer")
    request = {"session_id": session_id, "last_seq": 0}
    first, second = await asyncio.gather(viewer.call("join_session", request), viewer.call("join_session", request))
    assert first["ok"] is False and "superseded" in first["error"]["message"], first
    assert second["ok"] is True and second["replayed"] == total, second
    await viewer.wait_for_seqs(session_id, total)
    seq = await admin.publish(session_id, total)
    await viewer.wait_for_seqs(session_id, total + 1)
    assert viewer.seqs(session_id) == list(range(1, seq + 1)), "each detection once, in order, then live"
