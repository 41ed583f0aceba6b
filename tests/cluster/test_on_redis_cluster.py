"""The cluster suite's delivery, replay and presence tests, again on a Redis Cluster (3 masters,
3 replicas, `redis+cluster://`): the same assertions through sharded pub/sub and cluster-routed
presence keys. The tests are the ones of test_delivery.py and test_presence.py; only `cluster`
differs (this module's fixture overrides tests/cluster/conftest.py's)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support.cluster import RunningCluster, run_cluster
from support.redis_cluster import run_redis_cluster

from .test_delivery import (
    test_concurrent_publishers_on_every_node_reach_every_viewer_in_seq_order_exactly_once,
    test_join_with_last_seq_on_another_node_replays_without_gap_or_duplicate,
    test_session_updates_and_detections_reach_members_on_every_node,
)
from .test_presence import (
    connect_as,
    test_members_on_every_node_count_and_each_opted_in_member_hears_of_the_others,
    test_one_sub_on_two_nodes_counts_once_and_leaves_only_with_its_last_connection,
)

pytestmark = pytest.mark.cluster

__all__ = [
    "connect_as",
    "test_concurrent_publishers_on_every_node_reach_every_viewer_in_seq_order_exactly_once",
    "test_join_with_last_seq_on_another_node_replays_without_gap_or_duplicate",
    "test_members_on_every_node_count_and_each_opted_in_member_hears_of_the_others",
    "test_one_sub_on_two_nodes_counts_once_and_leaves_only_with_its_last_connection",
    "test_session_updates_and_detections_reach_members_on_every_node",
]


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCluster]:
    run_dir = tmp_path_factory.mktemp("cluster-on-redis-cluster")
    async with (
        run_redis_cluster(run_dir / "redis") as servers,
        run_cluster(
            run_dir / "cluster", f"sqlite+aiosqlite:///{run_dir / 'testpulse.db'}", redis_url=servers.url
        ) as running,
    ):
        assert running.redis_url == servers.url
        yield running
