"""Presence on one node without Redis (PROTOCOL.md 1.1): presence_update to opted-in members only,
coalesced to one a second per session; get_presence and GET /api/sessions/{id}/presence; who may ask."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import pytest
from support.client import Client
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.contract


async def new_session(node: NodeUnderTest, connect: Connect) -> str:
    operator = await connect(node, "operator")
    session = await operator.start_session(name="presence")
    await operator.ok("leave_session", {"session_id": session["id"]})
    return str(session["id"])


async def watcher(node: NodeUnderTest, connect: Connect, session_id: str, sub: str, *, presence: bool = True) -> Client:
    client = await connect(node, "viewer", token=node.token("viewer", sub=sub), name=sub)
    await client.ok("join_session", {"session_id": session_id, "presence": presence})
    return client


def subs_seen(client: Client, session_id: str) -> set[str]:
    """The set of subs a client's presence_updates add up to."""
    held: set[str] = set()
    for update in client.presence(session_id):
        held |= {m["sub"] for m in update["joined"]}
        held -= {m["sub"] for m in update["left"]}
    return held


def assert_update_shape(update: dict[str, Any]) -> None:
    assert set(update) >= {"session_id", "count", "joined", "left"}
    for entry in [*update["joined"], *update["left"]]:
        assert set(entry) == {"sub", "role"}


async def test_presence_update_reaches_opted_in_members_only_as_subs_join_and_leave(
    node: NodeUnderTest, connect: Connect
) -> None:
    session_id = await new_session(node, connect)
    alice = await watcher(node, connect, session_id, "alice")
    bob = await watcher(node, connect, session_id, "bob", presence=False)
    await alice.wait_for(lambda: subs_seen(alice, session_id) == {"alice", "bob"}, what="alice and bob present")

    carol = await watcher(node, connect, session_id, "carol")
    await alice.wait_for(lambda: "carol" in subs_seen(alice, session_id), what="carol joined")
    await carol.wait_for(lambda: subs_seen(carol, session_id) == {"alice", "bob", "carol"}, what="carol's baseline")
    joined = next(u for u in alice.presence(session_id) if any(m["sub"] == "carol" for m in u["joined"]))
    assert_update_shape(joined)
    assert joined["count"] == 3 and {"sub": "carol", "role": "viewer"} in joined["joined"]

    await carol.disconnect()
    await alice.wait_for(lambda: subs_seen(alice, session_id) == {"alice", "bob"}, what="carol left")
    left = alice.presence(session_id)[-1]
    assert left["left"] == [{"sub": "carol", "role": "viewer"}] and left["count"] == 2
    await bob.ok("leave_session", {"session_id": session_id})
    await alice.wait_for(lambda: subs_seen(alice, session_id) == {"alice"}, what="bob left")
    assert bob.presence(session_id) == [], "bob did not opt in"


async def test_a_second_connection_of_a_present_sub_changes_nothing_but_its_connection_count(
    node: NodeUnderTest, connect: Connect
) -> None:
    session_id = await new_session(node, connect)
    alice = await watcher(node, connect, session_id, "alice")
    await alice.wait_for(lambda: alice.presence(session_id), what="alice's baseline")
    second = await watcher(node, connect, session_id, "alice", presence=False)
    dave = await watcher(node, connect, session_id, "dave", presence=False)
    await alice.wait_for(lambda: "dave" in subs_seen(alice, session_id), what="dave joined")
    assert all(m["sub"] != "alice" for u in alice.presence(session_id)[1:] for m in u["joined"] + u["left"])
    presence = (await alice.ok("get_presence", {"session_id": session_id}))["presence"]
    assert presence == {
        "session_id": session_id,
        "count": 2,
        "members": [
            {"sub": "alice", "role": "viewer", "connections": 2},
            {"sub": "dave", "role": "viewer", "connections": 1},
        ],
        "truncated": False,
    }
    async with httpx.AsyncClient(base_url=node.url, timeout=10.0) as http:
        response = await http.get(f"/api/sessions/{session_id}/presence", headers=node.headers("viewer"))
    assert response.status_code == 200, response.text
    assert response.json() == {"presence": presence}
    await second.disconnect()
    await dave.disconnect()
    await alice.wait_for(lambda: subs_seen(alice, session_id) == {"alice"}, what="dave left")
    members = (await alice.ok("get_presence", {"session_id": session_id}))["presence"]["members"]
    assert members == [{"sub": "alice", "role": "viewer", "connections": 1}]


async def test_a_join_burst_is_coalesced_into_one_update_a_second_with_the_net_change(
    node: NodeUnderTest, connect: Connect
) -> None:
    session_id = await new_session(node, connect)
    alice = await watcher(node, connect, session_id, "alice")
    await alice.wait_for(lambda: alice.presence(session_id), what="alice's baseline")
    crowd = [f"burst-{i:02d}" for i in range(40)]
    await asyncio.gather(*(watcher(node, connect, session_id, sub, presence=False) for sub in crowd))
    everyone = {"alice", *crowd}
    await alice.wait_for(lambda: subs_seen(alice, session_id) == everyone, what="the whole burst")
    updates = alice.received_at("presence_update")
    assert len(updates) <= 4, f"40 joins made {len(updates)} updates: not coalesced"
    for (earlier, _), (later, _) in itertools.pairwise(updates):
        assert later - earlier > 0.8, "two presence_updates of one session within a second"
    assert updates[-1][1]["count"] == len(everyone)


async def test_whoever_may_join_may_ask_and_nobody_else(node: NodeUnderTest, connect: Connect) -> None:
    session_id = await new_session(node, connect)
    other = await new_session(node, connect)
    for role in ("viewer", "operator", "detector", "admin"):
        client = await connect(node, role, token=node.token(role, sessions=[session_id]))
        assert (await client.ok("get_presence", {"session_id": session_id}))["presence"]["session_id"] == session_id
    limited = await connect(node, "viewer", token=node.token("viewer", sessions=[session_id]))
    assert (await limited.refused("get_presence", {"session_id": other}))["code"] == "forbidden"
    assert (await limited.refused("get_presence", {}))["code"] == "bad_request"
    admin = await connect(node, "admin")
    assert (await admin.refused("get_presence", {"session_id": "no-such-session"}))["code"] == "not_found"
    refused = await admin.refused("join_session", {"session_id": session_id, "presence": "yes"})
    assert refused["code"] == "bad_request" and "presence" in refused["message"]
    async with httpx.AsyncClient(base_url=node.url, timeout=10.0) as http:
        path = f"/api/sessions/{other}/presence"
        forbidden = await http.get(path, headers=node.headers("viewer", sessions=[session_id]))
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
        assert (await http.get(path)).status_code == 401
        missing = await http.get("/api/sessions/no-such-session/presence", headers=node.headers("viewer"))
        assert missing.status_code == 404
