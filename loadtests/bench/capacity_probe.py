"""Flat counter snapshots of a running cluster for the capacity measurements: CPU seconds, RSS and
bytes written of every process (psutil), Redis `INFO commandstats` / `INFO cpu` / `INFO stats`,
the nodes' /metrics, and PostgreSQL's statistics views. A phase is the difference of two
snapshots, less what the cluster does by itself while idle (the baseline rate times the phase's
wall time), so that timers, probes and heartbeats are not charged to the events being counted.

CPU is counted in seconds of CPU time, never as wall-clock throughput: on a shared, noisy 2-core
machine a process's CPU time per event moves far less than its events per second."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import redis.asyncio as aioredis

from loadtests.bench.systems import metric_sum, parse_metrics

Counters = dict[str, float]

# Node metrics summed over the nodes (Prometheus name -> counter key).
NODE_METRICS = {
    "testpulse_detections_stored_total": "node.detections_stored",
    "testpulse_store_batch_size_count": "node.store_transactions",
    "testpulse_redis_published_total": "node.redis_published",
    "testpulse_redis_messages_received_total": "node.redis_received",
    'testpulse_redis_messages_received_total{kind="detections"}': "node.redis_received_detections",
    'testpulse_events_emitted_total{event="detection_event"}': "node.detection_events",
    "testpulse_events_emitted_total": "node.events_emitted",
    "testpulse_replayed_detections_total": "node.replayed",
    "testpulse_connects_total": "node.connects",
}
# Gauges and sizes: reported as they are at the end of a phase, never baseline-corrected.
LEVELS = ("rss.", "level.")


class ProcessSet:
    """The processes whose CPU time, RSS and bytes written are counted, by label (nginx with its workers)."""

    def __init__(self, pids: Mapping[str, int], with_children: tuple[str, ...] = ("nginx",)) -> None:
        self.procs: dict[str, list[psutil.Process]] = {}
        for label, pid in pids.items():
            group: list[psutil.Process] = []
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                group.append(proc)
                if label in with_children:
                    group.extend(proc.children(recursive=True))
            self.procs[label] = group

    def counters(self) -> Counters:
        out: Counters = {}
        for label, group in self.procs.items():
            cpu = rss = written = 0.0
            for proc in group:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                    rss += proc.memory_info().rss
                    written += proc.io_counters().write_chars
            out[f"cpu.{label}"] = cpu
            out[f"rss.{label}"] = rss
            out[f"wchar.{label}"] = written
        return out


async def redis_counters(client: aioredis.Redis) -> Counters:
    """Calls per command, the server's own CPU seconds (all threads) and bytes in and out."""
    out: Counters = {}
    stats = await client.info("commandstats")
    for key, value in stats.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            out[f"redis.cmd.{key.removeprefix('cmdstat_')}"] = float(value.get("calls", 0))
    cpu = await client.info("cpu")
    out["redis.cpu"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    net = await client.info("stats")
    out["redis.net_in"] = float(net["total_net_input_bytes"])
    out["redis.net_out"] = float(net["total_net_output_bytes"])
    memory = await client.info("memory")
    out["level.redis_used_memory"] = float(memory["used_memory"])
    return out


async def node_counters(http: aiohttp.ClientSession, node_urls: Mapping[str, str]) -> Counters:
    """Each metric summed over the nodes ("node.detections_stored") and per node ("node1.detections_stored")."""
    out: Counters = dict.fromkeys(NODE_METRICS.values(), 0.0)
    for node, url in node_urls.items():
        async with http.get(f"{url}/metrics") as resp:
            values = parse_metrics(await resp.text())
        for name, key in NODE_METRICS.items():
            value = metric_sum(values, name)
            out[key] += value
            out[f"{node}.{key.removeprefix('node.')}"] = value
    return out


async def nodes_with_rooms(http: aiohttp.ClientSession, node_urls: Mapping[str, str]) -> int:
    """How many nodes have a session room with members now (each is subscribed to its channel)."""
    count = 0
    for url in node_urls.values():
        async with http.get(f"{url}/metrics") as resp:
            if metric_sum(parse_metrics(await resp.text()), "testpulse_rooms") > 0:
                count += 1
    return count


class PostgresStats:
    """pg_stat_database and pg_stat_user_tables of one database, read over asyncpg."""

    def __init__(self, url: str) -> None:
        self.dsn = url.replace("postgresql+asyncpg://", "postgresql://")

    async def counters(self) -> Counters:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            # Backends report their statistics when idle, at most once a second (PostgreSQL 15+).
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            out: Counters = {}
            row = await conn.fetchrow(
                "SELECT xact_commit, tup_inserted, tup_fetched, tup_returned, tup_updated, tup_deleted,"
                " blks_hit + blks_read AS blocks FROM pg_stat_database WHERE datname = current_database()"
            )
            assert row is not None
            for key, value in row.items():
                out[f"pg.{key}"] = float(value or 0)
            for table in await conn.fetch(
                "SELECT relname, coalesce(seq_scan, 0) AS seq_scan, coalesce(idx_scan, 0) AS idx_scan,"
                " n_tup_ins, n_tup_upd FROM pg_stat_user_tables"
            ):
                name = table["relname"]
                for key in ("seq_scan", "idx_scan", "n_tup_ins", "n_tup_upd"):
                    out[f"pg.table.{name}.{key}"] = float(table[key] or 0)
            return out
        finally:
            await conn.close()

    async def detections_size(self) -> dict[str, float]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS rows, pg_total_relation_size('detections') AS total,"
                " pg_relation_size('detections') AS heap, pg_indexes_size('detections') AS indexes"
                " FROM detections"
            )
            assert row is not None
            return {key: float(value) for key, value in row.items()}
        finally:
            await conn.close()


