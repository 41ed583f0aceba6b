"""The connections scenario at a CI size: 200 idle clients over 2 source addresses, all connected,
sampled, none dropped (the 50,000-client figures are in docs/connections.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.loadtest, pytest.mark.timeout(90)]


def test_connections_scenario_holds_every_idle_client_and_reports_the_figures(tmp_path: Path):
    argv = [sys.executable, "-m", "loadtests.bench", "connections", "--clients", "200", "--sources", "2"]
    argv += ["--workers", "2", "--seconds", "4", "--interval", "2", "--settle", "1", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped clients: 0" in done.stdout
    result = json.loads(next(tmp_path.glob("connections-*.json")).read_text())["connections"]
    assert result["connected"] == 200 and result["connected_on_nodes"] == 200
    assert result["source_addresses"] == ["127.0.0.10", "127.0.0.11"]
    assert result["dropped"] == 0 and result["heartbeat_timeouts"] == 0
    node = result["per_node"]["node1"]
    assert node["clients"] == 200 and node["rss_mb_max"] > 0 and node["cpu_pct_of_one_core"] >= 0
    assert result["limits"]["nofile"]["needed"] >= 200
