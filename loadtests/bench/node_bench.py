"""`python -m loadtests.bench node`: one testpulse node with persistence, no Redis, no proxy.

(a) detections acked per second from one publisher: singles waiting for each ack, pipelined
    singles (a window in flight), batched `publish_detections`;
(b) detection events delivered per second to N viewers in one room, the publisher pipelining as
    fast as the node acks while holding back when a probe viewer falls more than --lag-max
    detections behind (so the measure is sustained delivery, not queue growth);
(c) publish-to-receive latency (p50/p99 of now - ts at the viewers) at a fixed moderate rate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from loadtests.bench.common import (
    DEFAULT_OUT,
    Profile,
    environment,
    log,
    probe_viewer,
    save,
    table,
    wait_delivered,
    window_result,
)
from loadtests.bench.loadgen import Pool
from loadtests.bench.publisher import Publisher
from loadtests.bench.systems import SingleNode, load_average, sampler_for
from loadtests.bench.wire import http_session


def database_url(value: str | None) -> str | None:
    if value in (None, "", "sqlite"):
        return None
    assert value is not None
    if value.startswith("postgresql://") or value.startswith("postgres://"):
        return "postgresql+asyncpg://" + value.split("://", 1)[1]
    return value


async def run(args: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {"benchmark": "node", "environment": environment(), "settings": vars(args).copy()}
    document["settings"].pop("run", None)
    pool = Pool(args.workers)
    system = SingleNode(database_url(args.db))
    log(f"node up: {system.describe()}")
    document["system"] = system.describe()
    results: dict[str, Any] = {}
    try:
        url = system.node_urls["node1"]
        async with http_session() as http:
            sessions = await system.create_sessions(http, 4)
            publisher = Publisher(url)
            await publisher.connect(http, system.token("detector", "bench-publisher"))

            async def ingest(name: str, session: str, runner: Any) -> None:
                log(f"ingest: {name}")
                publisher.reset()
                load = load_average()
                sampler = sampler_for(system, pool.pids)
                started = time.time()
                await runner(session)
                missing = await publisher.settle(30)
                elapsed = time.time() - started
                results[name] = publisher.summary(elapsed) | {
                    "acks_missing": missing,
                    "loadavg_1m": load[0],
                    "resources": sampler.stop(),
                }

            secs = args.seconds
            await ingest("singles_sequential", sessions[0], lambda s: publisher.sequential(s, secs))
            await ingest("singles_pipelined", sessions[1], lambda s: publisher.windowed(s, secs, window=args.window))
            await ingest(
                "batched",
                sessions[2],
                lambda s: publisher.windowed(s, secs, window=args.batch_inflight, batch=args.batch),
            )

            # (b) fan-out to viewers in one room
            room = sessions[3]
            log(f"fan-out: {args.viewers} viewers join one session")
            specs = [
                {
                    "url": url,
                    "token": system.token("viewer", f"bench-viewer-{i}"),
                    "session": room,
                    "batch_ms": args.batch_ms,
                }
                for i in range(args.viewers - 1)
            ]
            joined = await pool.connect(specs, concurrency=200)
            probe = probe_viewer(url, room)
            await probe.connect(http, {"token": system.token("viewer", "bench-probe")})
            join: dict[str, Any] = {"session_id": room}
            if args.batch_ms:
                join["batch_ms"] = args.batch_ms
            await probe.call("join_session", join)
            results["viewers_joined"] = joined["ok"] + 1
            results["viewer_join_failures"] = joined["failures"]
            assert probe.viewer is not None and probe.receiver is not None
            viewer = probe.viewer

            def lag() -> int:
                return publisher.max_seq.get(room, 0) - viewer.last_seq

            await pool.reset()
            publisher.reset()
            probe.receiver.reset()
            viewer.reset()
            base = {room: 0}
            load = load_average()
            sampler = sampler_for(system, pool.pids)
            profile = (
                Profile(system.node_pids()["node1"], min(5, secs), args.out / "profiles" / "node-fanout.txt")
                if args.profile
                else None
            )
            started = time.time()
            await publisher.windowed(room, secs, window=args.window, lag=lag, lag_max=args.lag_max)
            await publisher.settle(30)
            done, drain = await wait_delivered(pool, dict(publisher.max_seq), 30, [probe])
            duration = time.time() - started
            results["fanout"] = await window_result(pool, publisher, base, duration, [probe])
            results["fanout"] |= {
                "publisher": publisher.summary(duration),
                "drained": done,
                "drain_s": round(drain, 2),
                "loadavg_1m": load[0],
                "resources": sampler.stop(),
                "profile": profile.finish() if profile is not None else None,
            }

            # (c) latency at a fixed moderate rate, same viewers
            log(f"latency: {args.latency_rate}/s for {secs}s to {args.viewers} viewers")
            await pool.reset()
            probe.receiver.reset()
            viewer.reset()
            base = dict(publisher.max_seq)
            publisher.reset()
            load = load_average()
            sampler = sampler_for(system, pool.pids)
            started = time.time()
            achieved = await publisher.paced([room], args.latency_rate, secs)
            await publisher.settle(30)
            done, drain = await wait_delivered(pool, dict(publisher.max_seq), 30, [probe])
            duration = time.time() - started
            results["latency"] = await window_result(pool, publisher, base, duration, [probe])
            results["latency"] |= {
                "rate": args.latency_rate,
                "publisher": publisher.summary(duration),
                "achieved_send_rate": round(achieved, 1),
                "drained": done,
                "drain_s": round(drain, 2),
                "loadavg_1m": load[0],
                "resources": sampler.stop(),
            }
            await probe.close()
            await publisher.close()
            await pool.close_all()
    finally:
        pool.shutdown()
        system.stop()
    document["results"] = results
    document["environment"]["loadavg_at_end"] = load_average()
    print(render(document, args))
    path = save(args.out, "node", document)
    print(f"\nresults: {path}")
    return document


def render(document: dict[str, Any], args: argparse.Namespace) -> str:
    r = document["results"]
    env = document["environment"]
    lines = [
        f"testpulse node benchmark  ({env['command']})",
        f"database: {document['system'].get('database')}  load avg at start {env['loadavg_at_start']}"
        f"  at end {env['loadavg_at_end']}  ({env['cpus']} cpus)",
        *([f"viewers join with batch_ms={args.batch_ms}: detection_batch frames (extension)"] if args.batch_ms else []),
        "",
        "(a) ingest, one publisher",
    ]
    rows = []
    for name, label in (
        ("singles_sequential", "publish_detection, wait for each ack"),
        ("singles_pipelined", f"publish_detection, {args.window} in flight"),
        ("batched", f"publish_detections x{args.batch}, {args.batch_inflight} in flight"),
    ):
        x = r[name]
        rows.append(
            [
                label,
                x["acked_per_s"],
                x["ack_ms"]["p50"],
                x["ack_ms"]["p99"],
                x["errors"] or "-",
                x["resources"]["cpu_pct"].get("node1"),
                x["loadavg_1m"],
            ]
        )
    lines.append(table(["mode", "detections/s", "ack p50 ms", "ack p99 ms", "errors", "node cpu%", "load1"], rows))
    f, lat = r["fanout"], r["latency"]
    lines += ["", f"(b) fan-out to {r['viewers_joined']} viewers in one room; (c) latency at {args.latency_rate}/s"]
    rows = [
        [
            f"(b) max, lag <= {args.lag_max}",
            f["publisher"]["acked_per_s"],
            f["deliveries_per_s"],
            f["latency_ms"]["p50"],
            f["latency_ms"]["p99"],
            f["lost"],
            f["out_of_order"],
            f["viewers_closed"],
            f["resources"]["cpu_pct"].get("node1"),
            f["loadavg_1m"],
        ],
        [
            f"(c) {args.latency_rate}/s paced",
            lat["publisher"]["acked_per_s"],
            lat["deliveries_per_s"],
            lat["latency_ms"]["p50"],
            lat["latency_ms"]["p99"],
            lat["lost"],
            lat["out_of_order"],
            lat["viewers_closed"],
            lat["resources"]["cpu_pct"].get("node1"),
            lat["loadavg_1m"],
        ],
    ]
    headers = ["run", "detections/s", "deliveries/s", "lat p50 ms", "lat p99 ms", "lost", "reordered"]
    lines.append(table([*headers, "closed", "node cpu%", "load1"], rows))
    return "\n".join(lines)


def register(commands: Any) -> None:
    p = commands.add_parser("node", help="one node with persistence: ingest, fan-out, latency")
    p.add_argument(
        "--db",
        default="sqlite",
        help="sqlite (a temp file, default), postgres (a throwaway server, fsync and"
        " synchronous_commit on as in production) or a PostgreSQL URL",
    )
    p.add_argument("--viewers", type=int, default=100, help="viewers in the room for (b) and (c)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    p.add_argument("--window", type=int, default=100, help="pipelined publishes in flight")
    p.add_argument("--batch", type=int, default=100, help="detections per publish_detections")
    p.add_argument("--batch-inflight", type=int, default=1, help="batches in flight")
    p.add_argument("--lag-max", type=int, default=200, help="(b): most detections the probe viewer may lag")
    p.add_argument("--latency-rate", type=float, default=100.0, help="(c): detections per second")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--batch-ms", type=int, default=0, help="viewers join with batch_ms (detection_batch frames)")
    p.add_argument("--profile", action="store_true", help="py-spy the node for 5 s during (b)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.set_defaults(run=run)
