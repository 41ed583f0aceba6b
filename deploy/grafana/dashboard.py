"""Generates deploy/grafana/dashboards/testpulse.json, the provisioned cluster dashboard.

The JSON is committed (Grafana provisions it as is); edit this file and run
`.venv/bin/python deploy/grafana/dashboard.py` to rewrite it. tests/deploy checks that the
committed JSON is what this file produces and that every metric it queries exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).parent / "dashboards" / "testpulse.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job="testpulse"'
NODE = f'{JOB}, instance=~"$node"'
RATE = "$__rate_interval"


class Layout:
    """Hands out grid positions left to right, top to bottom, on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.newline()
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, **extra}


def timeseries(
    lay: Layout,
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    w: int = 8,
    h: int = 8,
    stack: bool = False,
    description: str = "",
) -> dict[str, Any]:
    return {
        "id": lay.id(),
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 20 if stack else 5,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "showPoints": "never",
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    lay: Layout,
    title: str,
    expr: str,
    *,
    unit: str = "short",
    w: int = 4,
    h: int = 4,
    thresholds: list[tuple[float | None, str]] | None = None,
    description: str = "",
) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {
        "id": lay.id(),
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": [target(expr, instant=True)],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
    }


def heatmap(lay: Layout, title: str, metric: str, *, w: int = 12, h: int = 8, description: str = "") -> dict[str, Any]:
    return {
        "id": lay.id(),
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": [target(f"sum by (le) (rate({metric}_bucket{{{NODE}}}[{RATE}]))", "{{le}}", format="heatmap")],
        "options": {
            "calculate": False,
            "yAxis": {"unit": "s"},
            "color": {"mode": "scheme", "scheme": "Spectral", "steps": 64},
            "cellGap": 1,
            "tooltip": {"show": True, "yHistogram": False},
        },
    }


def node_table(lay: Layout) -> dict[str, Any]:
    return {
        "id": lay.id(),
        "type": "table",
        "title": "Nodes (scrape instance -> TESTPULSE_NODE_ID, version)",
        "datasource": DS,
        "gridPos": lay.place(8, 8),
        "targets": [
            target(f"max by (instance, node, version) (testpulse_node_info{{{JOB}}})", format="table", instant=True)
        ],
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
        "options": {"showHeader": True},
    }


def row(lay: Layout, title: str, *, repeat: str | None = None) -> dict[str, Any]:
    lay.newline()
    panel: dict[str, Any] = {
        "id": lay.id(),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": lay.y, "w": 24, "h": 1},
        "panels": [],
    }
    if repeat:
        panel["repeat"] = repeat
    lay.y += 1
    return panel


def quantile(q: float, metric: str, selector: str, by: str = "") -> str:
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


def quantiles(metric: str, by: str = "") -> list[dict[str, Any]]:
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        target(quantile(q, metric, NODE, by), f"{prefix}p{int(q * 100)}", ref)
        for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
    ]


