"""A real Prometheus scrapes a real local cluster: every dashboard and alert expression evaluates,
and metrics move the right way when the thing they describe happens."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio

from testpulse.devtools.cluster import Cluster, free_port
from testpulse.domain.auth import issue_token
from testpulse.settings import Settings

pytestmark = pytest.mark.observability

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "testpulse.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL = 5.0


def prom_query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def scalar_sum(base: str, expr: str) -> float:
    result = prom_query(base, expr)
    assert result["status"] == "success", (expr, result)
    return sum(float(sample["value"][1]) for sample in result["data"]["result"])


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def dashboard_expressions() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(board["panels"]) for t in p.get("targets", []) if t.get("expr")]


def alert_expressions() -> list[str]:
    # promtool (tests/deploy) checks the file's syntax; here each expression meets real data.
    text = ALERTS.read_text()
    exprs = []
    for match in re.finditer(r"expr: (\|\n((?:\s{10,}.*\n)+)|(.+))", text):
        block = match.group(2) or match.group(3)
        exprs.append(" ".join(line.strip() for line in block.splitlines()))
    return exprs


def concrete(expr: str, instance: str) -> str:
    """Grafana's variables as Grafana fills them: `=~"$node"` for All nodes, `="$node"` in a row
    repeated per node (one instance), over a short range."""
    expr = expr.replace("$__rate_interval", "1m")
    expr = re.sub(r'=~\s*"\$node"', '=~".+"', expr)
    return expr.replace("$node", instance)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert shutil.which("prometheus"), "prometheus is missing: ./scripts/setup installs Debian's prometheus"
    run_dir = tmp_path_factory.mktemp("observed-cluster")
    node = Cluster(
        nodes=2,
        port=free_port(),
        run_dir=run_dir,
        with_prometheus=True,
        database_url=f"sqlite+aiosqlite:///{run_dir / 'testpulse.db'}",
        node_env={"TESTPULSE_RATE_LIMIT_PER_SECOND": "20", "TESTPULSE_RATE_LIMIT_BURST": "20"},
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()
    assert not [name for name, proc in node.processes.items() if proc.poll() is None]


async def drive_traffic(proxy: str, rounds: int = 3) -> None:
    """A little of everything: sessions, detections, a viewer, a refusal, an error, a flood."""
    settings = Settings.from_env()
    token = {
        role: issue_token(settings, role=role, sub=f"obs-{role}", ttl_seconds=600)
        for role in ("operator", "detector", "viewer")
    }
    operator, detector, viewer = socketio.AsyncClient(), socketio.AsyncClient(), socketio.AsyncClient()
    await operator.connect(proxy, auth={"token": token["operator"]}, transports=["websocket"])
    await detector.connect(proxy, auth={"token": token["detector"]}, transports=["websocket"])
    await viewer.connect(proxy, auth={"token": token["viewer"]})
    try:
        for _ in range(rounds):
            started = await operator.call("start_test_session", {"name": "observed"})
            session_id = started["session"]["id"]
            await viewer.call("join_session", {"session_id": session_id})
            for _ in range(5):
                assert (
                    await detector.call(
                        "publish_detection", {"session_id": session_id, "label": "car", "confidence": 0.9}
                    )
                )["ok"]
            await operator.call("pause_test_session", {"session_id": session_id})
            await operator.call("pause_test_session", {"session_id": session_id})  # invalid_transition
        refused = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(proxy, auth={"token": "not-a-jwt"}, transports=["websocket"])
        # A flood well past the bucket (burst 20): some are refused with rate_limited.
        answers = await asyncio.gather(*(viewer.call("leave_session", {"session_id": "x"}) for _ in range(60)))
        assert any(not a["ok"] and a["error"]["code"] == "rate_limited" for a in answers)
    finally:
        for client in (operator, detector, viewer):
            await client.disconnect()


def test_every_dashboard_and_alert_expression_evaluates_against_the_cluster(cluster: Cluster) -> None:
    base = cluster.prometheus_url
    assert base is not None
    asyncio.run(drive_traffic(cluster.proxy_url))
    # Two scrapes after the traffic, so rate() has two points inside its window.
    wait_until(lambda: scalar_sum(base, "sum(testpulse_detections_stored_total)") >= 15, 30, "detections scraped")
    time.sleep(2 * SCRAPE_INTERVAL)

    empty = []
    for expr in dashboard_expressions():
        result = prom_query(base, concrete(expr, f"127.0.0.1:{cluster.specs[0].port}"))
        assert result["status"] == "success", f"dashboard expression failed: {expr}\n{result}"
        if not result["data"]["result"]:
            empty.append(expr)
    assert not empty, "dashboard expressions that returned no data:\n" + "\n".join(empty)

    alerts = alert_expressions()
    assert len(alerts) >= 9
    for expr in alerts:
        result = prom_query(base, expr)
        assert result["status"] == "success", f"alert expression failed: {expr}\n{result}"


def test_metrics_move_when_clients_flood_and_a_node_dies(cluster: Cluster) -> None:
    base = cluster.prometheus_url
    assert base is not None
    limited_before = scalar_sum(base, 'sum(testpulse_rate_limited_total{kind="event"})')
    asyncio.run(drive_traffic(cluster.proxy_url, rounds=1))
    wait_until(
        lambda: scalar_sum(base, 'sum(testpulse_rate_limited_total{kind="event"})') > limited_before,
        30,
        "testpulse_rate_limited_total to rise after a flood",
    )

    victim = cluster.processes[cluster.specs[-1].node_id]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    instance = f"127.0.0.1:{cluster.specs[-1].port}"
    wait_until(
        lambda: (
            scalar_sum(base, f'up{{instance="{instance}"}}') == 0
            and bool(prom_query(base, f'up{{instance="{instance}"}}')["data"]["result"])
        ),
        30,
        "up == 0 for the killed node",
    )


def test_redis_reconnects_are_counted_after_pubsub_connections_are_killed(cluster: Cluster) -> None:
    base = cluster.prometheus_url
    assert base is not None and cluster.redis_url is not None
    before = scalar_sum(base, "sum(testpulse_redis_reconnects_total)")
    port = urllib.parse.urlparse(cluster.redis_url).port
    subprocess.run(["redis-cli", "-p", str(port), "CLIENT", "KILL", "TYPE", "pubsub"], check=True, capture_output=True)
    wait_until(
        lambda: scalar_sum(base, "sum(testpulse_redis_reconnects_total)") > before,
        30,
        "testpulse_redis_reconnects_total to rise",
    )
