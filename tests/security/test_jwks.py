"""Identity-provider tokens against real nodes: a JWK Set served over loopback HTTP, RS256, ES256 and
EdDSA connecting over Socket.IO and the HTTP API, the whole refusal matrix on the wire, rotation,
the provider going down, a node that never fetched the keys, and HMAC beside or without it."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import socketio
from support.client import Client
from support.jwks import ISSUER, JwksServer, Signer, claims, ec_signer, ed_signer, jwks_server, rsa_signer
from support.nodes import TEST_SECRET, Connect, NodeUnderTest, node_with
from support.processes import wait_until

from tests.unit.test_keyring import AUDIENCE, EC256, ED, REFUSED, RSA, matrix_keys

pytestmark = pytest.mark.security

IDP_ENV = {
    "TESTPULSE_JWT_SECRET": "",  # unset: with a JWK Set only, no HMAC token is accepted
    "TESTPULSE_JWT_AUDIENCE": AUDIENCE,
    "TESTPULSE_JWT_ISSUER": ISSUER,
    "TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS": "0",
}


def good(**overrides: Any) -> dict[str, Any]:
    return claims(**{"aud": AUDIENCE, **overrides})


@pytest.fixture(scope="module")
def provider() -> Iterator[JwksServer]:
    with jwks_server(*matrix_keys()) as server:
        yield server


@pytest.fixture(scope="module")
async def idp_node(provider: JwksServer, logs_dir: Path) -> AsyncIterator[NodeUnderTest]:
    env = {**IDP_ENV, "TESTPULSE_NODE_ID": "jwks", "TESTPULSE_JWKS_URL": provider.url}
    async with node_with("sqlite", env, logs_dir) as running:
        yield running


async def refused_with(url: str, token: str, transport: str = "websocket") -> dict[str, Any]:
    client = Client("intruder")
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(url, token=token, transport=transport)
        assert len(client.connect_errors) == 1 and not client.connected, client.connect_errors
        data: dict[str, Any] = client.connect_errors[0]
        return data
    finally:
        await client.disconnect()


async def metric(node: NodeUnderTest, name: str, **labels: str) -> float | None:
    async with httpx.AsyncClient(base_url=node.url) as http:
        text = (await http.get("/metrics")).text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}{re.escape('{' + selector + '}') if labels else ''} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


# ---- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signer", [RSA, EC256, ED], ids=["RS256", "ES256", "EdDSA"])
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_provider_tokens_connect_and_act_with_their_role(
    idp_node: NodeUnderTest, connect: Connect, signer: Signer, transport: str
) -> None:
    client = await connect(idp_node, transport=transport, token=signer.sign(good(role="operator")))
    status = await client.wait_for_event("connection_status")
    assert status["status"] == "connected"
    assert (await client.start_session())["status"] == "running"
    viewer = await connect(idp_node, transport=transport, token=signer.sign(good(role="viewer", sub="v")))
    assert (await viewer.refused("start_test_session", {}))["code"] == "unauthorized"


async def test_the_http_api_takes_a_bearer_es256_token(idp_node: NodeUnderTest, connect: Connect) -> None:
    operator = await connect(idp_node, token=RSA.sign(good(role="operator", sub="http-op")))
    session_id = (await operator.start_session())["id"]
    async with httpx.AsyncClient(base_url=idp_node.url) as http:
        bearer = {"Authorization": f"Bearer {EC256.sign(good(role='viewer'))}"}
        response = await http.get(f"/api/sessions/{session_id}", headers=bearer)
        assert response.status_code == 200, response.text
        assert response.json()["session"]["id"] == session_id
        refused = await http.get("/api/sessions", headers={"Authorization": f"Bearer {RSA.sign(good(aud='x'))}"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "auth_invalid"


# ---- refused ----------------------------------------------------------------------------------

WIRE_REFUSED = {
    **REFUSED,
    "hs256-with-the-nodes-test-secret": (
        lambda: jwt.encode(good(), TEST_SECRET, algorithm="HS256"),
        "auth_invalid",
        "algorithm is not accepted",
    ),
}


@pytest.mark.parametrize("case", list(WIRE_REFUSED), ids=list(WIRE_REFUSED))
async def test_every_refused_provider_token_gets_connect_error_with_its_code(
    idp_node: NodeUnderTest, case: str
) -> None:
    make, code, says = WIRE_REFUSED[case]
    data = await refused_with(idp_node.url, make())
    assert data["code"] == code and re.search(says, data["message"]), data


@pytest.mark.parametrize(
    "case", ["alg-none", "hs256-with-the-public-key", "expired", "wrong-issuer", "key-alg-mismatch"]
)
async def test_the_same_refusals_over_http_are_401(idp_node: NodeUnderTest, case: str) -> None:
    make, code, _ = REFUSED[case]
    async with httpx.AsyncClient(base_url=idp_node.url) as http:
        response = await http.get("/api/sessions", headers={"Authorization": f"Bearer {make()}"})
    assert response.status_code == 401 and response.json()["error"]["code"] == code


# ---- token_expiring and refresh_token ---------------------------------------------------------


async def test_a_short_rs256_token_is_warned_and_refreshed_with_an_eddsa_one(
    idp_node: NodeUnderTest, connect: Connect
) -> None:
    old = RSA.sign(good(role="viewer", sub="refresher", exp=int(time.time()) + 3))
    client = await connect(idp_node, token=old)
    await client.wait_for_event("connection_status")
    warning = await client.wait_for_event("token_expiring")
    assert 0 <= warning["in_seconds"] <= 3
    stranger = await client.refused("refresh_token", {"token": rsa_signer("unknown-kid").sign(good(sub="refresher"))})
    assert stranger["code"] == "auth_invalid"
    fresh = ED.sign(good(role="viewer", sub="refresher", exp=int(time.time()) + 600))
    ack = await client.ok("refresh_token", {"token": fresh})
    assert ack["expires_at"]
    await client.wait_for(lambda: time.time() > _exp(old) + 2, deadline=10, what="past the old token's expiry")
    assert client.connected and client.errors() == [], client.summary()


def _exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


# ---- rotation, the provider down, never fetched -------------------------------------------------


async def test_a_key_rotated_in_is_accepted_on_its_first_token_and_unknown_kids_are_throttled(
    logs_dir: Path,
) -> None:
    old, new, invented = rsa_signer("rot-old"), ec_signer("rot-new"), ed_signer("rot-invented")
    with jwks_server(old) as server:
        env = {**IDP_ENV, "TESTPULSE_NODE_ID": "jwks-rotation", "TESTPULSE_JWKS_URL": server.url}
        async with node_with("sqlite", env, logs_dir) as node:
            await wait_until(
                lambda: _async(server.requests >= 1), deadline=10, what="the node's first fetch of the key set"
            )
            client = Client("rotated")
            try:
                server.publish(old, new)
                await client.connect(node.url, token=new.sign(good(sub="rotated")))
                assert (await client.wait_for_event("connection_status"))["status"] == "connected"
            finally:
                await client.disconnect()
            assert server.requests == 2, "the unknown kid fetched the set once"
            data = await refused_with(node.url, invented.sign(good()))
            assert data["code"] == "auth_invalid" and "rot-invented" in data["message"]
            assert server.requests == 2, "a second unknown kid within 10 s fetched nothing"


async def _async(value: bool) -> bool:
    return value


async def test_while_the_provider_is_down_the_cached_keys_stay_in_use_and_metrics_say_so(logs_dir: Path) -> None:
    signer = rsa_signer("down-cached")
    with jwks_server(signer) as server:
        env = {**IDP_ENV, "TESTPULSE_NODE_ID": "jwks-down", "TESTPULSE_JWKS_URL": server.url}
        async with node_with("sqlite", env, logs_dir) as node:

            async def fetched() -> bool:
                return bool(await metric(node, "testpulse_jwks_last_success_timestamp_seconds"))

            await wait_until(fetched, deadline=10, what="the first fetch")
            server.stop()
            client = Client("cached")
            try:
                await client.connect(node.url, token=signer.sign(good()))
                assert (await client.wait_for_event("connection_status"))["status"] == "connected"
            finally:
                await client.disconnect()
            data = await refused_with(node.url, rsa_signer("rotated-while-down").sign(good()))
            assert data["code"] == "auth_invalid"
            assert await metric(node, "testpulse_jwks_refresh_failures_total", trigger="unknown_kid") == 1.0
            assert "JWK Set fetch failed (unknown_kid)" in node.node.log_tail(200)
            assert "keeping the 1 keys" in node.node.log_tail(200)


async def test_a_node_that_never_fetched_the_keys_refuses_with_unavailable_until_it_does(logs_dir: Path) -> None:
    signer = ed_signer("late-provider")
    server = JwksServer(signer)  # not started yet: the provider is down when the node starts
    env = {
        **IDP_ENV,
        "TESTPULSE_NODE_ID": "jwks-never",
        "TESTPULSE_JWKS_URL": server.url,
        "TESTPULSE_JWKS_REFRESH_SECONDS": "1",  # retries after a failure come this often
    }
    async with node_with("sqlite", env, logs_dir) as node:
        data = await refused_with(node.url, signer.sign(good()))
        assert data["code"] == "unavailable", data
        polling = await refused_with(node.url, signer.sign(good()), transport="polling")
        assert polling["code"] == "unavailable", polling
        async with httpx.AsyncClient(base_url=node.url) as http:
            response = await http.get("/api/sessions", headers={"Authorization": f"Bearer {signer.sign(good())}"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
        assert await metric(node, "testpulse_jwks_last_success_timestamp_seconds") == 0.0
        server.start()
        try:

            async def accepted() -> bool:
                client = Client("late")
                try:
                    await client.connect(node.url, token=signer.sign(good()))
                    return True
                except socketio.exceptions.ConnectionError:
                    assert client.connect_errors[-1]["code"] == "unavailable", client.connect_errors
                    return False
                finally:
                    await client.disconnect()

            await wait_until(accepted, deadline=15, interval=0.5, what="a token accepted once the provider is up")
        finally:
            server.stop()


async def test_hmac_tokens_keep_working_beside_the_key_set_when_a_secret_is_set(logs_dir: Path) -> None:
    with jwks_server(RSA) as server:
        env = {**IDP_ENV, "TESTPULSE_JWT_SECRET": TEST_SECRET, "TESTPULSE_NODE_ID": "jwks-and-hmac"}
        env["TESTPULSE_JWKS_URL"] = server.url
        async with node_with("sqlite", env, logs_dir) as node:
            for token in (jwt.encode(good(), TEST_SECRET, algorithm="HS256"), RSA.sign(good())):
                client = Client("both")
                try:
                    await client.connect(node.url, token=token)
                    assert (await client.wait_for_event("connection_status"))["status"] == "connected"
                finally:
                    await client.disconnect()
            confused = REFUSED["hs256-with-the-public-key"][0]()
            data = await refused_with(node.url, confused)
            assert data["code"] == "auth_invalid" and "Signature verification failed" in data["message"]
