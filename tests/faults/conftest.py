"""A fresh three-node cluster per fault test (SQLite), on a redis-server the test may stop and restart.

`open_client` and `viewers` (tests/support/cluster.py) connect to this `cluster`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.cluster import RunningCluster, open_client, run_cluster, viewers
from support.processes import RedisServer, run_redis


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(workdir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def cluster(tmp_path: Path, redis: RedisServer) -> AsyncIterator[RunningCluster]:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}"
    async with run_cluster(tmp_path / "cluster", database_url, redis_url=redis.url) as running:
        yield running


__all__ = ["open_client", "viewers"]
