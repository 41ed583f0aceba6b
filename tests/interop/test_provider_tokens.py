"""The official socket.io-client with identity-provider tokens through nginx on 3 nodes: RS256 viewers
on every transport and an ES256 detector, verified against a JWK Set served over loopback HTTP, get
every detection once and in order; a viewer refreshes with an EdDSA token; a token whose key the
provider does not publish is refused with auth_invalid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import RunningCluster
from support.jsclients import Report, ViewerSpec, all_connected, run_js_clients
from support.jwks import JwksServer, claims, ec_signer, ed_signer, jwks_server, rsa_signer

from tests.interop.conftest import JS_OPTIONS, start_session

pytestmark = pytest.mark.interop

VIEWERS = rsa_signer("js-rs256")
DETECTOR = ec_signer("js-es256")
REFRESH = ed_signer("js-eddsa")
UNPUBLISHED = rsa_signer("js-unpublished")


@pytest.fixture(scope="module")
def provider() -> Iterator[JwksServer]:
    with jwks_server(VIEWERS, DETECTOR, REFRESH) as server:
        yield server


@pytest.fixture
def store() -> str:
    return "sqlite"


@pytest.fixture
def cluster_env(provider: JwksServer) -> dict[str, str]:
    # The cluster keeps its HMAC secret (the tests' HTTP control uses it); the JS clients use only
    # the provider's tokens.
    return {"TESTPULSE_JWKS_URL": provider.url}


def named(report: Report, name: str) -> dict[str, object]:
    return next(v for v in report["viewers"] if v["name"] == name)


async def test_js_clients_with_provider_tokens_see_every_detection_and_refresh_with_eddsa(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "js-provider-tokens")
    specs = [
        ViewerSpec(f"idp-{transport}", transport, token=VIEWERS.sign(claims(role="viewer", sub=f"idp-{transport}")))
        for transport in ("websocket", "polling", "upgrade")
    ]
    async with run_js_clients(
        url=cluster.proxy,
        session_id=scenario.session_id,
        viewer_token=VIEWERS.sign(claims(role="viewer")),
        detector_token=DETECTOR.sign(claims(role="detector", sub="idp-detector")),
        viewers=specs,
        publish_rate=30,
        options=JS_OPTIONS,
        log_dir=tmp_path,
    ) as js:
        await js.wait_for(all_connected, deadline=30, what="every JS client connected with an RS256 token")
        await js.wait_for(lambda r: r["detector"]["acked_count"] >= 20, deadline=30, what="20 acked (ES256)")
        fresh = REFRESH.sign(claims(role="viewer", sub="idp-websocket"))
        ack = await js.emit("idp-websocket", "refresh_token", {"token": fresh})
        assert ack["ok"] is True and ack["expires_at"].endswith("Z"), ack
        foreign = await js.emit("idp-polling", "refresh_token", {"token": UNPUBLISHED.sign(claims(sub="idp-polling"))})
        assert foreign["ok"] is False and foreign["error"]["code"] == "auth_invalid", foreign
        report, stored = await scenario.settle(js)
    assert len(stored) >= 20
    assert {v["transport"] for v in report["viewers"]} == {"websocket", "polling"}
    assert all(v["connects"] == 1 for v in report["viewers"]), "nobody was refused or dropped on the way"


async def test_a_js_client_whose_key_is_not_published_is_refused_with_auth_invalid(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "js-provider-refused")
    async with run_js_clients(
        url=cluster.proxy,
        session_id=scenario.session_id,
        viewer_token=VIEWERS.sign(claims(role="viewer")),
        viewers=[ViewerSpec("stranger", token=UNPUBLISHED.sign(claims(role="viewer", sub="stranger")))],
        options={**JS_OPTIONS, "reconnection": False},
        log_dir=tmp_path,
    ) as js:
        report = await js.wait_for(
            lambda r: bool(named(r, "stranger").get("connect_errors")), deadline=15, what="a connect_error"
        )
    errors = named(report, "stranger")["connect_errors"]
    assert isinstance(errors, list) and errors[0]["data"]["code"] == "auth_invalid", errors
