"""The soak scenario in two minutes, as CI can afford it: `testpulse loadtest soak` with node
restarts every 40 s and one Redis restart, through its own local cluster. The hour-long runs and
their figures are in the README; this proves the schedule, the sampling and the verdict work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.loadtest, pytest.mark.timeout(420)]


def test_a_two_minute_soak_restarts_nodes_and_redis_samples_every_resource_and_loses_nothing(tmp_path: Path) -> None:
    argv = [
        *(sys.executable, "-m", "testpulse", "loadtest", "soak", "--results", str(tmp_path)),
        *("--run-time", "2m", "--restart-every", "40s", "--redis-restart-at", "0.5", "--sample-every", "10s"),
        *("--nodes", "2", "--users", "16", "--spawn-rate", "16", "--drain-timeout", "30"),
        *("--node-env", "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS=3"),
        # Timing and request failures are not this test's subject: a draining node refuses publishes
        # on purpose. What may not give way is below: no gap, duplicate or loss, acked means stored.
        *("--slo-connect-p99-ms=off", "--slo-delivery-p99-ms=off", "--slo-failure-ratio=off"),
        *("--slo-max-gaps=0", "--slo-max-duplicates=0"),
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    output = (done.stdout + done.stderr)[-5000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    verdict = report["verdict"]
    assert verdict["passed"], (verdict, output)
    assert done.returncode == 0, output
    assert "testpulse loadtest soak: PASSED" in done.stdout, output
    assert verdict["acked"] > 0 and verdict["stored"] >= verdict["acked"], verdict
    kinds = [event["kind"] for event in report["events"]]
    assert kinds.count("redis_restarted") == 1, kinds
    assert kinds.count("node_restarted") >= 2, kinds
    assert {e["node"] for e in report["events"] if e["kind"] == "node_restarted"} == {"node2"}, "node1 is the witness"
    resources = report["resources"]
    for name in ("node1_rss", "node1_fds", "node2_rss", "redis_used_memory", "database_size"):
        assert resources[name]["samples"] >= 8, (name, resources[name])
    assert resources["node1_rss"]["resets"] == 0 and resources["node2_rss"]["resets"] >= 2, resources
    assert resources["redis_used_memory"]["resets"] == 1, resources["redis_used_memory"]
    assert resources["database_size"]["last"] > resources["database_size"]["first"], "detections were stored"
    assert resources["node1_rss"]["growth_per_hour"] is not None
    samples = [json.loads(line) for line in (tmp_path / "soak-samples.jsonl").read_text().splitlines()]
    assert len(samples) >= 10 and all("node1_rss_mib" in s for s in samples)
    assert (tmp_path / "soak.txt").read_text().startswith("soak: ")
