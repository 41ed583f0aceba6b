"""Same-run ratios of the cluster benchmark: each scenario's headline measures for every system,
and testpulse's value divided by each baseline's (stock python-socketio, Node.js socket.io).

A ratio is a plain quotient, testpulse / baseline, whichever way is better; `better` says which
(higher joins/s is better, fewer KB per client is better). A ratio whose baseline value is 0 or
missing is None."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtests.bench.common import table

SUBJECT = "testpulse"


@dataclass(frozen=True)
class Measure:
    scenario: str
    name: str
    better: str  # "higher" or "lower"
    value: Callable[[dict[str, Any]], float | None]


def _routing_decoded(r: dict[str, Any]) -> float | None:
    nodes = r.get("per_node") or {}
    return sum(v["redis_messages_decoded"] for v in nodes.values()) if nodes else None


MEASURES = (
    Measure("storm", "joins/s", "higher", lambda r: r["joins_per_s"]),
    Measure("storm", "connect+join p99 ms", "lower", lambda r: r["connect_join_ms"]["p99"]),
    Measure("storm", "node CPU µs per join", "lower", lambda r: r.get("node_cpu_us_per_join")),
    Measure("fanout", "latency p50 ms", "lower", lambda r: r["latency_ms"]["p50"]),
    Measure("fanout", "latency p99 ms", "lower", lambda r: r["latency_ms"]["p99"]),
    Measure("fanout", "node CPU µs per delivery", "lower", lambda r: r.get("node_cpu_us_per_delivery")),
    Measure("fanout", "publish ack p50 ms", "lower", lambda r: r["publisher"]["ack_ms"]["p50"]),
    Measure("overload", "deliveries/s", "higher", lambda r: r["deliveries_per_s"]),
    Measure("overload", "lost", "lower", lambda r: r["lost"]),
    Measure("overload", "node CPU µs per delivery", "lower", lambda r: r.get("node_cpu_us_per_delivery")),
    Measure("maxrate", "highest sustained deliveries/s", "higher", lambda r: r["max_deliveries_per_s"]),
    Measure("idle", "KB per client", "lower", lambda r: r["kb_per_client"]),
    Measure("routing", "Redis messages decoded, all nodes", "lower", _routing_decoded),
)


def _value(measure: Measure, run: dict[str, Any] | None) -> float | None:
    if not run or "error" in run or "skipped" in run:
        return None
    try:
        value = measure.value(run)
    except (KeyError, TypeError):
        return None
    return value


def ratios(results: dict[str, dict[str, Any]], baselines: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per measure of every scenario that ran: values per system, testpulse / each baseline."""
    rows: list[dict[str, Any]] = []
    for measure in MEASURES:
        runs = results.get(measure.scenario)
        if not runs:
            continue
        values = {kind: _value(measure, run) for kind, run in runs.items()}
        subject = values.get(SUBJECT)
        versus: dict[str, float | None] = {}
        for baseline in baselines:
            other = values.get(baseline)
            versus[baseline] = round(subject / other, 2) if subject is not None and other else None
        rows.append(
            {
                "scenario": measure.scenario,
                "measure": measure.name,
                "better": measure.better,
                "values": values,
                f"{SUBJECT}_vs": versus,
            }
        )
    return rows


def render(rows: list[dict[str, Any]], systems: list[str], baselines: tuple[str, ...]) -> list[str]:
    if not rows:
        return []
    shown = [b for b in baselines if b in systems]
    headers = ["scenario", "measure", "better", *systems, *(f"{SUBJECT}/{b}" for b in shown)]
    body = [
        [
            row["scenario"],
            row["measure"],
            row["better"],
            *(row["values"].get(kind) for kind in systems),
            *(_ratio(row[f"{SUBJECT}_vs"].get(b)) for b in shown),
        ]
        for row in rows
    ]
    title = f"same-run ratios ({SUBJECT} value / baseline value; 'better' says which way is good)"
    return ["", title, table(headers, body)]


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"
