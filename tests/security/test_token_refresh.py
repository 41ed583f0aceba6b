"""Token refresh on the wire (PROTOCOL.md 1.1): token_expires_at, token_expiring once per token,
refresh_token and the refusals that change nothing, narrowing and role changes, and the race
between a refresh and the once-a-second expiry pass."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import jwt
import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

from tests.security.test_tokens import OTHER_SECRET, alg_none, claims, signed

pytestmark = pytest.mark.security


def epoch(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


async def connected(node: NodeUnderTest, connect: Connect, token: str, name: str = "client") -> Client:
    client = await connect(node, token=token, name=name)
    await client.wait_for_event("connection_status")
    return client


async def test_connection_status_carries_the_tokens_expiry_and_a_long_token_is_not_warned(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    token = secure_node.token("viewer", ttl=600)
    client = await connected(secure_node, connect, token)
    status = client.received("connection_status")[0]
    assert epoch(status["token_expires_at"]) == signed_exp(token)
    assert client.received("token_expiring") == []


def signed_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_a_short_token_is_warned_at_once_and_once_and_a_refresh_keeps_the_connection_past_it(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    old = secure_node.token("viewer", sub="longrun", ttl=3)
    client = await connected(secure_node, connect, old)
    warning = await client.wait_for_event("token_expiring")
    assert epoch(warning["expires_at"]) == signed_exp(old) and 0 <= warning["in_seconds"] <= 3
    # A refresh with about a second left.
    await client.wait_for(lambda: signed_exp(old) - time.time() <= 1.2, deadline=5, what="1 s left")
    fresh = secure_node.token("viewer", sub="longrun", ttl=600)
    ack = await client.ok("refresh_token", {"token": fresh})
    assert epoch(ack["expires_at"]) == signed_exp(fresh)
    await client.wait_for(lambda: time.time() > signed_exp(old) + 2.5, deadline=10, what="past the old expiry")
    assert client.connected and client.errors() == [], client.summary()
    await client.ok("get_presence", {"session_id": await any_session(secure_node, connect)})
    assert len(client.received("token_expiring")) == 1, "once per token, and the fresh one is long"


async def any_session(node: NodeUnderTest, connect: Connect) -> str:
    operator = await connect(node, "operator")
    return str((await operator.start_session())["id"])


REFUSED_REFRESHES: dict[str, tuple[Any, str]] = {
    "wrong-sub": ({"token": signed(claims(sub="someone-else"))}, "forbidden"),
    "expired": ({"token": signed(claims(sub="keeper", exp=int(time.time()) - 60))}, "auth_expired"),
    "bad-signature": ({"token": signed(claims(sub="keeper"), key=OTHER_SECRET)}, "auth_invalid"),
    "alg-none": ({"token": alg_none(claims(sub="keeper"))}, "auth_invalid"),
    "no-token": ({}, "bad_request"),
    "not-a-string": ({"token": 42}, "bad_request"),
    "not-an-object": ("a-token", "bad_request"),
}


async def test_refused_refreshes_change_nothing_and_the_old_expiry_ends_the_connection(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    token = secure_node.token("viewer", sub="keeper", ttl=4)
    client = await connected(secure_node, connect, token)
    for case, (payload, code) in REFUSED_REFRESHES.items():
        error = await client.refused("refresh_token", payload)
        assert error["code"] == code, f"{case}: {error}"
    # Without an ack callback the failure is an `error` event naming the event.
    await client.emit("refresh_token", {"token": signed(claims(sub="someone-else"))})
    await client.wait_for(lambda: any(e.get("event") == "refresh_token" for e in client.errors()), what="error event")
    assert len(client.received("token_expiring")) == 1, "a refused token is not warned of"
    await client.wait_disconnected(deadline=10)
    assert time.time() >= signed_exp(token), "ended before its own expiry"
    expired = [e for e in client.errors() if e.get("code") == "auth_expired"]
    assert expired and expired[-1]["reconnect"] == "refresh", client.errors()
    assert client.disconnects, "a Socket.IO DISCONNECT, so the client does not retry the dead token"


async def test_a_refresh_that_narrows_sessions_leaves_the_ones_it_may_not_see(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    operator = await connect(secure_node, "operator")
    keep = (await operator.start_session())["id"]
    lose = (await operator.start_session())["id"]
    client = await connected(secure_node, connect, secure_node.token("viewer", sub="narrow"))
    for session_id in (keep, lose):
        await client.ok("join_session", {"session_id": session_id, "presence": True})
    narrowed = secure_node.token("viewer", sub="narrow", sessions=[keep])
    await client.ok("refresh_token", {"token": narrowed})
    error = await client.wait_for_event("error", lambda e: e.get("session_id") == lose)
    assert error["code"] == "forbidden" and error["event"] == "refresh_token", error
    assert [e.get("session_id") for e in client.errors()] == [lose], "only the session it may not see is left"
    detector = await connect(secure_node, "detector")
    for session_id in (lose, keep):
        await detector.ok("publish_detection", {"session_id": session_id, **detection(1)})
    await client.wait_for(lambda: client.detections(keep), what="the kept session's detection")
    assert client.detections(lose) == []
    presence = (await operator.ok("get_presence", {"session_id": lose}))["presence"]
    assert "narrow" not in [m["sub"] for m in presence["members"]]
    assert (await client.refused("join_session", {"session_id": lose}))["code"] == "forbidden"


async def test_a_refreshed_role_applies_from_then_on_and_repeated_refreshes_warn_once_per_token(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    operator = await connect(secure_node, "operator")
    session_id = (await operator.start_session())["id"]
    client = await connected(secure_node, connect, secure_node.token("viewer", sub="promoted", ttl=30))
    await client.ok("join_session", {"session_id": session_id})
    assert (await client.refused("pause_test_session", {"session_id": session_id}))["code"] == "unauthorized"
    expiries = []
    for _ in range(3):  # each token has less than the warning time left: each is warned once, at once
        ack = await client.ok("refresh_token", {"token": secure_node.token("operator", sub="promoted", ttl=30)})
        expiries.append(epoch(ack["expires_at"]))
    await client.wait_for(lambda: len(client.received("token_expiring")) == 4, what="a warning per token")
    await client.ok("pause_test_session", {"session_id": session_id})
    members = (await client.ok("get_presence", {"session_id": session_id}))["presence"]["members"]
    assert {"sub": "promoted", "role": "operator", "connections": 1} in members
    await client.ok("refresh_token", {"token": secure_node.token("viewer", sub="promoted", ttl=600)})
    assert (await client.refused("resume_test_session", {"session_id": session_id}))["code"] == "unauthorized"
    assert len(client.received("token_expiring")) == 4, "the long token is not warned of"


async def test_a_refresh_racing_the_expiry_pass_either_wins_whole_or_loses_whole(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    """Refreshes sent from 0.4 s before to 0.4 s after the expiry: each connection either got an ok
    ack and lives on with no auth_expired, or was told auth_expired and disconnected; never both."""
    offsets = [i / 10 for i in range(-4, 5)]
    token = secure_node.token("viewer", sub="racer", ttl=3)
    exp = signed_exp(token)
    clients = [await connected(secure_node, connect, token, name=f"racer{i}") for i in range(len(offsets))]

    async def race(client: Client, offset: float) -> Any:
        await asyncio.sleep(max(0.0, exp + offset - time.time()))  # aiming at a moment, not waiting for a state
        fresh = secure_node.token("viewer", sub="racer", ttl=600)
        try:
            return await client.call("refresh_token", {"token": fresh}, deadline=3)
        except Exception as exc:  # noqa: BLE001 - no ack at all: the connection was closed first
            return repr(exc)

    acks = await asyncio.gather(*(race(c, o) for c, o in zip(clients, offsets, strict=True)))
    await clients[0].wait_for(lambda: time.time() > exp + 2.5, deadline=10, what="past the expiry pass")
    outcomes = []
    for client, ack, offset in zip(clients, acks, offsets, strict=True):
        expired = [e for e in client.errors() if e.get("code") == "auth_expired"]
        won = isinstance(ack, dict) and ack.get("ok") is True
        if won:
            assert not expired and client.connected, f"{offset:+.1f}s: refreshed, then expired: {client.summary()}"
        else:
            await client.wait_disconnected(deadline=5)
            assert expired and expired[-1]["reconnect"] == "refresh", f"{offset:+.1f}s: {ack!r} {client.errors()}"
        outcomes.append(won)
    assert outcomes[0] and not outcomes[-1], f"the earliest must win and the latest lose: {outcomes}"
