"""`python -m loadtests.bench capacity-check`: the capacity model's prediction against a measured
run. A cluster of `--nodes 3` (redis-server, nodes, nginx) on SQLite or a throwaway PostgreSQL;
`--sessions` x `--viewers-per-session` viewers join through the proxy; one publisher sends `--rate`
detections/s to each session for `--seconds`. The model (loadtests/capacity.py, with the costs in
loadtests/capacity_costs.json for this store) predicts, for this many nodes, node CPU, deliveries/s,
Redis operations/s and CPU, proxy CPU and database writes/s; the run measures the same over the
publishing window (CPU seconds / wall seconds, not baseline-corrected: the model counts idle work)."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from loadtests.bench.capacity_costs import COSTS_FILE, Run, database, publish_window
from loadtests.bench.capacity_probe import PostgresStats, Probe, ProcessSet, node_cpu, summary
from loadtests.bench.common import DEFAULT_OUT, environment, log, save, table, wait_delivered
from loadtests.bench.loadgen import Pool
from loadtests.bench.publisher import Publisher
from loadtests.bench.systems import TestpulseCluster, token
from loadtests.bench.wire import http_session
from loadtests.capacity import Limits, Workload, load_costs, plan


def compare(predicted: dict[str, float], measured: dict[str, float], tolerance: float) -> list[dict[str, Any]]:
    rows = []
    for key, want in predicted.items():
        got = measured[key]
        error = (got - want) / want if want else None
        rows.append(
            {
                "measure": key,
                "predicted": want,
                "measured": got,
                "error_pct": round(100 * error, 1) if error is not None else None,
                "within": error is not None and abs(error) <= tolerance,
            }
        )
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    store = "postgresql" if args.db == "postgres" else "sqlite"
    work = Workload(args.sessions, args.viewers_per_session, args.rate)
    costs = load_costs(args.costs_file, store, args.redis_fit)
    prediction = plan(work, costs, Limits(placement="spread"), nodes=args.nodes)
    async with database(args.db) as (db_url, _sqlite_path):
        pool = Pool(args.workers)
        system = TestpulseCluster(args.nodes, db_url)
        redis_client = aioredis.Redis.from_url(system.cluster.redis_url or "")
        try:
            async with http_session() as http:
                probe = Probe(
                    http,
                    system.node_urls,
                    ProcessSet({**system.node_pids(), **system.aux_pids()}),
                    redis_client,
                    PostgresStats(db_url) if args.db == "postgres" else None,
                )
                check = Run(args, system, pool, probe)
                sessions = await system.create_sessions(http, args.sessions)
                joined = await check.connect(
                    check.specs(work.viewers, list(sessions), "check-viewer")  # type: ignore[arg-type]
                )
                # One detector per session, as in production; the proxy spreads them over the nodes.
                publishers = [Publisher(system.proxy_url) for _ in sessions]
                for i, publisher in enumerate(publishers):
                    await publisher.connect(http, token("detector", f"check-publisher-{i}"))

                async def publish_all(seconds: float) -> int:
                    acked = await asyncio.gather(
                        *(publish_window(p, [s], work.rate, seconds) for p, s in zip(publishers, sessions, strict=True))
                    )
                    targets = {s: p.max_seq.get(s, 0) for p, s in zip(publishers, sessions, strict=True)}
                    await wait_delivered(pool, targets, 30)
                    return sum(acked)

                await publish_all(3)  # warm-up
                log(f"{joined} viewers joined; publishing {work.detections_per_s:g}/s for {args.seconds:g}s")
                await pool.reset()
                before = await probe.snapshot()
                acked = await publish_all(args.seconds)
                after = await probe.snapshot()
                for publisher in publishers:
                    await publisher.close()
        finally:
            await redis_client.aclose()
            system.stop()
            pool.shutdown()
    window = probe.phase(before, after, idle_wall=0.0)
    wall = window["wall"]
    redis_ops = sum(v for k, v in window.items() if k.startswith("redis.cmd.") and k != "redis.cmd.info")
    measured = {
        "node_cpu_cores": node_cpu(window, sorted(system.node_urls)) / wall,
        "deliveries_per_s": window["node.detection_events"] / wall,
        "redis_messages_per_s": window["node.redis_published"] / wall,
        "redis_ops_per_s": redis_ops / wall,
        "redis_cpu_cores": window["redis.cpu"] / wall,
        "proxy_cores": window.get("cpu.nginx", 0.0) / wall,
        "db_rows_per_s": window["node.detections_stored"] / wall,
        "db_transactions_per_s": window["node.store_transactions"] / wall,
    }
    predicted = {key: getattr(prediction, key) for key in measured}
    # Group-commit batching follows the database's commit latency, which on a shared machine moves
    # from run to run, and a starved publisher may fall short of its rate: the node CPU again, for
    # the rate and the batch this run had.
    batch = window["node.detections_stored"] / max(1.0, window["node.store_transactions"])
    achieved = Workload(work.sessions, work.viewers_per_session, measured["db_rows_per_s"] / work.sessions)
    batched = replace(costs, detections_per_transaction=batch)
    as_run = plan(achieved, batched, Limits(placement="spread"), nodes=args.nodes)
    predicted["node_cpu_cores_at_run_rate_and_batch"] = as_run.node_cpu_cores
    measured["node_cpu_cores_at_run_rate_and_batch"] = measured["node_cpu_cores"]
    rows = compare(predicted, measured, args.tolerance)
    document = {
        "benchmark": "capacity-check",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out", "costs_file")},
        "workload": {"sessions": work.sessions, "viewers_per_session": work.viewers_per_session, "rate": work.rate},
        "viewers_joined": joined,
        "detections_acked": acked,
        "wall_s": wall,
        "detections_per_transaction": batch,
        "per_node_cpu_cores": {n: window[f"cpu.{n}"] / wall for n in sorted(system.node_urls)},
        "comparison": rows,
        "prediction": prediction.__dict__,
        "window": summary(window),
    }
    path = save(args.out, f"capacity-check-{args.db}", document)
    print(
        f"capacity check: {args.nodes} nodes, {store}, {work.sessions} sessions x {work.viewers_per_session} "
        f"viewers x {work.rate:g}/s for {args.seconds:g}s ({joined} joined, {acked} acked, "
        f"load {env['loadavg_at_start']})"
    )
    print(
        table(
            ["measure", "predicted", "measured", "error %", f"within {100 * args.tolerance:.0f}%"],
            [
                [r["measure"], r["predicted"], r["measured"], r["error_pct"], "yes" if r["within"] else "NO"]
                for r in rows
            ],
        )
    )
    print("per node CPU cores: " + json.dumps(summary(document["per_node_cpu_cores"])))
    print(
        f"detections per transaction: {batch:.1f} measured, "
        f"{work.detections_per_s / max(1e-9, prediction.db_transactions_per_s):.1f} predicted"
    )
    print(f"\nresults: {path}")
    return document


def register(commands: Any) -> None:
    p = commands.add_parser("capacity-check", help="the capacity model's prediction against a measured N-node run")
    p.add_argument("--db", default="sqlite", help="sqlite or postgres (a throwaway server via initdb)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--viewers-per-session", type=int, default=25)
    p.add_argument("--rate", type=float, default=100.0, help="detections/s per session")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight")
    p.add_argument("--redis-fit", default="spublish_pipelined_1")
    p.add_argument("--costs-file", type=Path, default=COSTS_FILE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.set_defaults(run=run)
