"""The objectives gate and the per-session seq check, without Locust or a cluster."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Neither module imports Locust (which would monkey-patch this test process with gevent).
from testpulse.cli import parser  # noqa: E402
from testpulse.devtools.loadtest import parse_duration  # noqa: E402
from testpulse.devtools.scenarios import slo  # noqa: E402
from testpulse.devtools.scenarios.delivery import SeqTracker  # noqa: E402

pytestmark = [pytest.mark.loadtest, pytest.mark.unit]


def measured(**overrides: object) -> slo.Measured:
    values: dict[str, object] = {
        "connect_p99_ms": 120.0,
        "delivery_p99_ms": 80.0,
        "requests": 1000,
        "failures": 0,
        "gaps": 0,
        "duplicates": 0,
    }
    values.update(overrides)
    return slo.Measured(**values)  # type: ignore[arg-type]


def test_a_clean_run_passes_every_objective() -> None:
    results = slo.evaluate(slo.Thresholds(), measured())
    assert slo.failed(results) == []
    assert "SLO passed" in slo.report(results)


@pytest.mark.parametrize(
    ("overrides", "objective"),
    [
        ({"connect_p99_ms": 2500.0}, "connect_p99_ms"),
        ({"delivery_p99_ms": 1500.0}, "delivery_p99_ms"),
        ({"failures": 20}, "failure_ratio"),
        ({"gaps": 1}, "gaps"),
        ({"duplicates": 3}, "duplicates"),
        ({"problems": ["2 viewer(s) never finished the delivery check"]}, "completeness"),
        ({"delivery_p99_ms": None}, "delivery_p99_ms"),
    ],
)
def test_a_missed_objective_fails_the_run_and_is_named(overrides: dict[str, object], objective: str) -> None:
    results = slo.evaluate(slo.Thresholds(), measured(**overrides))
    assert [r.name for r in slo.failed(results)] == [objective]
    assert f"SLO FAILED: 1 objective(s) missed: {objective}" in slo.report(results)


def test_an_objective_switched_off_is_not_checked() -> None:
    thresholds = slo.Thresholds(connect_p99_ms=slo.parse_limit("off"), max_gaps=slo.parse_limit("5"))
    results = slo.evaluate(thresholds, measured(connect_p99_ms=99_999.0, gaps=5))
    assert slo.failed(results) == []


def test_thresholds_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        slo.parse_limit("-1")
    with pytest.raises(ValueError):
        slo.parse_limit("soon")


def test_seq_tracker_counts_gaps_lost_seqs_and_duplicates() -> None:
    tracker = SeqTracker("s1")
    verdicts = [tracker.see(seq) for seq in (1, 2, 5, 5, 3, 6)]
    assert verdicts == ["ok", "ok", "gap", "duplicate", "duplicate", "ok"]
    assert (tracker.gaps, tracker.lost, tracker.duplicates, tracker.last) == (1, 2, 2, 6)


def test_seq_tracker_joined_live_takes_the_first_seq_as_baseline() -> None:
    tracker = SeqTracker("s1", last=None)
    assert [tracker.see(seq) for seq in (41, 42, 43)] == ["ok", "ok", "ok"]
    assert tracker.gaps == tracker.duplicates == 0


def test_run_time_takes_locust_durations() -> None:
    assert [parse_duration(t) for t in ("90", "45s", "2m", "1h30m")] == [90, 45, 120, 5400]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")


def test_loadtest_command_hands_knobs_and_objectives_to_locust(tmp_path: Path) -> None:
    from testpulse.devtools.loadtest import locust_argv

    given = "loadtest reconnect --users 30 --run-time 1m --polling-share 0.5 --slo-max-gaps 3"
    args = parser().parse_args([*given.split(), "--slo-connect-p99-ms=off", "--locust-args=--csv-full-history"])
    argv = locust_argv(args, "http://127.0.0.1:9", tmp_path, str(tmp_path / "cluster.json"))
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--users"] == "30" and pairs["--run-time"] == "60s" and pairs["--host"] == "http://127.0.0.1:9"
    assert pairs["--fault"] == "disconnect"  # the reconnect scenario's own fault unless told otherwise
    assert pairs["--polling-share"] == "0.5" and pairs["--slo-max-gaps"] == "3"
    assert pairs["--slo-connect-p99-ms"] == "off" and pairs["--cluster-json"] == str(tmp_path / "cluster.json")
    assert argv[-1] == "--csv-full-history" and "--sessions" not in argv
