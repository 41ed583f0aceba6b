"""deploy/prometheus and deploy/grafana: valid files, rules that fire as meant, and only metrics the code exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from deploy_support import (
    COMPOSE,
    GRAFANA,
    OPERATIONS,
    PROMETHEUS,
    PROMETHEUS_SYNTHETIC,
    alert_rules,
    dashboard_exprs,
    exposed_metric_names,
    label_values_metric,
    load_script,
    promql_metric_names,
)

pytestmark = pytest.mark.deploy

PROMETHEUS_CONFIGS = ["prometheus.yml", "compose.yml", "kubernetes.yml"]
DASHBOARD = GRAFANA / "dashboards" / "testpulse.json"

# What the alerts must cover (the brief of deploy/prometheus/alerts.yml), by the metric that proves it.
REQUIRED_ALERTS = {
    "TestpulseNodeDown": "up",
    "TestpulseNodeWithoutClients": "testpulse_connected_clients",
    "TestpulseHighErrorRatio": "testpulse_events_received_total",
    "TestpulseHandlerLatencyHigh": "testpulse_handler_seconds_bucket",
    "TestpulseDeliveryLagHigh": "testpulse_delivery_lag_seconds_bucket",
    "TestpulseRedisPublishFailures": "testpulse_redis_publish_failures_total",
    "TestpulseRedisSubscriptionStale": "testpulse_redis_probe_age_seconds",
    "TestpulseStoreWriteSlow": "testpulse_store_write_seconds_bucket",
    "TestpulseRateLimitSurge": "testpulse_rate_limited_total",
}


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    return exposed_metric_names() | PROMETHEUS_SYNTHETIC


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def promtool() -> str:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: ./scripts/setup installs Debian's prometheus"
    return binary


def promtool_has_kubernetes_sd() -> bool:
    probe = subprocess.run(
        [promtool(), "check", "config", "kubernetes.yml"], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS
    )
    return "field kubernetes_sd_configs not found" not in probe.stdout + probe.stderr


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


# ---- parsing helpers prove themselves first ---------------------------------------------------------


def test_promql_name_parser_finds_metrics_and_ignores_labels_functions_and_variables():
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(testpulse_handler_seconds_bucket{job="x", '
        'event=~"a|b"}[5m]))) > 0.25 and on (instance) up{instance=~"$node"} == 1 '
        "or absent(process_cpu_seconds_total[$__rate_interval] offset 1h)"
    )
    assert promql_metric_names(expr) == {"testpulse_handler_seconds_bucket", "up", "process_cpu_seconds_total"}


def test_exposed_names_follow_prometheus_client_suffixes():
    names = exposed_metric_names()
    assert {"testpulse_connects_total", "testpulse_handler_seconds_bucket", "testpulse_rooms"} <= names
    assert "testpulse_connects" not in names
    assert "process_resident_memory_bytes" in names


# ---- Prometheus -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROMETHEUS_CONFIGS)
def test_prometheus_config_scrapes_nodes_directly_on_metrics_and_loads_the_alerts(name):
    config = yaml.safe_load((PROMETHEUS / name).read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["testpulse"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    for static in job.get("static_configs", []):
        for address in static["targets"]:
            assert not address.endswith(":8080"), "scrape nodes, not the proxy"


def test_local_prometheus_targets_the_local_cluster_ports():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103"]


def test_compose_prometheus_targets_are_the_compose_node_services():
    compose = yaml.safe_load(COMPOSE.read_text())
    config = yaml.safe_load((PROMETHEUS / "compose.yml").read_text())
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "testpulse")
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    nodes = {name for name, svc in compose["services"].items() if "testpulse" in str(svc.get("image", ""))}
    assert targets == {f"{node}:8000" for node in nodes}
    # instance is rewritten to the service name, which each node also uses as TESTPULSE_NODE_ID
    for node in nodes:
        assert compose["services"][node]["environment"]["TESTPULSE_NODE_ID"] == node


@pytest.mark.parametrize("name", PROMETHEUS_CONFIGS)
def test_promtool_accepts_the_prometheus_config(name):
    if name == "kubernetes.yml" and not promtool_has_kubernetes_sd():
        pytest.skip("this promtool is built without Kubernetes discovery (checked with static targets below)")
    result = run([promtool(), "check", "config", name])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_kubernetes_config_with_discovery_replaced_by_static_targets(tmp_path):
    """Debian's promtool is built without Kubernetes service discovery and refuses
    kubernetes_sd_configs; everything else of the file (relabelling regexes included) is still checked."""
    config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    (tmp_path / "kubernetes.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool(), "check", "config", "kubernetes.yml"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules():
    result = run([promtool(), "check", "rules", "alerts.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_their_unit_tests_expect():
    result = run([promtool(), "test", "rules", "alerts_test.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_required_alert_exists_and_watches_its_metric():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for alert, metric in REQUIRED_ALERTS.items():
        assert alert in rules, f"missing alert {alert}"
        assert metric in promql_metric_names(rules[alert]["expr"]), f"{alert} should use {metric}"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section_in_operations_md():
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations.get("summary"), rule["alert"]
        runbook = annotations.get("runbook_url", "")
        path, _, anchor = runbook.partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in headings, f"docs/operations.md has no section for {rule['alert']}"


def test_alert_rules_use_only_metrics_the_nodes_expose(exposed):
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in its expr"
        assert names <= exposed, f"{rule['alert']}: unknown metrics {sorted(names - exposed)}"


# ---- Grafana ------------------------------------------------------------------------------------------


def test_committed_dashboard_is_what_dashboard_py_generates():
    module = load_script(GRAFANA / "dashboard.py")
    assert DASHBOARD.read_text() == module.render(), "run: .venv/bin/python deploy/grafana/dashboard.py"


def test_dashboard_uses_only_metrics_the_nodes_expose(dashboard, exposed):
    exprs = list(dashboard_exprs(dashboard))
    assert len(exprs) > 20
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr}"
        assert names <= exposed, f"panel {title!r}: unknown metrics {sorted(names - exposed)}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert label_values_metric(variable["definition"]) in exposed


def test_dashboard_covers_the_cluster_overview_latency_health_and_sessions(dashboard):
    used = set().union(*(promql_metric_names(expr) for _, expr in dashboard_exprs(dashboard)))
    for metric in (
        "testpulse_connected_clients",
        "testpulse_connects_total",
        "testpulse_connect_refused_total",
        "testpulse_events_received_total",
        "testpulse_handler_seconds_bucket",
        "testpulse_delivery_lag_seconds_bucket",
        "testpulse_store_write_seconds_bucket",
        "testpulse_redis_publish_failures_total",
        "testpulse_redis_probe_age_seconds",
        "testpulse_sessions",
        "testpulse_node_info",
    ):
        assert metric in used, f"dashboard does not show {metric}"
    assert any(panel["type"] == "heatmap" for panel in dashboard["panels"])


def test_dashboard_has_a_node_variable_over_instance_and_a_repeated_per_node_row(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    node = variables["node"]
    assert node["definition"].endswith(", instance)")
    assert node["multi"] and node["includeAll"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row" and p.get("repeat") == "node"]
    assert len(rows) == 1
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_panel_ids_are_unique_and_fit_the_grid(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]


def test_grafana_provisioning_points_at_the_compose_prometheus_and_dashboard_mount():
    compose = yaml.safe_load(COMPOSE.read_text())
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "testpulse.yml").read_text())
    (provider,) = providers["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
