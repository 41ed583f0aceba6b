"""Small runs of every Locust scenario through a real cluster's proxy: no failures, gaps or duplicates.

Timing objectives are off here (a busy CI machine is no benchmark); correctness ones are strict.
A cluster whose nodes drop every tenth detection_event proves that the loss check and the gate fail.
Each run is `testpulse loadtest` as users run it: tens of users, a few seconds of load.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testpulse.devtools.cluster import Cluster, NodeSpec, free_port

ROOT = Path(__file__).resolve().parents[2]
LOSSY_NODE = Path(__file__).with_name("lossy_node.py")

pytestmark = [pytest.mark.loadtest, pytest.mark.timeout(300)]

NODE_ENV = {"TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "3"}
SMALL = ["--users", "16", "--spawn-rate", "16", "--run-time", "6s", "--drain-timeout", "15"]
CORRECTNESS_ONLY = [
    "--slo-connect-p99-ms=off",
    "--slo-delivery-p99-ms=off",
    "--slo-failure-ratio=0",
    "--slo-max-gaps=0",
    "--slo-max-duplicates=0",
]


class LossyCluster(Cluster):
    """The local cluster with tests/loadtests/lossy_node.py as its nodes."""

    def _start_node(self, spec: NodeSpec) -> None:
        assert self.redis_url is not None and self.database_url is not None
        env = {
            **os.environ,
            **self.node_env,
            "TESTPULSE_REDIS_URL": self.redis_url,
            "TESTPULSE_DATABASE_URL": self.database_url,
            "TESTPULSE_NODE_ID": spec.node_id,
        }
        argv = [sys.executable, str(LOSSY_NODE), "serve", "--host", "127.0.0.1", "--port", str(spec.port)]
        self._spawn(spec.node_id, argv, env)


@contextlib.contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(grace=10)
        assert [name for name, proc in cluster.processes.items() if proc.poll() is None] == []


def new_cluster(kind: type[Cluster], folder: Path) -> Cluster:
    return kind(
        nodes=3,
        port=free_port(),
        database_url=f"sqlite+aiosqlite:///{folder / 'testpulse.db'}",
        run_dir=folder,
        node_env=NODE_ENV,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(new_cluster(Cluster, tmp_path_factory.mktemp("loadtest-cluster"))) as started:
        yield started


def loadtest(scenario: str, results: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    argv = [
        sys.executable,
        "-m",
        "testpulse",
        "loadtest",
        scenario,
        "--results",
        str(results),
        *SMALL,
        *CORRECTNESS_ONLY,
    ]
    done = subprocess.run([*argv, *args], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    summary_path = results / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return done.returncode, done.stdout + done.stderr, summary


def assert_clean(code: int, output: str, summary: dict[str, Any]) -> None:
    tail = output[-4000:]
    assert summary, tail
    failures = {f"{r['type']} {r['name']}": r["failures"] for r in summary["requests"] if r["failures"]}
    assert failures == {}, tail
    delivery = summary["delivery"]
    assert (delivery["gaps"], delivery["lost"], delivery["duplicates"]) == (0, 0, 0), tail
    assert delivery["verified_viewers"] == summary["users"]["Viewer"] > 0, tail
    assert delivery["published"] > 0, tail
    # Load from one host still reaches every node (nginx: least_conn for handshakes).
    assert sorted(summary["nodes"]["connections"]) == ["node1", "node2", "node3"], tail
    assert summary["passed"] and summary["failed"] == [], tail
    assert code == 0, tail
    assert "PASSED, every objective held" in output


@pytest.mark.parametrize("scenario", ["storm", "fanout", "steady"])
def test_small_run_through_the_proxy_has_no_failures_gaps_or_duplicates(
    scenario: str, cluster: Cluster, tmp_path: Path
) -> None:
    code, output, summary = loadtest(scenario, tmp_path, "--target", cluster.proxy_url)
    assert_clean(code, output, summary)
    if scenario == "storm":
        assert set(summary["transports"]) == {"websocket", "polling", "upgrade"}, output[-4000:]
    if scenario == "steady":
        updates = [r for r in summary["requests"] if r["name"] == "test_session_update"]
        assert updates and updates[0]["count"] > 0, output[-4000:]


def test_after_a_mass_disconnect_every_viewer_rejoins_and_sees_every_seq_once(cluster: Cluster, tmp_path: Path) -> None:
    code, output, summary = loadtest("reconnect", tmp_path, "--target", cluster.proxy_url, "--fault", "disconnect")
    assert_clean(code, output, summary)
    recovery = summary["recovery"]
    assert recovery["recovered"] == summary["users"]["Viewer"] and recovery["unrecovered"] == 0, output[-4000:]


def test_after_a_node_is_killed_its_viewers_rejoin_elsewhere_and_see_every_seq_once(tmp_path: Path) -> None:
    # No --target: the command starts its own cluster, hands the node pids to Locust, stops it after.
    code, output, summary = loadtest(
        "reconnect", tmp_path, "--fault", "kill-node", "--node-env", "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS=3"
    )
    assert_clean(code, output, summary)
    assert len(summary["nodes"]["killed"]) == 1, output[-4000:]
    assert summary["recovery"]["recovered"] >= 1 and summary["recovery"]["unrecovered"] == 0, output[-4000:]
    pids = [node["pid"] for node in json.loads((tmp_path / "cluster.json").read_text())["nodes"]]
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


def test_a_cluster_that_loses_detections_fails_the_gap_objective(tmp_path: Path) -> None:
    with running(new_cluster(LossyCluster, tmp_path / "cluster")) as lossy:
        code, output, summary = loadtest(
            "fanout", tmp_path / "results", "--target", lossy.proxy_url, "--polling-share", "0"
        )
    assert code == 1, output[-4000:]
    assert "gaps" in summary["failed"], output[-4000:]
    assert summary["delivery"]["gaps"] > 0 and summary["delivery"]["lost"] > 0
    verdict = next(line for line in output.splitlines() if "FAILED objective(s):" in line)
    assert "gaps = " in verdict, verdict
