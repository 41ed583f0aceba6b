"""The soak report's arithmetic and verdict (testpulse.devtools.soak), without a cluster."""

from __future__ import annotations

from typing import Any

import pytest

from testpulse.devtools.soak import Plan, Series, slope_per_hour, verdict

pytestmark = pytest.mark.unit

PLAN = Plan(run_time=3600.0, restart_every=600.0, redis_restart_at=0.5, sample_every=60.0)
EVENTS = [{"kind": "node_restarted", "node": "node2"}, {"kind": "redis_restarted"}]
SAMPLED = {name: {"samples": 60} for name in ("database_size", "redis_used_memory", "node1_rss", "node1_fds")}


def summary(**delivery: Any) -> dict[str, Any]:
    return {
        "passed": True,
        "failed": [],
        "delivery": {"gaps": 0, "lost": 0, "duplicates": 0, "published": 100, **delivery},
        "final_seqs": {"a": 60, "b": 40},
    }


def test_the_slope_is_per_hour_and_needs_three_points() -> None:
    assert slope_per_hour([(0.0, 10.0), (60.0, 11.0), (120.0, 12.0)]) == 60.0
    assert slope_per_hour([(0.0, 5.0), (60.0, 5.0), (120.0, 5.0)]) == 0.0
    assert slope_per_hour([(0.0, 1.0), (60.0, 2.0)]) is None


def test_growth_is_fitted_over_the_longest_stretch_after_the_warm_up() -> None:
    series = Series("MiB")
    for t in range(0, 600, 60):  # a first life climbing fast, partly inside the warm-up
        series.add(float(t), 100.0 + t)
    series.reset()
    for t in range(600, 3600, 60):  # the restarted process: flat
        series.add(float(t), 90.0)
    summary_ = series.summary(warm_up=360.0)
    assert summary_["resets"] == 1
    assert summary_["growth_per_hour"] == 0.0
    assert summary_["peak"] == 640.0 and summary_["last"] == 90.0


def test_the_second_half_tells_a_warm_up_that_levels_off_from_a_leak() -> None:
    warming, leaking = Series("MiB"), Series("MiB")
    for t in range(0, 3660, 60):
        warming.add(float(t), 100.0 + min(t, 1200) / 60)  # +20 MiB in the first 20 min, then flat
        leaking.add(float(t), 100.0 + t / 360)  # +10 MiB an hour, all along
    warm, leak = warming.summary(warm_up=0.0), leaking.summary(warm_up=0.0)
    assert warm["growth_per_hour"] > 10 and warm["growth_per_hour_late"] == 0.0
    assert leak["growth_per_hour"] == leak["growth_per_hour_late"] == 10.0


def test_a_clean_run_passes() -> None:
    result = verdict(summary(), EVENTS, PLAN, SAMPLED)
    assert result["passed"], result
    assert (result["acked"], result["stored"]) == (100, 100)


@pytest.mark.parametrize(
    ("delivery", "final", "problem"),
    [
        ({"published": 101}, None, "acked 101 but the store holds 100"),
        ({"gaps": 2}, None, "gaps: 2"),
        ({"duplicates": 1}, None, "duplicates: 1"),
        ({"lost": 3}, None, "lost: 3"),
        ({"published": 0}, {}, "nothing was published"),
    ],
)
def test_loss_repeats_and_unstored_acks_fail(delivery: dict[str, Any], final: Any, problem: str) -> None:
    run = summary(**delivery)
    if final is not None:
        run["final_seqs"] = final
    result = verdict(run, EVENTS, PLAN, SAMPLED)
    assert not result["passed"]
    assert problem in result["problems"]


def test_a_schedule_that_did_not_happen_or_a_resource_never_sampled_fails() -> None:
    assert "no node was restarted" in verdict(summary(), EVENTS[1:], PLAN, SAMPLED)["problems"]
    assert "Redis was not restarted" in verdict(summary(), EVENTS[:1], PLAN, SAMPLED)["problems"]
    failed_restart = [*EVENTS, {"kind": "node_restart_failed", "node": "node2"}]
    assert "node_restart_failed" in verdict(summary(), failed_restart, PLAN, SAMPLED)["problems"]
    unsampled = {**SAMPLED, "database_size": {"samples": 0}}
    assert "never sampled: database_size" in verdict(summary(), EVENTS, PLAN, unsampled)["problems"]
    assert verdict(None, EVENTS, PLAN, SAMPLED) == {"passed": False, "problems": ["Locust wrote no summary"]}


def test_a_plan_with_impossible_values_is_refused() -> None:
    assert Plan(60.0, 0.0, None, 0.0).validate() == "--sample-every must be positive"
    assert Plan(60.0, -1.0, None, 1.0).validate() is not None
    assert Plan(60.0, 0.0, 1.5, 1.0).validate() is not None
    assert Plan(60.0, 0.0, None, 1.0).validate() is None