def overview(lay: Layout) -> list[dict[str, Any]]:
    return [
        row(lay, "Cluster overview"),
        stat(
            lay,
            "Nodes up",
            f"sum(up{{{JOB}}})",
            thresholds=[(None, "red"), (1, "orange"), (2, "green")],
            description="Scrape targets of job testpulse that answer.",
        ),
        stat(lay, "Connected clients", f"sum(testpulse_connected_clients{{{JOB}}})"),
        stat(lay, "Connects/s", f"sum(rate(testpulse_connects_total{{{JOB}}}[{RATE}]))", unit="reqps"),
        stat(
            lay,
            "Refused connects/s",
            f"sum(rate(testpulse_connect_refused_total{{{JOB}}}[{RATE}]))",
            unit="reqps",
            thresholds=[(None, "green"), (1, "orange"), (10, "red")],
        ),
        stat(lay, "Events/s", f"sum(rate(testpulse_events_received_total{{{JOB}}}[{RATE}]))", unit="reqps"),
        stat(
            lay,
            "Server error ratio",
            f'sum(rate(testpulse_events_received_total{{{JOB}, outcome=~"internal|unavailable"}}[{RATE}]))'
            f" / sum(rate(testpulse_events_received_total{{{JOB}}}[{RATE}]))",
            unit="percentunit",
            thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")],
        ),
        timeseries(
            lay,
            "Connected clients by node",
            [target(f"sum by (instance) (testpulse_connected_clients{{{JOB}}})", "{{instance}}")],
            stack=True,
            w=8,
        ),
        timeseries(
            lay,
            "Connected clients by transport",
            [target(f"sum by (transport) (testpulse_connected_clients{{{JOB}}})", "{{transport}}")],
            stack=True,
        ),
        node_table(lay),
        timeseries(
            lay,
            "Connects and disconnects",
            [
                target(f"sum(rate(testpulse_connects_total{{{JOB}}}[{RATE}]))", "connects", "A"),
                target(
                    f"sum by (reason) (rate(testpulse_disconnects_total{{{JOB}}}[{RATE}]))",
                    "disconnect: {{reason}}",
                    "B",
                ),
            ],
            unit="reqps",
        ),
        timeseries(
            lay,
            "Refused connections by code",
            [target(f"sum by (code) (rate(testpulse_connect_refused_total{{{JOB}}}[{RATE}]))", "{{code}}")],
            unit="reqps",
            stack=True,
        ),
        timeseries(
            lay,
            "Rate limited by kind",
            [target(f"sum by (kind) (rate(testpulse_rate_limited_total{{{JOB}}}[{RATE}]))", "{{kind}}")],
            unit="reqps",
        ),
        timeseries(
            lay,
            "Client events received by event",
            [target(f"sum by (event) (rate(testpulse_events_received_total{{{JOB}}}[{RATE}]))", "{{event}}")],
            unit="reqps",
            stack=True,
        ),
        timeseries(
            lay,
            "Server events emitted by event",
            [target(f"sum by (event) (rate(testpulse_events_emitted_total{{{JOB}}}[{RATE}]))", "{{event}}")],
            unit="reqps",
            stack=True,
        ),
        timeseries(
            lay,
            "Errors by outcome",
            [
                target(
                    f'sum by (outcome) (rate(testpulse_events_received_total{{{JOB}, outcome!="ok"}}[{RATE}]))',
                    "{{outcome}}",
                )
            ],
            unit="reqps",
            stack=True,
            description="Non-ok outcomes of client events and HTTP calls, by contract error code.",
        ),
        timeseries(
            lay,
            "Sessions by status",
            [target(f"max by (status) (testpulse_sessions{{{JOB}}})", "{{status}}")],
            description="Cluster-wide (every node reads the store), so max, not sum, across nodes.",
        ),
        timeseries(
            lay,
            "Detections stored and replayed",
            [
                target(f"sum(rate(testpulse_detections_stored_total{{{JOB}}}[{RATE}]))", "stored", "A"),
                target(f"sum(rate(testpulse_replayed_detections_total{{{JOB}}}[{RATE}]))", "replayed", "B"),
                target(f"sum(rate(testpulse_gap_fills_total{{{JOB}}}[{RATE}]))", "gap fills", "C"),
            ],
            unit="ops",
        ),
        timeseries(
            lay,
            "Rooms and memberships",
            [
                target(f"sum(testpulse_rooms{{{JOB}}})", "rooms (node x session)", "A"),
                target(f"sum(testpulse_room_members{{{JOB}}})", "memberships", "B"),
            ],
        ),
    ]


def latency(lay: Layout) -> list[dict[str, Any]]:
    return [
        row(lay, "Latency (nodes selected by $node)"),
        timeseries(
            lay,
            "Handler latency by event (p99)",
            [
                target(
                    quantile(0.99, "testpulse_handler_seconds", NODE, by="event"),
                    "{{event}}",
                )
            ],
            unit="s",
            w=12,
        ),
        heatmap(lay, "Handler latency heatmap", "testpulse_handler_seconds"),
        timeseries(lay, "Delivery lag (store -> emit)", quantiles("testpulse_delivery_lag_seconds"), unit="s", w=12),
        heatmap(lay, "Delivery lag heatmap", "testpulse_delivery_lag_seconds"),
        timeseries(lay, "Store write (group commit)", quantiles("testpulse_store_write_seconds"), unit="s", w=12),
        timeseries(
            lay,
            "Store batch size",
            [
                target(
                    f"sum(rate(testpulse_store_batch_size_sum{{{NODE}}}[{RATE}]))"
                    f" / sum(rate(testpulse_store_batch_size_count{{{NODE}}}[{RATE}]))",
                    "mean detections per transaction",
                    "A",
                ),
                target(
                    quantile(0.99, "testpulse_store_batch_size", NODE),
                    "p99",
                    "B",
                ),
            ],
            w=12,
        ),
    ]


