"""Presence and token refresh with the official socket.io-client (PROTOCOL.md 1.1), on one SQLite
cluster for the module: presence_updates across nodes, get_presence, refresh_token keeping a
connection past its first token, and an unrefreshed token ending with auth_expired/refresh."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from support.cluster import RunningCluster, run_cluster
from support.jsclients import Report, ViewerSpec, run_js_clients
from support.processes import RedisServer, run_redis

from tests.interop.conftest import JS_OPTIONS, start_session

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
async def redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    async with run_redis(workdir=tmp_path_factory.mktemp("js-presence-redis")) as server:
        yield server


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> AsyncIterator[RunningCluster]:
    run_dir: Path = tmp_path_factory.mktemp("js-presence")
    async with run_cluster(run_dir, f"sqlite+aiosqlite:///{run_dir / 'testpulse.db'}", redis_url=redis.url) as running:
        yield running


def subs_seen(viewer: dict[str, Any]) -> set[str]:
    held: set[str] = set()
    for update in viewer["presence_updates"]:
        held |= {m["sub"] for m in update["joined"]}
        held -= {m["sub"] for m in update["left"]}
    return held


def named(report: Report, name: str) -> dict[str, Any]:
    return next(v for v in report["viewers"] if v["name"] == name)


async def test_js_clients_on_three_nodes_see_each_other(cluster: RunningCluster, tmp_path: Path) -> None:
    scenario = await start_session(cluster, "js-presence")
    specs = [
        ViewerSpec(
            f"js-{node.id}",
            transport,
            url=node.url,
            token=cluster.token("viewer", sub=f"js-{node.id}"),
            presence=node.id != "node3",
        )
        for node, transport in zip(cluster.nodes, ("websocket", "polling", "upgrade"), strict=True)
    ]
    everyone = {spec.name for spec in specs}
    async with run_js_clients(
        url=cluster.proxy,
        session_id=scenario.session_id,
        viewer_token=cluster.token("viewer"),
        viewers=specs,
        options=JS_OPTIONS,
        log_dir=tmp_path,
    ) as js:

        def all_seen(report: Report) -> bool:
            return all(subs_seen(named(report, s.name)) == everyone for s in specs if s.presence)

        report = await js.wait_for(all_seen, deadline=15, what="every opted-in JS client sees all three subs")
        assert named(report, "js-node3")["presence_updates"] == [], "node3's client did not opt in"
        ack = await js.emit("js-node1", "get_presence", {"session_id": scenario.session_id})
        assert ack["ok"] is True and ack["presence"]["count"] == 3
        assert [m["sub"] for m in ack["presence"]["members"]] == sorted(everyone)
        status = await js.emit("js-node2", "leave_session", {"session_id": scenario.session_id})
        assert status["ok"] is True
        await js.wait_for(
            lambda r: subs_seen(named(r, "js-node1")) == everyone - {"js-node2"},
            deadline=15,
            what="js-node1 sees js-node2 leave",
        )


async def test_js_client_refreshes_past_its_first_token_and_an_unrefreshed_one_is_told_to_refresh(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    scenario = await start_session(cluster, "js-refresh")
    short = {name: cluster.token("viewer", sub=name, ttl=4) for name in ("refresher", "neglecter")}
    exp = max(float(jwt.decode(t, options={"verify_signature": False})["exp"]) for t in short.values())
    specs = [ViewerSpec(name, token=token) for name, token in short.items()]
    async with run_js_clients(
        url=cluster.proxy,
        session_id=scenario.session_id,
        viewer_token=cluster.token("viewer"),
        viewers=specs,
        options=JS_OPTIONS,
        log_dir=tmp_path,
    ) as js:
        report = await js.wait_for(
            lambda r: all(v["token_expiring"] and v["joins"] for v in r["viewers"]),
            deadline=10,
            what="token_expiring at once (less than 60 s left)",
        )
        fresh = cluster.token("viewer", sub="refresher", ttl=600)
        ack = await js.emit("refresher", "refresh_token", {"token": fresh})
        assert ack["ok"] is True and ack["expires_at"].endswith("Z"), ack
        refused = await js.emit("neglecter", "refresh_token", {"token": fresh})
        assert refused["ok"] is False and refused["error"]["code"] == "forbidden", "another sub's token"

        def settled(r: Report) -> bool:
            return time.time() > exp + 2.5 and not named(r, "neglecter")["connected"]

        report = await js.wait_for(settled, deadline=15, what="past the first tokens' expiry")
        refresher, neglecter = named(report, "refresher"), named(report, "neglecter")
        assert refresher["connected"] and refresher["disconnects"] == [] and refresher["connects"] == 1
        assert [e["code"] for e in neglecter["errors"]] == ["auth_expired"]
        assert neglecter["errors"][0]["reconnect"] == "refresh"
        assert neglecter["disconnects"][0]["reason"] == "io server disconnect", "DISCONNECT: no retry of a dead token"
        assert not neglecter["active"], "socket.io-client does not reconnect by itself after a Socket.IO DISCONNECT"
        assert len(refresher["token_expiring"]) == 1
