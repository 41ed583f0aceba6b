"""`testpulse cluster` leaves no process behind, whether it is stopped or killed."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from support.cluster import (
    RunningCluster,
    command_name,
    http_status,
    start_cluster,
    stop_cluster_process,
    wait_gone,
)
from support.processes import port_is_open, wait_until

pytestmark = pytest.mark.cluster


def ports_of(cluster: RunningCluster) -> list[int]:
    redis_urls = cluster.redis_url.split("://", 1)[1].split(",")  # one, or a Redis Cluster's seeds
    urls = [cluster.proxy, *redis_urls, *(n.url for n in cluster.nodes)]
    return [int(url.rsplit(":", 1)[1].split("/")[0]) for url in urls]


async def started_cluster(tmp_path: Path) -> tuple[RunningCluster, dict[int, str]]:
    cluster = await start_cluster(tmp_path / "run", f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}")
    children = {pid: command_name(pid) for pid in cluster.children()}
    kinds = " ".join(children.values())
    assert {n.pid for n in cluster.nodes} <= set(children), children
    assert "redis-server" in kinds and "nginx: master" in kinds and "nginx: worker" in kinds, children
    assert all(port_is_open(port) for port in ports_of(cluster))
    return cluster, children


async def test_sigterm_stops_the_cluster_command_and_every_process_it_started(tmp_path: Path) -> None:
    cluster, children = await started_cluster(tmp_path)
    try:
        os.kill(cluster.process.pid, signal.SIGTERM)
        code = await asyncio.wait_for(cluster.process.proc.wait(), 40)
        assert code == 0, cluster.process.log_tail()
        await wait_gone(children, deadline=10, what="children of a stopped cluster")
        assert not [port for port in ports_of(cluster) if port_is_open(port)]
    finally:
        await stop_cluster_process(cluster.process)


async def test_children_of_a_sigkilled_cluster_command_die_with_it(tmp_path: Path) -> None:
    cluster, children = await started_cluster(tmp_path)
    try:
        os.kill(cluster.process.pid, signal.SIGKILL)
        await asyncio.wait_for(cluster.process.proc.wait(), 10)
        # PDEATHSIG hands each child a SIGTERM; nodes drain (3 s here) and exit.
        try:
            await wait_gone(children, deadline=20, what="orphans of a killed cluster")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{cluster.logs()}") from None
        assert not [port for port in ports_of(cluster) if port_is_open(port)]
    finally:
        await stop_cluster_process(cluster.process)


async def test_the_cluster_command_starts_a_redis_cluster_runs_on_it_and_stops_all_of_it(tmp_path: Path) -> None:
    cluster = await start_cluster(
        tmp_path / "run", f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}", nodes=2, redis_cluster=3
    )
    try:
        assert cluster.redis_url.startswith("redis+cluster://")
        children = {pid: command_name(pid) for pid in cluster.children()}
        servers = [name for name in children.values() if "redis-server" in name and "[cluster]" in name]
        assert len(servers) == 6, children  # 3 masters, 3 replicas
        assert all(port_is_open(port) for port in ports_of(cluster))

        async def ready() -> bool:
            return all([await http_status(f"{node.url}/ready") == 200 for node in cluster.nodes])

        await wait_until(ready, deadline=20, what="every node ready on the Redis Cluster")
        os.kill(cluster.process.pid, signal.SIGTERM)
        code = await asyncio.wait_for(cluster.process.proc.wait(), 40)
        assert code == 0, cluster.process.log_tail()
        await wait_gone(children, deadline=10, what="children of a stopped cluster")
        assert not [port for port in ports_of(cluster) if port_is_open(port)]
    finally:
        await stop_cluster_process(cluster.process)
