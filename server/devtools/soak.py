"""`testpulse loadtest soak`: the steady load for hours, with node restarts and one Redis restart,
and a resource report that says what grows.

While Locust runs the soak locustfile (steady publishes, viewers churning on WebSocket and
long-polling), the Conductor thread of this module restarts a node every `restart_every` seconds
(a drain, then a start on the same port: what a deploy does), restarts Redis once (its data gone,
as a Redis without persistence comes back), and samples every `sample_every` seconds: each node's
RSS and open file descriptors, Redis's used memory and the database's size.

node1 is never restarted: it lives through every other node's restart, every reconnect storm they
cause and the Redis restart, so its series is the one a leak shows in. The restarted nodes' series
start again with every restart; their growth is fitted over their longest life.

Growth per hour is a least-squares slope over the samples after the warm-up (the first tenth of
the run, at least one sample), over the longest stretch without a reset of that resource.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testpulse.devtools.cluster import Cluster

WITNESS = "node1"  # never restarted: see the module docstring
MiB = 1024 * 1024


@dataclass
class Series:
    """One resource's samples: (seconds since start, value), split where the resource was reset."""

    unit: str
    stretches: list[list[tuple[float, float]]] = field(default_factory=lambda: [[]])

    def add(self, at: float, value: float) -> None:
        self.stretches[-1].append((at, value))

    def reset(self) -> None:
        if self.stretches[-1]:
            self.stretches.append([])

    def summary(self, warm_up: float) -> dict[str, Any]:
        usable = [[p for p in s if p[0] >= warm_up] for s in self.stretches]
        longest = max(usable, key=lambda s: s[-1][0] - s[0][0] if len(s) > 1 else -1.0, default=[])
        values = [v for s in self.stretches for _, v in s]
        return {
            "unit": self.unit,
            "first": values[0] if values else None,
            "last": values[-1] if values else None,
            "peak": max(values) if values else None,
            "samples": len(values),
            "resets": len(self.stretches) - 1,
            "growth_per_hour": slope_per_hour(longest),
            # The second half of the same stretch alone: a warm-up that levels off (caches, pools,
            # allocator arenas) shows here as ~0, a leak as the same slope as the whole.
            "growth_per_hour_late": slope_per_hour(later_half(longest)),
            "fitted_over_seconds": round(longest[-1][0] - longest[0][0], 1) if len(longest) > 1 else 0.0,
        }


def later_half(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) < 2:
        return points
    middle = (points[0][0] + points[-1][0]) / 2
    return [p for p in points if p[0] >= middle]


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of value over time, per hour; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return round(3600.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread, 3)


def process_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def redis_used_memory_mib(url: str) -> float | None:
    import redis  # a dependency of the package; imported here so that `loadtest --help` stays light

    try:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            return int(client.info("memory")["used_memory"]) / MiB
        finally:
            client.close()
    except redis.RedisError:
        return None


