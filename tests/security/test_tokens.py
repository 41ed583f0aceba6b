"""Tokens over the wire: every refused JWT gets connect_error {code, message}; expiry ends a live connection."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
import pytest
import socketio
from support.client import Client
from support.nodes import AUDIENCE, TEST_SECRET, Connect, NodeUnderTest

pytestmark = pytest.mark.security

OTHER_SECRET = "not-the-nodes-secret-0123456789abcdefghijklmnopqrstuvwxyz-0123456789"


def claims(**overrides: Any) -> dict[str, Any]:
    # Built when the module is collected, possibly many minutes before the test runs: a day of
    # validity keeps a token that must be refused for another reason from expiring first.
    now = int(time.time())
    body: dict[str, Any] = {"sub": "mallory", "role": "admin", "iat": now, "exp": now + 86_400, "aud": AUDIENCE}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def signed(body: dict[str, Any], *, key: str = TEST_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(body, key, algorithm=alg)


def alg_none(body: dict[str, Any]) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(body)}."


# auth payload sent in the CONNECT packet -> expected connect_error code
REFUSED: dict[str, tuple[Any, str]] = {
    "no-auth": (None, "auth_missing"),
    "empty-auth": ({}, "auth_missing"),
    "empty-token": ({"token": ""}, "auth_missing"),
    "auth-not-an-object": ("just-a-string", "auth_missing"),
    "token-not-a-string": ({"token": 12345}, "auth_invalid"),
    "garbage": ({"token": "garbage"}, "auth_invalid"),
    "three-garbage-parts": ({"token": "a.b.c"}, "auth_invalid"),
    "huge-token": ({"token": "x" * 10_000}, "auth_invalid"),
    "expired": ({"token": signed(claims(exp=int(time.time()) - 60))}, "auth_expired"),
    "future-nbf": ({"token": signed(claims(nbf=int(time.time()) + 3600))}, "auth_invalid"),
    "alg-none": ({"token": alg_none(claims())}, "auth_invalid"),
    "hs512-not-accepted": ({"token": signed(claims(), alg="HS512")}, "auth_invalid"),
    "hs384-not-accepted": ({"token": signed(claims(), alg="HS384")}, "auth_invalid"),
    "bad-signature": ({"token": signed(claims(), key=OTHER_SECRET)}, "auth_invalid"),
    "missing-sub": ({"token": signed(claims(sub=...))}, "auth_invalid"),
    "missing-role": ({"token": signed(claims(role=...))}, "auth_invalid"),
    "missing-exp": ({"token": signed(claims(exp=...))}, "auth_invalid"),
    "unknown-role": ({"token": signed(claims(role="root"))}, "auth_invalid"),
    "sub-with-nul": ({"token": signed(claims(sub="op\x00erator"))}, "auth_invalid"),
    "wrong-audience": ({"token": signed(claims(aud="another-service"))}, "auth_invalid"),
    "missing-audience": ({"token": signed(claims(aud=...))}, "auth_invalid"),
    "sessions-not-a-list": ({"token": signed(claims(sessions="s1"))}, "auth_invalid"),
}


@pytest.mark.parametrize(("auth", "code"), list(REFUSED.values()), ids=list(REFUSED))
async def test_refused_token_gets_connect_error_with_its_code(secure_node: NodeUnderTest, auth: Any, code: str) -> None:
    client = Client("intruder")
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(secure_node.url, auth=auth, transport="websocket")
        assert len(client.connect_errors) == 1, client.connect_errors
        data = client.connect_errors[0]
        assert isinstance(data, dict) and data["code"] == code, data
        assert isinstance(data["message"], str) and data["message"]
        assert not client.connected
        assert client.received("connection_status") == []
    finally:
        await client.disconnect()


async def test_refusal_over_polling_carries_the_code_too(secure_node: NodeUnderTest) -> None:
    client = Client("intruder")
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(secure_node.url, auth={"token": "garbage"}, transport="polling")
        assert client.connect_errors[0]["code"] == "auth_invalid"
    finally:
        await client.disconnect()


async def test_valid_token_with_the_configured_audience_connects(secure_node: NodeUnderTest, connect: Connect) -> None:
    client = await connect(secure_node, "viewer", token=signed(claims(role="viewer")))
    assert (await client.wait_for_event("connection_status"))["status"] == "connected"


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_authorization_bearer_header_is_accepted_instead_of_auth(
    secure_node: NodeUnderTest, transport: str
) -> None:
    client = Client("header-auth")
    try:
        await client.connect(
            secure_node.url,
            headers={"Authorization": f"Bearer {secure_node.token('operator')}"},
            transport=transport,
        )
        await client.wait_for_event("connection_status")
        assert (await client.start_session())["status"] == "running"
    finally:
        await client.disconnect()


async def test_bad_bearer_header_is_refused(secure_node: NodeUnderTest) -> None:
    client = Client("header-auth")
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(
                secure_node.url, headers={"Authorization": f"Bearer {signed(claims(), key=OTHER_SECRET)}"}
            )
        assert client.connect_errors[0]["code"] == "auth_invalid"
    finally:
        await client.disconnect()


@pytest.mark.parametrize("case", ["expired", "alg-none", "hs512-not-accepted", "wrong-audience", "bad-signature"])
async def test_the_same_tokens_are_refused_over_http_with_401(secure_node: NodeUnderTest, case: str) -> None:
    auth, code = REFUSED[case]
    async with httpx.AsyncClient(base_url=secure_node.url) as http:
        response = await http.get("/api/sessions", headers={"Authorization": f"Bearer {auth['token']}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


async def test_live_connection_whose_token_expires_is_told_and_disconnected(
    secure_node: NodeUnderTest, connect: Connect
) -> None:
    bystander = await connect(secure_node, "viewer")
    client = await connect(secure_node, "viewer", token=secure_node.token("viewer", ttl=2))
    await client.wait_for_event("connection_status")
    error = await client.wait_for_event("error", lambda e: e["code"] == "auth_expired", deadline=10)
    assert error["message"]
    await client.wait_disconnected(deadline=5)
    assert bystander.connected
    assert await bystander.ok("leave_session", {"session_id": "x"}) == {"ok": True}
