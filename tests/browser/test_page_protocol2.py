"""The page against protocol-2 nodes: a token refreshed before it expires (from a new `#token=` and
from a pasted one) keeps the page connected, and "who is watching" follows pages coming and going."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.cluster import RunningCluster, run_cluster
from support.processes import RedisServer, wait_until

from .conftest import OpenPage, Page, new_session

pytestmark = pytest.mark.browser

WARNING_SECONDS = 3.0  # TESTPULSE_TOKEN_REFRESH_WARNING_SECONDS of the cluster below
LEEWAY_SECONDS = 1.0  # TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS: the node closes an expired connection this late at most


@pytest.fixture
async def refreshing_cluster(tmp_path: Path, database_url: str, redis: RedisServer) -> AsyncIterator[RunningCluster]:
    env = {
        "TESTPULSE_TOKEN_REFRESH_WARNING_SECONDS": str(WARNING_SECONDS),
        "TESTPULSE_TOKEN_CHECK_LEEWAY_SECONDS": str(LEEWAY_SECONDS),
    }
    async with run_cluster(tmp_path / "cluster", database_url, redis_url=redis.url, env=env) as running:
        yield running


async def _text(page: Page) -> str:
    return str(await page.eval("() => document.body.innerText"))


async def _asked_for_a_token(page: Page) -> bool:
    return "paste a fresh one" in await _text(page)


async def _stays_connected_until(page: Page, node: str, moment: float, what: str) -> None:
    """Past `moment` (a token's expiry plus the node's leeway), checking all along that the page
    never left the node it started on."""

    async def past_it() -> bool:
        state = await page.testpulse()
        if state["connection"] != "connected" or state["node"] != node:
            raise AssertionError(f"{what}, {time.time() - moment:.1f} s from it: {state}\n{await _text(page)}")
        return time.time() > moment

    await wait_until(past_it, deadline=moment - time.time() + 15, interval=0.2, what=what)


async def test_a_token_refreshed_from_the_fragment_and_then_pasted_keeps_the_page_connected_past_each_expiry(
    refreshing_cluster: RunningCluster, open_page: OpenPage
) -> None:
    cluster = refreshing_cluster
    session_id = await new_session(cluster, "refresh")
    sub = f"viewer-{session_id}"
    first_ttl, second_ttl = WARNING_SECONDS + 3, WARNING_SECONDS + 5
    first = cluster.token("viewer", sub=sub, ttl=first_ttl)
    first_expiry = time.time() + first_ttl
    page = await open_page(f"{cluster.proxy}/sessions/{session_id}#token={first}")
    await page.wait_for(lambda t: t["connection"] == "connected" and t["status"] == "running", "joined")
    await page.watch_connection()
    node = str((await page.testpulse())["node"])

    # token_expiring for the first token: the page has no fresh one, so it asks; a new link's
    # fragment gives it one.
    await wait_until(lambda: _asked_for_a_token(page), deadline=first_ttl + 5, what="the page asks for a token")
    second = cluster.token("viewer", sub=sub, ttl=second_ttl)
    second_expiry = time.time() + second_ttl
    await page.eval(f"() => {{ location.hash = 'token={second}'; }}")
    await _stays_connected_until(page, node, first_expiry + LEEWAY_SECONDS + 1, "past the first token's expiry")
    assert await page.eval("() => location.hash") == "", "the fragment's token stays in the address bar"

    # token_expiring for the second token: this time a pasted one answers it.
    await wait_until(lambda: _asked_for_a_token(page), deadline=second_ttl + 5, what="the page asks again")
    third = cluster.token("viewer", sub=sub, ttl=600)
    await page.fill("#token-input", third)
    await page.click(".token-form button[type=submit]")
    await _stays_connected_until(page, node, second_expiry + LEEWAY_SECONDS + 1, "past the second token's expiry")

    assert await page.connections_seen() == ["connected"]
    text = await _text(page)
    assert "expired" not in text and "paste a fresh one" not in text, text
    assert await page.eval("() => sessionStorage.getItem('testpulse.token')") == third
    urls, console = await page.traffic()
    logs = "\n".join(path.read_text(errors="replace") for path in cluster.run_dir.rglob("*.log"))
    logs += (cluster.run_dir / "cluster.out").read_text(errors="replace")
    for token in (first, second, third):
        # The fragment never leaves the browser: what went over the wire is the URL without it.
        assert not [url for url in urls if token in url.split("#")[0]], "a token went into a URL"
        assert not [line for line in console if token in line], "a token went into the console"
        assert token not in logs, "a token went into a node's or nginx's log"


def _watching(subs: set[str]) -> str:
    return f"""() => {{
      const box = document.querySelector('[data-testid=presence]');
      if (!box) return false;
      const subs = [...box.querySelectorAll('li')].map((li) => li.firstChild.textContent.trim()).sort();
      return JSON.stringify(subs) === JSON.stringify({sorted(subs)!r})
        && box.querySelector('b').textContent.startsWith('{len(subs)} ');
    }}"""


async def test_who_is_watching_shows_both_pages_and_drops_the_one_closed(
    cluster: RunningCluster, open_page: OpenPage
) -> None:
    session_id = await new_session(cluster, "presence")
    pages = {}
    for role in ("operator", "viewer"):
        sub = f"{role}-{session_id}"
        pages[sub] = await open_page(f"{cluster.proxy}/sessions/{session_id}#token={cluster.token(role, sub=sub)}")
    subs = set(pages)
    for sub, page in pages.items():

        async def shows_both(page: Page = page) -> bool:
            return bool(await page.eval(_watching(subs)))

        try:
            await wait_until(shows_both, deadline=10, interval=0.2, what=f"{sub}'s page shows both watching")
        except TimeoutError:
            raise AssertionError(f"{sub}'s page does not show both watching; it shows:\n{await _text(page)}") from None

    operator, viewer = pages.values()
    await viewer.close()
    stays = {f"operator-{session_id}"}

    async def shows_one() -> bool:
        return bool(await operator.eval(_watching(stays)))

    # presence_update is coalesced to one a second per session: the leave shows within a few.
    await wait_until(shows_one, deadline=5, interval=0.2, what="the closed page left who is watching")