def database_size_mib(url: str) -> float | None:
    """SQLite: the file with its WAL and shared-memory files; PostgreSQL: pg_database_size."""
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1].split("?", 1)[0])
        sizes = [p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
        return sum(sizes) / MiB if sizes else None
    import asyncpg

    dsn = "postgresql://" + url.split("://", 1)[1]

    async def query() -> float:
        conn = await asyncpg.connect(dsn, timeout=5.0)
        try:
            return float(await conn.fetchval("SELECT pg_database_size(current_database())")) / MiB
        finally:
            await conn.close()

    try:
        return asyncio.run(query())
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None


@dataclass
class Plan:
    run_time: float
    restart_every: float  # 0: no node restarts
    redis_restart_at: float | None  # fraction of the run; None: no Redis restart
    sample_every: float

    def validate(self) -> str | None:
        if self.sample_every <= 0:
            return "--sample-every must be positive"
        if self.restart_every < 0:
            return "--restart-every must be 0 (off) or positive"
        if self.redis_restart_at is not None and not 0 < self.redis_restart_at < 1:
            return "--redis-restart-at must be a fraction between 0 and 1 (exclusive)"
        return None


class Conductor:
    """Restarts and samples on a schedule while Locust runs; `finish()` returns the report."""

    def __init__(self, cluster: Cluster, plan: Plan, results: Path, log: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.plan = plan
        self.results = results
        self.log = log
        self.events: list[dict[str, Any]] = []
        self.series: dict[str, Series] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-conductor", daemon=True)
        self._started = 0.0
        self._samples = (results / "soak-samples.jsonl").open("a")
        self._pids: dict[str, int] = {}
        self._restart_order = [s.node_id for s in cluster.specs if s.node_id != WITNESS]

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def _now(self) -> float:
        return round(time.monotonic() - self._started, 1)

    def _series(self, name: str, unit: str) -> Series:
        return self.series.setdefault(name, Series(unit))

    def _event(self, kind: str, **details: Any) -> None:
        event = {"at_s": self._now(), "kind": kind, **details}
        self.events.append(event)
        self.log(f"testpulse loadtest soak: {kind} {json.dumps(details)} at {event['at_s']:.0f}s")

    def _run(self) -> None:
        plan = self.plan
        next_sample = 0.0
        next_restart = plan.restart_every if plan.restart_every > 0 and self._restart_order else None
        redis_at = plan.redis_restart_at * plan.run_time if plan.redis_restart_at is not None else None
        restarts = 0
        while not self._stop.is_set():
            now = self._now()
            if now >= next_sample:
                self.sample()
                next_sample += plan.sample_every
            if redis_at is not None and now >= redis_at:
                redis_at = None
                self._restart_redis()
            if next_restart is not None and now >= next_restart and now < plan.run_time:
                node_id = self._restart_order[restarts % len(self._restart_order)]
                restarts += 1
                self._restart_node(node_id)
                next_restart += plan.restart_every
            self._stop.wait(0.5)

    def _restart_node(self, node_id: str) -> None:
        began = time.monotonic()
        try:
            self.cluster.restart_node(node_id)
        except Exception as exc:  # noqa: BLE001 - a failed restart is the report's finding
            self._event("node_restart_failed", node=node_id, error=f"{type(exc).__name__}: {exc}")
            return
        self._event("node_restarted", node=node_id, seconds=round(time.monotonic() - began, 1))

    def _restart_redis(self) -> None:
        began = time.monotonic()
        try:
            self.cluster.restart_redis()
        except Exception as exc:  # noqa: BLE001 - as above
            self._event("redis_restart_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._series("redis_used_memory", "MiB").reset()
        self._event("redis_restarted", seconds=round(time.monotonic() - began, 1))

    def sample(self) -> None:
        at = self._now()
        row: dict[str, Any] = {"at_s": at}
        for spec in self.cluster.specs:
            proc = self.cluster.processes.get(spec.node_id)
            if proc is None or proc.poll() is not None:
                continue
            if self._pids.get(spec.node_id) not in (None, proc.pid):
                self._series(f"{spec.node_id}_rss", "MiB").reset()
                self._series(f"{spec.node_id}_fds", "fds").reset()
            self._pids[spec.node_id] = proc.pid
            rss, fds = process_rss_mib(proc.pid), open_fds(proc.pid)
            if rss is not None:
                self._series(f"{spec.node_id}_rss", "MiB").add(at, rss)
                row[f"{spec.node_id}_rss_mib"] = round(rss, 2)
            if fds is not None:
                self._series(f"{spec.node_id}_fds", "fds").add(at, fds)
                row[f"{spec.node_id}_fds"] = fds
        assert self.cluster.redis_url is not None and self.cluster.database_url is not None
        redis_memory = redis_used_memory_mib(self.cluster.redis_url)
        if redis_memory is not None:
            self._series("redis_used_memory", "MiB").add(at, redis_memory)
            row["redis_used_memory_mib"] = round(redis_memory, 3)
        database = database_size_mib(self.cluster.database_url)
        if database is not None:
            self._series("database_size", "MiB").add(at, database)
            row["database_size_mib"] = round(database, 3)
        self._samples.write(json.dumps(row) + "\n")
        self._samples.flush()

    def finish(self, summary: dict[str, Any] | None) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(120)
        self.sample()
        self._samples.close()
        warm_up = max(self.plan.sample_every, 0.1 * self.plan.run_time)
        resources = {name: s.summary(warm_up) for name, s in sorted(self.series.items())}
        report: dict[str, Any] = {
            "plan": vars(self.plan),
            "witness": WITNESS,
            "events": self.events,
            "resources": resources,
            "verdict": verdict(summary, self.events, self.plan, resources),
        }
        (self.results / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
        (self.results / "soak.txt").write_text(render(report) + "\n")
        return report


def verdict(
    summary: dict[str, Any] | None, events: list[dict[str, Any]], plan: Plan, resources: dict[str, Any]
) -> dict[str, Any]:
    """The other scenarios' delivery verdict (gaps, duplicates, loss), plus acked-means-stored: the
    store holds at least as many detections as the detectors saw acknowledged (a publish whose ack
    was lost in a restart may be stored without being counted, never the other way round)."""
    problems: list[str] = []
    if summary is None:
        return {"passed": False, "problems": ["Locust wrote no summary"]}
    delivery = summary.get("delivery", {})
    for key in ("gaps", "lost", "duplicates"):
        if delivery.get(key):
            problems.append(f"{key}: {delivery[key]}")
    acked = int(delivery.get("published") or 0)
    stored = sum(int(v) for v in summary.get("final_seqs", {}).values())
    if acked == 0:
        problems.append("nothing was published")
    if stored < acked:
        problems.append(f"acked {acked} but the store holds {stored}")
    failed_events = [e["kind"] for e in events if e["kind"].endswith("_failed")]
    problems += failed_events
    restarts = sum(1 for e in events if e["kind"] == "node_restarted")
    if plan.restart_every > 0 and plan.restart_every < plan.run_time and restarts == 0:
        problems.append("no node was restarted")
    if plan.redis_restart_at is not None and not any(e["kind"] == "redis_restarted" for e in events):
        problems.append("Redis was not restarted")
    if not summary.get("passed", False):
        problems.append("objectives failed: " + ", ".join(summary.get("failed", [])))
    missing = [
        name
        for name in ("database_size", "redis_used_memory", f"{WITNESS}_rss", f"{WITNESS}_fds")
        if not resources.get(name, {}).get("samples")
    ]
    if missing:
        problems.append("never sampled: " + ", ".join(missing))
    return {
        "passed": not problems,
        "problems": problems,
        "acked": acked,
        "stored": stored,
        "gaps": delivery.get("gaps"),
        "lost": delivery.get("lost"),
        "duplicates": delivery.get("duplicates"),
        "node_restarts": restarts,
    }


def render(report: dict[str, Any]) -> str:
    plan, v = report["plan"], report["verdict"]
    lines = [
        f"soak: {plan['run_time'] / 3600:.2f} h, a node restart every {plan['restart_every']:.0f} s, "
        f"Redis restarted at {plan['redis_restart_at']}, samples every {plan['sample_every']:.0f} s "
        f"({report['witness']} never restarted)",
        f"{'resource':<22} {'first':>10} {'last':>10} {'peak':>10} {'growth/h':>10} {'2nd half/h':>10}  unit"
        "  (fitted over, resets)",
    ]
    for name, r in report["resources"].items():

        def shown(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines.append(
            f"{name:<22} {shown(r['first']):>10} {shown(r['last']):>10} {shown(r['peak']):>10} "
            f"{shown(r['growth_per_hour']):>10} {shown(r.get('growth_per_hour_late')):>10}  {r['unit']:<4}"
            f"  ({r['fitted_over_seconds']:.0f} s, {r['resets']})"
        )
    lines.append(
        f"verdict: {'PASSED' if v['passed'] else 'FAILED'}: acked {v.get('acked')}, stored {v.get('stored')}, "
        f"gaps {v.get('gaps')}, lost {v.get('lost')}, duplicates {v.get('duplicates')}, "
        f"node restarts {v.get('node_restarts')}" + (f"; problems: {'; '.join(v['problems'])}" if v["problems"] else "")
    )
    return "\n".join(lines)
