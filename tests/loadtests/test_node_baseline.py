"""The benchmark's Node.js baseline (loadtests/bench/node_baseline: socket.io + @socket.io/redis-adapter)
as the cluster benchmark starts it: 2 node processes, Redis, the repo's nginx.conf. It answers the
load generator's wire client the way the stock server does, and fans out across its nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest

from loadtests.bench.systems import NodeBaselineCluster
from loadtests.bench.wire import Receiver, ViewerState, WireClient, http_session
from tests.support.processes import wait_until

pytestmark = [pytest.mark.loadtest, pytest.mark.cluster, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
async def baseline() -> AsyncIterator[NodeBaselineCluster]:
    system = await asyncio.to_thread(NodeBaselineCluster, 2)
    try:
        yield system
    finally:
        await asyncio.to_thread(system.stop)
    assert [name for name, proc in system.cluster.processes.items() if proc.poll() is None] == []


async def test_nodes_are_node_processes_behind_nginx(baseline: NodeBaselineCluster) -> None:
    assert sorted(baseline.node_pids()) == ["node1", "node2"]
    for pid in baseline.node_pids().values():
        assert psutil.Process(pid).name() == "node"  # the sampler measures the process doing the work
    assert set(baseline.aux_pids()) == {"nginx", "redis"}
    assert baseline.proxy_url != ""


async def test_a_detection_published_through_nginx_reaches_viewers_on_both_nodes(
    baseline: NodeBaselineCluster,
) -> None:
    async with http_session() as http:
        (session,) = await baseline.create_sessions(http, 1)
        receiver = Receiver()
        urls = {"proxy": baseline.proxy_url, **baseline.node_urls}
        viewers = {where: WireClient(url, receiver, ViewerState(session)) for where, url in urls.items()}
        publisher = WireClient(baseline.proxy_url)
        try:
            for viewer in viewers.values():
                await viewer.connect(http, None)
                joined: Any = await viewer.call("join_session", {"session_id": session})
                assert joined == {"ok": True, "session": {"id": session}, "replayed": 0}
            await publisher.connect(http, None)
            before = await baseline.node_counters(http)

            ack = await publisher.call(
                "publish_detection", {"session_id": session, "label": "person", "confidence": 0.9, "ts": 1.0}
            )
            assert ack == {"ok": True, "seq": 1}

            async def all_saw_it() -> bool:
                return all(v.viewer is not None and v.viewer.last_seq == 1 for v in viewers.values())

            await wait_until(all_saw_it, deadline=15, what="every viewer received seq 1")
            assert receiver.total == len(viewers)
            assert {where: (v.viewer.count if v.viewer else 0) for where, v in viewers.items()} == dict.fromkeys(
                viewers, 1
            )

            async def one_node_got_it_from_the_other() -> bool:
                after = await baseline.node_counters(http)
                return sum(after[n]["remote_emits"] - before[n]["remote_emits"] for n in after) == 1

            # The publishing node emits locally and through Redis; only the other one counts it as remote.
            await wait_until(one_node_got_it_from_the_other, deadline=15, what="a remote emit counted")
            counters = await baseline.node_counters(http)
            assert sum(c["clients"] for c in counters.values()) == len(viewers) + 1
        finally:
            await asyncio.gather(publisher.close(), *(v.close() for v in viewers.values()))
