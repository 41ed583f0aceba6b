"""The capacity model (loadtests/capacity.py): workload arithmetic, node sizing, what binds first,
and the committed costs file it reads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loadtests.bench.capacity_fit import nonnegative_least_squares
from loadtests.bench.redis_pubsub_cost import fit
from loadtests.capacity import COSTS_FILE, Costs, Limits, Workload, load_costs, main, plan, subscribed_nodes

pytestmark = pytest.mark.unit

COSTS = Costs(
    cpu_us_per_transaction=300.0,
    cpu_us_per_stored_detection=200.0,
    cpu_us_per_delivery=20.0,
    cpu_us_per_message_decoded=50.0,
    cpu_us_idle_per_node_per_s=10_000.0,
    proxy_cpu_us_per_delivery=10.0,
    kb_per_joined_client=20.0,
    redis_messages_per_detection=1.0,
    redis_ops_per_detection=1.0,
    redis_cpu_us_per_message=2.0,
    redis_cpu_us_per_subscriber=0.5,
    redis_bytes_in_per_detection=500.0,
    redis_bytes_out_per_message_per_subscriber=500.0,
    bytes_per_delivery=300.0,
    group_commit_batching_s=0.0075,
    db_bytes_per_detection=200.0,
)


def test_workload_counts() -> None:
    work = Workload(sessions=1000, viewers_per_session=100, rate=200)
    assert work.viewers == 100_000
    assert work.detections_per_s == 200_000
    assert work.deliveries_per_s == 20_000_000


def test_spread_viewers_reach_almost_every_node_and_never_more_than_there_are() -> None:
    assert subscribed_nodes(1, 10, "spread", 0.0, 0.7) == pytest.approx(1.0)
    assert subscribed_nodes(100, 3, "spread", 0.0, 0.7) == pytest.approx(3.0)
    assert 9.9 < subscribed_nodes(100, 10, "spread", 0.0, 0.7) <= 10.0
    assert subscribed_nodes(100, 1, "spread", 0.0, 0.7) == 1.0
    assert subscribed_nodes(0, 5, "spread", 0.0, 0.7) == 0.0


def test_affinity_uses_as_few_nodes_as_a_session_needs() -> None:
    assert subscribed_nodes(100, 50, "affinity", 0.4, 0.7) == 1.0
    assert subscribed_nodes(100, 50, "affinity", 1.5, 0.7) == 3.0
    with pytest.raises(ValueError):
        subscribed_nodes(100, 50, "random", 0.4, 0.7)


def test_a_given_node_count_reports_its_utilisation() -> None:
    work = Workload(sessions=4, viewers_per_session=25, rate=100)
    result = plan(work, COSTS, Limits(), nodes=3)
    # 133/s stored per node: 2 detections per transaction, 200 transactions/s x 300 µs; 400 detections
    # x 200 µs; 10,000 deliveries x 20 µs; decoded messages; 100 held connections x 2 µs; 3 idle nodes
    decoded = 400 * 3 * (1 - 1 / 3) * 50
    expected = (200 * 300 + 400 * 200 + 10_000 * 20 + decoded + 100 * 2.0 + 3 * 10_000) / 1e6
    assert result.nodes == 3
    assert result.binding == "given"
    assert result.node_cpu_cores == pytest.approx(expected, rel=1e-3)
    assert result.node_utilisation == pytest.approx(expected / 3, rel=1e-3)
    assert result.deliveries_per_s == 10_000
    assert result.db_rows_per_s == 400
    assert result.db_transactions_per_s == 200
    assert result.redis_messages_per_s == 400
    assert result.redis_cpu_cores == pytest.approx(400 * (2.0 + 0.5 * result.subscribed_nodes_per_session) / 1e6)


def test_sizing_fits_the_cpu_it_needs_under_the_utilisation_bound() -> None:
    work = Workload(sessions=100, viewers_per_session=100, rate=20)
    result = plan(work, COSTS, Limits(placement="affinity"))
    assert result.binding == "node CPU"
    assert result.node_utilisation <= 0.7
    smaller = plan(work, COSTS, Limits(placement="affinity"), nodes=result.nodes - 1)
    assert smaller.node_utilisation > 0.7


def test_memory_binds_when_viewers_are_many_and_quiet() -> None:
    work = Workload(sessions=1000, viewers_per_session=1000, rate=0.001)
    result = plan(work, COSTS, Limits(node_memory_mb=1024))
    assert result.binding == "node memory"
    assert result.memory_mb_per_node <= 1024
    assert result.nodes == pytest.approx(1_000_000 * 20 / 1024 / 1024, abs=1)


def test_held_connections_cost_cpu_even_when_nothing_is_published() -> None:
    work = Workload(sessions=1000, viewers_per_session=1000, rate=0.0)
    result = plan(work, replace(COSTS, cpu_us_idle_per_node_per_s=0.0), Limits(), nodes=100)
    assert result.node_cpu_cores == pytest.approx(1_000_000 * 2.0 / 1e6)
    assert Costs.from_section(section_with_held_connection_cost(7.5)).cpu_us_per_held_connection_per_s == 7.5


def section_with_held_connection_cost(us: float) -> dict[str, Any]:
    section = json.loads(COSTS_FILE.read_text())["stores"]["sqlite"]
    section["node_cpu_us"]["per_held_connection_per_s"] = us
    return section


def test_spread_placement_pays_a_message_decode_per_delivery_once_nodes_outnumber_viewers() -> None:
    # With viewers landing anywhere, a session with 100 viewers on a big cluster reaches ~100 nodes:
    # each of them decodes each of its messages (50 µs) to deliver it to about one viewer (20 µs).
    work = Workload(sessions=1000, viewers_per_session=100, rate=200)
    spread = plan(work, COSTS, Limits(placement="spread"))
    pinned = plan(work, COSTS, Limits(placement="affinity"))
    assert spread.binding.startswith("node CPU, mostly decoding")
    assert spread.subscribed_nodes_per_session > 90
    assert pinned.binding == "node CPU"
    assert pinned.subscribed_nodes_per_session == 1.0
    assert spread.nodes > 3 * pinned.nodes


def test_database_size_follows_rows_and_retention() -> None:
    work = Workload(sessions=10, viewers_per_session=1, rate=10)
    result = plan(work, COSTS, Limits(retention_days=7), nodes=1)
    assert result.db_gb_per_day == pytest.approx(100 * 86400 * 200 / 1e9)
    assert result.db_gb_per_month == pytest.approx(30 * result.db_gb_per_day)
    assert result.db_gb_retained == pytest.approx(7 * result.db_gb_per_day)


def test_redis_fit_is_a_line_through_the_points() -> None:
    rows = [{"subscribers": n, "cpu_us_per_message": 1.5 + 0.25 * n} for n in (0, 1, 2, 4, 8)]
    assert fit(rows) == {"base_us": 1.5, "per_subscriber_us": 0.25}


def test_the_committed_costs_file_loads_for_both_stores_and_plans() -> None:
    stores = json.loads(COSTS_FILE.read_text())["stores"]
    assert set(stores) >= {"sqlite", "postgresql"}
    for store in stores:
        costs = load_costs(COSTS_FILE, store)
        assert costs.cpu_us_per_delivery > 0
        assert costs.db_bytes_per_detection > 0
        result = plan(Workload(1000, 100, 200), costs, Limits(placement="affinity"))
        assert result.nodes > 1


def test_command_line_prints_the_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    section = json.loads(COSTS_FILE.read_text())["stores"]["postgresql"]
    costs_file = tmp_path / "costs.json"
    costs_file.write_text(json.dumps({"stores": {"postgresql": section}}))
    assert main(["--sessions", "10", "--viewers-per-session", "10", "--rate", "5", "--costs", str(costs_file)]) == 0
    out = capsys.readouterr().out
    assert "nodes (1 core each)" in out and "Redis CPU cores / shards" in out
    assert (
        main(["--sessions", "1", "--viewers-per-session", "1", "--rate", "1", "--json", "--costs", str(costs_file)])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["nodes"] >= 1
    with pytest.raises(SystemExit):
        main(
            ["--sessions", "1", "--viewers-per-session", "1", "--rate", "1", "--store", "x", "--costs", str(costs_file)]
        )


def test_cost_fit_recovers_unit_costs_and_clamps_the_unseen_ones_to_zero() -> None:
    truth = [300.0, 200.0, 50.0, 20.0]
    rows = [[100, 300, 0, 0], [200, 1000, 0, 0], [50, 300, 300, 30000], [120, 300, 300, 3000], [0, 0, 300, 30000]]
    targets = [sum(c * x for c, x in zip(truth, row, strict=True)) for row in rows]
    assert nonnegative_least_squares(rows, targets) == pytest.approx(truth)
    # A cost the data says is negative (noise) is fixed at zero and the others refitted.
    fitted = nonnegative_least_squares([[1, 1], [2, 1], [3, 1]], [2.0, 1.0, 0.0])
    assert fitted[0] == 0.0 and fitted[1] == pytest.approx(1.0)


def test_a_given_group_commit_batch_replaces_the_fitted_one() -> None:
    work = Workload(sessions=4, viewers_per_session=25, rate=100)
    fitted = plan(work, COSTS, Limits(), nodes=3)
    given = plan(work, replace(COSTS, detections_per_transaction=8.0), Limits(), nodes=3)
    assert given.db_transactions_per_s == 50
    assert given.node_cpu_cores == pytest.approx(fitted.node_cpu_cores - (200 - 50) * 300 / 1e6)


def test_a_small_workload_fits_one_node() -> None:
    result = plan(Workload(sessions=1, viewers_per_session=10, rate=5), COSTS, Limits())
    assert (result.nodes, result.binding) == (1, "one node suffices")
