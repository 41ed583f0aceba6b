"""`python -m loadtests.bench churn`: connect-join-leave cycles against one node, per transport.

Each transport gets a fresh node (SQLite in a temp dir, no Redis, no proxy) and python-socketio's
AsyncClient, whose disconnect sends Socket.IO's DISCONNECT and Engine.IO's CLOSE like
socket.io-client. After a warm-up, --cycles cycles run with --concurrency in flight; the node's RSS
is read before, right after the last cycle and --settle seconds later (a departed long-polling
client used to keep its held GET, and the memory under it, until its PING cycle ran out). The
node's open TCP connections and connected-clients gauge are read at the same points, so memory
that stays can be told apart from connections that stay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from loadtests.bench.common import DEFAULT_OUT, _fmt, environment, log, save, table
from loadtests.bench.loadgen import Pool
from loadtests.bench.node_bench import database_url
from loadtests.bench.systems import SingleNode, System, load_average, token
from loadtests.bench.wire import http_session

TRANSPORTS = ("websocket", "polling")
SAMPLE_EVERY = 5.0  # seconds between RSS samples while settling (kept in the JSON)


def node_footprint(pid: int) -> dict[str, Any]:
    """RSS, open file descriptors and TCP connections (by state) of the node process."""
    proc = psutil.Process(pid)
    states: Counter[str] = Counter()
    with contextlib.suppress(psutil.Error):
        states.update(c.status for c in proc.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN)
    return {
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "fds": proc.num_fds(),
        "tcp": sum(states.values()),
        "tcp_states": dict(states),
        "at": time.time(),
    }


async def connected_clients(system: System) -> float | None:
    with contextlib.suppress(Exception):
        async with http_session() as http:
            return (await system.node_counters(http))["node1"]["clients"]
    return None


async def churn_one(transport: str, pool: Pool, args: argparse.Namespace) -> dict[str, Any]:
    system = SingleNode(database_url(args.db), server_repo=args.server_repo)
    log(f"{transport}: node up {system.describe()}")
    try:
        url = system.node_urls["node1"]
        pid = system.node_pids()["node1"]
        async with http_session() as http:
            session = (await system.create_sessions(http, 1))[0]
        tokens = [token("viewer", f"churn-{i}") for i in range(args.concurrency)]

        async def cycles(count: int) -> dict[str, Any]:
            return await pool.churn(url, transport, tokens, session, count, args.leave_timeout)

        if args.warmup:
            log(f"{transport}: warm-up, {args.warmup} cycles")
            await cycles(args.warmup)
        before = node_footprint(pid)
        log(f"{transport}: {args.cycles} connect-join-leave cycles, {args.concurrency} in flight")
        load = load_average()
        run = await cycles(args.cycles)
        elapsed = run["finished_at"] - run["started_at"]
        after = node_footprint(pid) | {"clients": await connected_clients(system)}
        log(f"{transport}: settling {args.settle:.0f}s")
        samples = [after]
        settle_until = time.monotonic() + args.settle
        while (left := settle_until - time.monotonic()) > 0:
            await asyncio.sleep(min(SAMPLE_EVERY, left))
            samples.append(node_footprint(pid))
        settled = samples[-1] | {"clients": await connected_clients(system)}
        samples[-1] = settled
        return {
            "node": system.describe(),
            "cycles": args.cycles,
            "ok": run["ok"],
            "failures": run["failures"],
            "leave_timeouts": run["leave_timeouts"],
            "elapsed_s": round(elapsed, 2),
            "cycles_per_s": round(args.cycles / elapsed, 1) if elapsed > 0 else None,
            "join_ms": run["join_ms"],
            "leave_ms": run["leave_ms"],
            "before": before,
            "after": after,
            "settled": settled,
            "settle_samples": samples,
            "rss_delta_mb": round(settled["rss_mb"] - before["rss_mb"], 1),
            "rss_delta_after_mb": round(after["rss_mb"] - before["rss_mb"], 1),
            "loadavg_1m": load[0],
        }
    finally:
        system.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {"benchmark": "churn", "environment": environment(), "settings": vars(args).copy()}
    document["settings"].pop("run", None)
    pool = Pool(args.workers)
    results: dict[str, Any] = {}
    try:
        for transport in args.transports:
            results[transport] = await churn_one(transport, pool, args)
    finally:
        pool.shutdown()
    document["results"] = results
    document["environment"]["loadavg_at_end"] = load_average()
    print(render(document, args))
    path = save(args.out, "churn", document)
    print(f"\nresults: {path}")
    return document


def render(document: dict[str, Any], args: argparse.Namespace) -> str:
    env = document["environment"]
    settle = f"+{args.settle:.0f} s"
    lines = [
        f"testpulse churn benchmark  ({env['command']})",
        f"{args.cycles} connect-join-leave cycles per transport, {args.concurrency} in flight, after"
        f" {args.warmup} warm-up cycles; one fresh node per transport"
        + (f" from {args.server_repo}" if args.server_repo else ""),
        f"load avg at start {env['loadavg_at_start']}  at end {env['loadavg_at_end']}  ({env['cpus']} cpus)",
        "",
    ]
    headers = [
        "transport",
        "ok",
        "failures",
        "cycles/s",
        "leave p50/p99 ms",
        "leave timeouts",
        "RSS before MB",
        "after",
        settle,
        "delta MB",
        "KB/cycle",
        f"TCP conns before/after/{settle}",
        "clients after",
    ]
    rows = []
    for transport, r in document["results"].items():
        b, a, s = r["before"], r["after"], r["settled"]
        rows.append(
            [
                transport,
                r["ok"],
                r["failures"] or "-",
                r["cycles_per_s"],
                "/".join(_fmt(r["leave_ms"][p]) for p in ("p50", "p99")),
                r["leave_timeouts"],
                b["rss_mb"],
                a["rss_mb"],
                s["rss_mb"],
                f"{r['rss_delta_mb']:+.1f}",
                round(1024 * r["rss_delta_mb"] / r["cycles"], 2) if r["cycles"] else None,
                f"{b['tcp']}/{a['tcp']}/{s['tcp']}",
                a["clients"],
            ]
        )
    lines.append(table(headers, rows))
    lines.append(f"delta: RSS at {settle} minus RSS before the cycles")
    return "\n".join(lines)


def register(commands: Any) -> None:
    p = commands.add_parser("churn", help="connect-join-leave cycles per transport: node RSS before, after, settled")
    p.add_argument("--cycles", type=int, default=5000, help="connect-join-leave cycles per transport")
    p.add_argument("--concurrency", type=int, default=50, help="cycles in flight")
    p.add_argument("--settle", type=float, default=60.0, help="seconds after the last cycle to read RSS again")
    p.add_argument("--warmup", type=int, default=100, help="cycles before the first RSS reading")
    p.add_argument(
        "--transports",
        type=lambda text: [t for t in text.split(",") if t],
        default=list(TRANSPORTS),
        help="comma separated: websocket,polling",
    )
    p.add_argument(
        "--leave-timeout",
        type=float,
        default=5.0,
        help="longest a client waits in disconnect() for its read loop (a held GET) before giving up",
    )
    p.add_argument(
        "--db",
        default="sqlite",
        help="sqlite (a temp file, default), postgres (a throwaway server, fsync and"
        " synchronous_commit on as in production) or a PostgreSQL URL",
    )
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument(
        "--server-repo",
        type=Path,
        default=None,
        help="run the node from this checkout's .venv (e.g. an older commit, for before/after figures)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.set_defaults(run=run)
