"""The TestExecution page in headless Chromium through nginx and a 3-node cluster: live detections,
controls on every page, node kills, a rolling restart, long-polling only and a restored database."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
from support.cluster import RunningCluster, run_cluster
from support.processes import run_redis, wait_until

from .conftest import (
    OpenPage,
    Publisher,
    caught_up,
    new_session,
    page_url,
    publishing,
    stored_last_seq,
)

pytestmark = pytest.mark.browser


def clean(t: dict[str, object]) -> bool:
    return t["gaps"] == 0 and t["duplicates"] == 0


async def test_page_loads_without_console_errors_and_shows_live_detections(
    cluster: RunningCluster, open_page: OpenPage, tmp_path: Path
) -> None:
    session_id = await new_session(cluster, "field run 7")
    async with publishing(cluster, session_id):
        listing = await open_page(page_url(cluster, "operator"))
        await listing.wait_for(lambda t: t["connection"] == "connected", "the list loaded")
        await wait_until(
            lambda: _has_text(listing, session_id), deadline=10, what="the session is listed with its status"
        )
        assert await listing.eval("() => location.href.includes('token')") is False, "the token left the address bar"
        await listing.screenshot(tmp_path / "session-list.png")

        live = await open_page(page_url(cluster, "operator", session_id))
        await live.wait_for(lambda t: t["received"] >= 50, "live detections on the page")
        state = await live.testpulse()
        assert set(state) == {
            "connection",
            "node",
            "sessionId",
            "status",
            "lastSeq",
            "received",
            "gaps",
            "duplicates",
        }
        assert state["sessionId"] == session_id and state["status"] == "running"
        assert state["node"] in cluster.node_ids
        rows = "() => document.querySelectorAll('.viewport .row').length"

        async def table_shows_rows() -> bool:
            return int(await live.eval(rows)) > 0

        await wait_until(table_shows_rows, deadline=10, what="rows in the detection table")
        await live.wait_for(lambda t: t["received"] >= 60, "more detections than fit in view")
        assert await live.eval(rows) < 40, "the table renders only the rows in view"
        assert await live.eval("() => sessionStorage.getItem('testpulse.token') !== null")
        await live.wait_for(lambda t: t["received"] >= 400, "a few seconds of detections for the charts")
        await live.screenshot(tmp_path / "live-view.png")
    await caught_up(live, cluster, session_id)
    assert clean(await live.testpulse())


async def _has_text(page: object, text: str) -> bool:
    return bool(await page.eval(f"() => document.body.innerText.includes({text!r})"))  # type: ignore[attr-defined]


async def test_operator_controls_change_the_status_on_every_page_and_a_viewer_gets_none(
    cluster: RunningCluster, open_page: OpenPage
) -> None:
    session_id = await new_session(cluster, "controls")
    operator = await open_page(page_url(cluster, "operator", session_id))
    viewer = await open_page(page_url(cluster, "viewer", session_id))
    for page in (operator, viewer):
        await page.wait_for(lambda t: t["status"] == "running", "joined a running session")
    assert await viewer.eval("() => document.querySelector('[data-testid=controls]') === null")

    # Keyboard: the pause button is reachable and works with Enter.
    await operator.eval("() => document.querySelector('button[data-action=pause]').focus()")
    await operator.press("Enter")
    await viewer.wait_for(lambda t: t["status"] == "paused", "the viewer sees the pause")
    await operator.wait_for(lambda t: t["status"] == "paused", "the operator sees the pause")

    # A refused ack shows its error.
    await operator.click("button[data-action=pause]")
    await wait_until(
        lambda: _has_text(operator, "invalid_transition"), deadline=10, what="the refused ack's error is shown"
    )

    await operator.click("button[data-action=resume]")
    await viewer.wait_for(lambda t: t["status"] == "running", "the viewer sees the resume")
    await operator.fill("#stop-reason", "end of shift")
    await operator.click("button[data-action=stop]")
    await viewer.wait_for(lambda t: t["status"] == "stopped", "the viewer sees the stop")
    await wait_until(lambda: _has_text(viewer, "by operator-"), deadline=10, what="the viewer sees who changed it")
    await wait_until(lambda: _has_text(operator, "end of shift"), deadline=10, what="the reason of the stop")


@pytest.mark.parametrize("transport", ["upgrade", "polling"])
async def test_sigkill_of_the_pages_node_shows_the_outage_then_catches_up_with_no_gap_or_duplicate(
    cluster: RunningCluster, open_page: OpenPage, transport: str
) -> None:
    session_id = await new_session(cluster, f"kill-{transport}")
    query = "?transport=polling" if transport == "polling" else ""
    page = await open_page(page_url(cluster, "viewer", session_id, query))
    page.outages_expected = True
    async with publishing(cluster, session_id):
        await page.wait_for(lambda t: t["received"] >= 20, "detections before the kill")
        await page.watch_connection()
        victim = str((await page.testpulse())["node"])
        os.kill(cluster.node(victim).pid, signal.SIGKILL)
        await page.wait_for(
            lambda t: t["connection"] == "connected" and t["node"] not in (None, victim),
            f"connected again on a node other than {victim}",
        )
        seen = await page.connections_seen()
        assert "reconnecting" in seen, f"the indicator never showed the outage: {seen}"
        before = (await page.testpulse())["received"]
        await page.wait_for(lambda t: t["received"] > before + 20, "live detections after the kill")
    state = await caught_up(page, cluster, session_id)
    assert clean(state), state
    assert state["received"] == state["lastSeq"], "every seq shown exactly once"


async def test_a_rolling_restart_leaves_the_page_connected_with_every_detection_once(
    cluster: RunningCluster, open_page: OpenPage
) -> None:
    session_id = await new_session(cluster, "rolling")
    page = await open_page(page_url(cluster, "viewer", session_id))
    page.outages_expected = True
    async with publishing(cluster, session_id):
        await page.wait_for(lambda t: t["received"] >= 20, "detections before the restart")
        await page.watch_connection()
        out = cluster.run_dir / "cluster.out"
        os.kill(cluster.process.pid, signal.SIGHUP)

        async def restarted() -> bool:
            text = out.read_text(errors="replace")
            return f"rolling restart of {cluster.node_ids[-1]}" in text

        await wait_until(restarted, deadline=60, what="the cluster restarted its last node")
        await wait_until(lambda: _all_ready(cluster), deadline=30, interval=0.2, what="every node ready after the roll")
        before = (await page.testpulse())["received"]
        await page.wait_for(lambda t: t["received"] > before + 20, "live detections after the roll")
    state = await caught_up(page, cluster, session_id)
    assert clean(state), state
    assert state["received"] == state["lastSeq"]
    assert "reconnecting" in await page.connections_seen(), "the page's node was drained and it came back"


async def _all_ready(cluster: RunningCluster) -> bool:
    from support.cluster import http_status

    return all([await http_status(f"{n.url}/ready") == 200 for n in cluster.nodes])


async def test_after_a_database_restore_the_page_gets_insufficient_state_clears_and_rejoins_from_zero(
    tmp_path: Path, open_page: OpenPage
) -> None:
    """A real restore: the page holds seq N, the database goes back to a backup taken at seq M < N
    and the cluster comes back on the same address. The page's rejoin with last_seq N meets
    insufficient_state; it then shows exactly 1..M."""
    db = tmp_path / "testpulse.db"
    backup = tmp_path / "backup.db"
    url = f"sqlite+aiosqlite:///{db}"
    async with run_redis(workdir=tmp_path / "redis") as redis:
        async with run_cluster(tmp_path / "cluster1", url, redis_url=redis.url) as first:
            port = int(first.proxy.rsplit(":", 1)[1])
            session_id = await new_session(first, "restore")
            page = await open_page(page_url(first, "viewer", session_id))
            page.outages_expected = True
            async with publishing(first, session_id, batch=10) as publisher:
                await wait_until(lambda: _published(publisher, 50), deadline=20, what="50 published")
                with sqlite3.connect(db) as source, sqlite3.connect(backup) as target:
                    source.backup(target)
                at_backup = publisher.published
                await wait_until(lambda: _published(publisher, at_backup + 50), deadline=20, what="50 more")
            held = (await caught_up(page, first, session_id))["lastSeq"]
        _restore(backup, db)
        async with run_cluster(tmp_path / "cluster2", url, redis_url=redis.url, port=port) as restored:
            restored_seq = await stored_last_seq(restored, session_id)
            assert 0 < restored_seq < held, (restored_seq, held)
            state = await caught_up(page, restored, session_id, deadline=40)
            assert state["received"] == restored_seq, "what was shown before the restore was cleared"
            assert clean(state), state


def _restore(backup: Path, db: Path) -> None:
    """Put the backup in place of the database, as an operator restoring one would (nodes stopped)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, db)


async def _published(publisher: Publisher, n: int) -> bool:
    return publisher.published >= n
