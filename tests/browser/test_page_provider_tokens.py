"""The TestExecution page in headless Chromium with an identity provider's tokens in `#token=`: an
RS256 operator token shows live detections through nginx and a 3-node cluster that verifies it
against a JWK Set served over loopback HTTP; a token whose key is not published is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.cluster import RunningCluster, run_cluster
from support.jwks import JwksServer, claims, ec_signer, jwks_server, rsa_signer
from support.processes import RedisServer, wait_until

from .conftest import OpenPage, caught_up, new_session, publishing

pytestmark = pytest.mark.browser

OPERATOR = rsa_signer("page-rs256")
VIEWER = ec_signer("page-es256")
UNPUBLISHED = rsa_signer("page-unpublished")


@pytest.fixture(scope="module")
def provider() -> Iterator[JwksServer]:
    with jwks_server(OPERATOR, VIEWER) as server:
        yield server


@pytest.fixture
async def cluster(
    tmp_path: Path, database_url: str, redis: RedisServer, provider: JwksServer
) -> AsyncIterator[RunningCluster]:
    env = {"TESTPULSE_JWKS_URL": provider.url}
    async with run_cluster(tmp_path / "cluster", database_url, redis_url=redis.url, env=env) as running:
        yield running


async def test_the_page_with_an_rs256_token_in_its_fragment_shows_live_detections(
    cluster: RunningCluster, open_page: OpenPage
) -> None:
    session_id = await new_session(cluster, "provider tokens")
    token = OPERATOR.sign(claims(role="operator", sub="page-operator"))
    async with publishing(cluster, session_id):
        live = await open_page(f"{cluster.proxy}/sessions/{session_id}#token={token}")
        await live.wait_for(lambda t: t["connection"] == "connected", "connected with the RS256 token")
        await live.wait_for(lambda t: t["received"] >= 50, "live detections on the page")
        assert await live.eval("() => location.href.includes('token')") is False, "the token left the address bar"
        viewer = await open_page(f"{cluster.proxy}/sessions/{session_id}#token={VIEWER.sign(claims(role='viewer'))}")
        await viewer.wait_for(lambda t: t["received"] >= 20, "an ES256 viewer's page gets detections too")
    await caught_up(live, cluster, session_id)
    state = await live.testpulse()
    assert state["gaps"] == 0 and state["duplicates"] == 0 and state["status"] == "running"


async def test_the_page_with_a_token_of_an_unpublished_key_is_refused(
    cluster: RunningCluster, open_page: OpenPage
) -> None:
    session_id = await new_session(cluster, "provider tokens refused")
    token = UNPUBLISHED.sign(claims(role="operator", sub="page-stranger"))
    page = await open_page(f"{cluster.proxy}/sessions/{session_id}#token={token}")
    page.outages_expected = True  # the refused CONNECT, as Chromium may log it

    async def refusal_shown() -> bool:
        return "connection refused: auth_invalid" in await page.eval("() => document.body.innerText")

    await wait_until(refusal_shown, deadline=15, what="the page shows the refusal's code")
    await page.wait_for(lambda t: t["connection"] == "offline", "the page does not retry a refused token")
    assert (await page.testpulse())["received"] == 0
