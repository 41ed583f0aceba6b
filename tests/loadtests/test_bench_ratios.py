"""The cluster benchmark's same-run ratios: testpulse's value over each baseline's, from result dicts."""

from __future__ import annotations

from typing import Any

import pytest

from loadtests.bench.ratios import ratios, render

pytestmark = [pytest.mark.loadtest, pytest.mark.unit]

BASELINES = ("stock", "node")


def storm(joins_per_s: float, p99: float) -> dict[str, Any]:
    return {"joins_per_s": joins_per_s, "connect_join_ms": {"p50": 1.0, "p99": p99}}


def row(rows: list[dict[str, Any]], scenario: str, measure: str) -> dict[str, Any]:
    (found,) = [r for r in rows if r["scenario"] == scenario and r["measure"] == measure]
    return found


def test_each_measure_is_testpulse_over_each_baseline() -> None:
    results = {"storm": {"testpulse": storm(600, 300), "stock": storm(500, 400), "node": storm(400, 600)}}
    rows = ratios(results, BASELINES)
    joins = row(rows, "storm", "joins/s")
    assert joins["values"] == {"testpulse": 600, "stock": 500, "node": 400}
    assert joins["testpulse_vs"] == {"stock": 1.2, "node": 1.5}
    assert joins["better"] == "higher"
    p99 = row(rows, "storm", "connect+join p99 ms")
    assert p99["testpulse_vs"] == {"stock": 0.75, "node": 0.5}
    assert p99["better"] == "lower"


def test_a_failed_missing_or_zero_baseline_has_no_ratio() -> None:
    idle = {
        "testpulse": {"kb_per_client": 25.0},
        "stock": {"error": "RuntimeError: boom"},
        "node": {"kb_per_client": 0},
    }
    rows = ratios({"idle": idle}, BASELINES)
    kb = row(rows, "idle", "KB per client")
    assert kb["values"] == {"testpulse": 25.0, "stock": None, "node": 0}
    assert kb["testpulse_vs"] == {"stock": None, "node": None}
    assert [r["scenario"] for r in rows] == ["idle"]  # scenarios that did not run have no rows


def test_the_printed_table_has_a_ratio_column_per_baseline_that_ran() -> None:
    results = {"storm": {"testpulse": storm(600, 300), "node": storm(400, 600)}}
    text = "\n".join(render(ratios(results, BASELINES), ["testpulse", "node"], BASELINES))
    assert "testpulse/node" in text and "testpulse/stock" not in text
    assert "1.50x" in text
