"""One three-node cluster (nginx, Redis, nodes) per database backend, shared by the cluster suite.

`open_client` and `viewers` (tests/support/cluster.py) connect to whichever `cluster` is in scope."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from support.cluster import RunningCluster, open_client, run_cluster, viewers
from support.processes import throwaway_postgres


class LazyPostgres:
    """A throwaway PostgreSQL started at the first `url()` call, so a SQLite-only run starts none."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._url: str | None = None

    async def url(self) -> str:
        if self._url is None:
            self._url = await self._stack.enter_async_context(throwaway_postgres("testpulse_cluster"))
        return self._url


@pytest.fixture(scope="session")
async def cluster_postgres() -> AsyncIterator[LazyPostgres]:
    async with contextlib.AsyncExitStack() as stack:
        yield LazyPostgres(stack)


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
async def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cluster_postgres: LazyPostgres
) -> AsyncIterator[RunningCluster]:
    """`testpulse cluster --json` with 3 nodes on SQLite (one file shared by the nodes) or PostgreSQL."""
    run_dir = tmp_path_factory.mktemp(f"cluster-{request.param}")
    if request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{run_dir / 'testpulse.db'}"
    else:
        database_url = await cluster_postgres.url()
    async with run_cluster(run_dir, database_url) as running:
        yield running


__all__ = ["open_client", "viewers"]