def dependencies(lay: Layout) -> list[dict[str, Any]]:
    return [
        row(lay, "Redis and store health"),
        timeseries(
            lay,
            "Redis publish failures",
            [
                target(
                    f"sum by (instance) (rate(testpulse_redis_publish_failures_total{{{JOB}}}[{RATE}]))", "{{instance}}"
                )
            ],
            unit="ops",
        ),
        timeseries(
            lay,
            "Redis subscription probe age",
            [target(f"max by (instance) (testpulse_redis_probe_age_seconds{{{JOB}}})", "{{instance}}")],
            unit="s",
            description="Seconds since a node last heard its own probe through Redis; grows when it is deaf to others.",
        ),
        timeseries(
            lay,
            "Redis reconnects and messages",
            [
                target(
                    f"sum by (instance) (increase(testpulse_redis_reconnects_total{{{JOB}}}[{RATE}]))",
                    "reconnects {{instance}}",
                    "A",
                ),
                target(
                    f"sum by (kind) (rate(testpulse_redis_messages_received_total{{{JOB}}}[{RATE}]))",
                    "received {{kind}}/s",
                    "B",
                ),
            ],
        ),
        timeseries(
            lay,
            "Store backpressure",
            [
                target(
                    f"sum by (instance) (rate(testpulse_write_queue_rejected_total{{{JOB}}}[{RATE}]))",
                    "rejected {{instance}}",
                    "A",
                ),
            ],
            unit="ops",
            description="Publishes refused with `unavailable` because the store queue was full.",
        ),
        timeseries(
            lay,
            "Slow consumers disconnected",
            [
                target(
                    f"sum by (instance) (rate(testpulse_slow_consumer_disconnects_total{{{JOB}}}[{RATE}]))",
                    "{{instance}}",
                )
            ],
            unit="ops",
        ),
        timeseries(
            lay,
            "Event loop lag",
            [target(f"max by (instance) (testpulse_event_loop_lag_seconds{{{JOB}}})", "{{instance}}")],
            unit="s",
        ),
    ]


def presence_and_tokens(lay: Layout) -> list[dict[str, Any]]:
    return [
        row(lay, "Presence and token refresh"),
        timeseries(
            lay,
            "Presence members per node",
            [target(f"sum by (instance) (testpulse_presence_members{{{NODE}}})", "{{instance}}")],
            description="Distinct (session, sub) pairs each node holds; a sub on two nodes counts on both.",
        ),
        timeseries(
            lay,
            "presence_update frames/s",
            [target(f"sum by (instance) (rate(testpulse_presence_updates_total{{{NODE}}}[{RATE}]))", "{{instance}}")],
            unit="ops",
            description="Coalesced to one round a second per session: a join storm must not make this spike.",
        ),
        timeseries(
            lay,
            "Token refreshes and expiries",
            [
                target(
                    f"sum by (outcome) (rate(testpulse_token_refreshes_total{{{NODE}}}[{RATE}]))",
                    "refresh {{outcome}}",
                    "A",
                ),
                target(f"sum(rate(testpulse_token_expiries_total{{{NODE}}}[{RATE}]))", "expired unrefreshed", "B"),
                target(f"sum(rate(testpulse_token_expiring_sent_total{{{NODE}}}[{RATE}]))", "warned", "C"),
            ],
            unit="ops",
            description="Expiries are connections ended with auth_expired/refresh because no refresh came in time.",
        ),
    ]


def per_node(lay: Layout) -> list[dict[str, Any]]:
    one = 'job="testpulse", instance="$node"'
    return [
        row(lay, "Node $node", repeat="node"),
        timeseries(
            lay, "Clients", [target(f"sum by (transport) (testpulse_connected_clients{{{one}}})", "{{transport}}")], w=6
        ),
        timeseries(
            lay,
            "Events/s by outcome",
            [target(f"sum by (outcome) (rate(testpulse_events_received_total{{{one}}}[{RATE}]))", "{{outcome}}")],
            unit="reqps",
            w=6,
            stack=True,
        ),
        timeseries(
            lay,
            "Handler p99 and delivery lag p99",
            [
                target(
                    quantile(0.99, "testpulse_handler_seconds", one),
                    "handler p99",
                    "A",
                ),
                target(
                    quantile(0.99, "testpulse_delivery_lag_seconds", one),
                    "delivery p99",
                    "B",
                ),
                target(f"max(testpulse_event_loop_lag_seconds{{{one}}})", "event loop lag", "C"),
            ],
            unit="s",
            w=6,
        ),
        timeseries(
            lay,
            "Memory",
            [
                target(f"process_resident_memory_bytes{{{one}}}", "resident memory", "A"),
            ],
            unit="bytes",
            w=3,
        ),
        timeseries(
            lay,
            "CPU",
            [
                target(f"rate(process_cpu_seconds_total{{{one}}}[{RATE}])", "cpu cores", "A"),
            ],
            unit="percentunit",
            w=3,
        ),
    ]


def dashboard() -> dict[str, Any]:
    lay = Layout()
    panels = overview(lay) + latency(lay) + dependencies(lay) + presence_and_tokens(lay) + per_node(lay)
    return {
        "uid": "testpulse-cluster",
        "title": "testpulse cluster",
        "description": "Clients, events, latency, Redis and store health of every testpulse node.",
        "tags": ["testpulse"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                {
                    "name": "node",
                    "label": "node (scrape instance)",
                    "description": "A node is its scrape `instance`; the Nodes table maps it to TESTPULSE_NODE_ID.",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": f"label_values(testpulse_node_info{{{JOB}}}, instance)", "refId": "node"},
                    "definition": f"label_values(testpulse_node_info{{{JOB}}}, instance)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".+",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                    "hide": 0,
                    "regex": "",
                    "options": [],
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