def sqlite_detections_size(path: Path) -> dict[str, float]:
    """Bytes of the detections table and its indexes from SQLite's dbstat virtual table."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT count(*) FROM detections").fetchone()[0]
        names = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'detections'")]
        sizes = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
        heap = float(sizes.get("detections", 0))
        total = float(sum(sizes.get(name, 0) for name in names))
        return {"rows": float(rows), "total": total, "heap": heap, "indexes": total - heap}
    finally:
        conn.close()


class Probe:
    """Snapshots of everything counted, and phases between them."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        node_urls: Mapping[str, str],
        processes: ProcessSet,
        redis_client: aioredis.Redis | None,
        postgres: PostgresStats | None = None,
    ) -> None:
        self.http = http
        self.node_urls = dict(node_urls)
        self.processes = processes
        self.redis = redis_client
        self.postgres = postgres
        self.baseline: Counters = {}  # idle cost per second of wall time

    async def snapshot(self) -> Counters:
        out: Counters = {"wall": time.monotonic()}
        out |= self.processes.counters()
        if self.redis is not None:
            out |= await redis_counters(self.redis)
        out |= await node_counters(self.http, self.node_urls)
        if self.postgres is not None:
            out |= await self.postgres.counters()
        return out

    async def settle_postgres(self) -> None:
        """Let the nodes' backends flush their pending statistics before a snapshot: a busy backend
        reports at most once a second, an idle one within 10 s (PostgreSQL 15+, PGSTAT_IDLE_INTERVAL)."""
        if self.postgres is not None:
            await asyncio.sleep(11)

    async def measure_baseline(self, seconds: float) -> Counters:
        await self.settle_postgres()
        before = await self.snapshot()
        await asyncio.sleep(seconds)
        await self.settle_postgres()
        after = await self.snapshot()
        wall = after["wall"] - before["wall"]
        self.baseline = {
            k: (after[k] - before.get(k, 0.0)) / wall for k in after if k != "wall" and not k.startswith(LEVELS)
        }
        return self.baseline

    def phase(self, before: Counters, after: Counters, *, idle_wall: float | None = None) -> Counters:
        """after - before, less the baseline for the phase's wall time (or `idle_wall` seconds);
        levels (RSS, memory) as deltas without correction."""
        wall = after["wall"] - before["wall"]
        charged = wall if idle_wall is None else idle_wall
        out: Counters = {"wall": wall}
        for key, value in after.items():
            if key == "wall":
                continue
            delta = value - before.get(key, 0.0)
            if not key.startswith(LEVELS):
                delta -= self.baseline.get(key, 0.0) * charged
            out[key] = delta
        return out


def node_cpu(phase: Mapping[str, float], nodes: list[str]) -> float:
    return sum(phase.get(f"cpu.{node}", 0.0) for node in nodes)


def redis_commands(phase: Mapping[str, float], per: float, floor: float = 0.02) -> dict[str, float]:
    """Redis calls per event by command (those at or above `floor` per event)."""
    out: dict[str, float] = {}
    for key, value in phase.items():
        # INFO is this probe's own reading of Redis, not the cluster's work.
        if key.startswith("redis.cmd.") and key != "redis.cmd.info" and per > 0:
            each = value / per
            if each >= floor:
                out[key.removeprefix("redis.cmd.")] = round(each, 3)
    return dict(sorted(out.items()))


def postgres_ops(phase: Mapping[str, float], per: float, floor: float = 0.005) -> dict[str, float]:
    """PostgreSQL commits, rows and index/sequential scans per event (those at or above `floor`)."""
    out: dict[str, float] = {}
    for key, value in phase.items():
        if key.startswith("pg.") and key != "pg.blocks" and per > 0:
            each = value / per
            if abs(each) >= floor:
                out[key.removeprefix("pg.")] = round(each, 4)
    return dict(sorted(out.items()))


def summary(values: Any) -> Any:
    """Round floats for the JSON file."""
    if isinstance(values, dict):
        return {k: summary(v) for k, v in values.items()}
    if isinstance(values, float):
        return round(values, 4 if abs(values) < 10 else 1)
    return values
