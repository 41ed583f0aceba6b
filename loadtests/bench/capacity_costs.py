"""`python -m loadtests.bench capacity-costs`: the unit costs of the capacity model, measured on a
real cluster (redis-server, `--nodes 2` nodes, nginx with the repo's nginx.conf) on SQLite or on a
throwaway PostgreSQL (`--db postgres`, started with initdb in a temp dir, like the tests do).

Phases, each a known number of events, counted in CPU seconds (not wall time), bytes and exact
operation counts, less the cluster's idle baseline:
  connect    --clients connect without joining: node CPU per connect, RSS per idle client
  join       --clients more connect and join one of --sessions: node CPU per connect+join, RSS per
             joined client, Redis and database operations per join
  presence   --presence-clients join with presence on: Redis operations per presence join
  publish    --rate detections/s into sessions nobody watches: node CPU, Redis operations and
             bytes, database commits and rows per detection
  fanout     --viewers of one session at --rate, and again with --viewers-small: node CPU per
             delivery and per Redis message a node decodes (a two-point fit), nginx CPU per delivery,
             redis-server CPU per published message
  status     --status-sessions sessions paused, resumed and stopped over HTTP: Redis operations per
             status change
  replay     --replay-clients join a session with stored detections from last_seq 0: node CPU per
             replayed detection, database reads per replaying join
  redis      redis-server CPU per PUBLISH / SPUBLISH by number of subscriber connections
             (redis_pubsub_cost.py, on a redis-server of its own)
  size       database bytes per stored detection (SQLite dbstat / pg_total_relation_size)

The results update the section of loadtests/capacity_costs.json for this store (`--write`), which
`python -m loadtests.capacity` reads."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis

from loadtests.bench.capacity_derive import costs, per, write_costs
from loadtests.bench.capacity_probe import (
    Counters,
    PostgresStats,
    Probe,
    ProcessSet,
    node_cpu,
    nodes_with_rooms,
    sqlite_detections_size,
    summary,
)
from loadtests.bench.common import DEFAULT_OUT, environment, log, save, wait_delivered
from loadtests.bench.loadgen import Pool
from loadtests.bench.publisher import Publisher
from loadtests.bench.redis_pubsub_cost import measure_pubsub_costs
from loadtests.bench.systems import REPO_ROOT, TestpulseCluster, sqlite_url, token
from loadtests.bench.wire import EIO_QUERY, Receiver, ViewerState, WireClient, http_session

COSTS_FILE = REPO_ROOT / "loadtests" / "capacity_costs.json"


@contextlib.asynccontextmanager
async def database(kind: str) -> AsyncIterator[tuple[str, Path | None]]:
    """(SQLAlchemy URL, SQLite file or None): a fresh SQLite file, or a throwaway PostgreSQL."""
    if kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="testpulse-capacity-"))
        yield sqlite_url(folder), folder / "bench.db"
        return
    if kind != "postgres":
        raise SystemExit("--db is sqlite or postgres")
    server = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "loadtests.bench.postgres_server", "capacity"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 120)
        if not line:
            raise RuntimeError("the throwaway PostgreSQL did not start (see the output above)")
        yield line.decode().strip(), None
    finally:
        server.stdin.close()
        await asyncio.wait_for(server.wait(), 60)


def postgres_pid(url: str) -> int | None:
    """The postmaster listening on the URL's port: its backends' CPU is the database's cost."""
    port = url.rsplit(":", 1)[-1].split("/", 1)[0]
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "postgres" and "-p" in cmdline and port in cmdline:
            return int(proc.pid)
    return None


class Run:
    def __init__(self, args: argparse.Namespace, system: TestpulseCluster, pool: Pool, probe: Probe) -> None:
        self.args = args
        self.system = system
        self.pool = pool
        self.probe = probe
        self.nodes = sorted(system.node_urls)
        self.phases: dict[str, Counters] = {}

    async def measured(self, name: str, work: Any) -> tuple[Counters, Any]:
        await self.probe.settle_postgres()
        before = await self.probe.snapshot()
        result = await work()
        await self.probe.settle_postgres()
        after = await self.probe.snapshot()
        phase = self.probe.phase(before, after)
        self.phases[name] = phase
        log(f"{name}: {phase['wall']:.1f}s, node cpu {node_cpu(phase, self.nodes):.2f}s")
        return phase, result

    def specs(
        self, count: int, sessions: list[str | None], prefix: str, presence: bool = False
    ) -> list[dict[str, Any]]:
        return [
            {
                "url": self.system.proxy_url,
                "token": token("viewer", f"{prefix}-{i}"),
                "session": sessions[i % len(sessions)],
                "presence": presence,
            }
            for i in range(count)
        ]

    async def connect(self, specs: list[dict[str, Any]]) -> int:
        result = await self.pool.connect(specs, concurrency=self.args.concurrency, within=30)
        if result["failures"]:
            log(f"connect failures: {result['failures']}")
        return int(result["ok"])


async def publish_window(publisher: Publisher, sessions: list[str], rate: float, seconds: float) -> int:
    publisher.reset()
    await publisher.paced(sessions, rate, seconds)
    missing = await publisher.settle(30)
    if missing or publisher.errors:
        log(f"publisher: {missing} acks missing, errors {dict(publisher.errors)}")
    return publisher.detections_acked


async def fanout_phase(run: Run, http: Any, viewers: int, label: str) -> tuple[Counters, dict[str, Any]]:
    args = run.args
    (session,) = await run.system.create_sessions(http, 1)
    joined = await run.connect(run.specs(viewers, [session], f"{label}-viewer"))
    publisher = Publisher(run.system.proxy_url)
    await publisher.connect(http, token("detector", f"{label}-publisher"))
    await run.pool.reset()

    frame = asyncio.create_task(frame_size(http, run.system.proxy_url, session))
    await asyncio.sleep(0.5)

    async def work() -> dict[str, Any]:
        acked = await publish_window(publisher, [session], args.rate, args.seconds)
        done, _ = await wait_delivered(run.pool, dict(publisher.max_seq), 30)
        stats = await run.pool.stats()
        rooms = await nodes_with_rooms(http, run.system.node_urls)
        return {
            "viewers": joined,
            "subscriber_nodes": rooms,
            "acked": acked,
            "received": stats["received"],
            "drained": done,
            "frame_bytes": await frame,
        }

    phase, result = await run.measured(label, work)
    await publisher.close()
    await run.pool.close_all()
    return phase, result


async def frame_size(http: Any, url: str, session: str) -> int:
    """Bytes of one detection_event as a viewer receives it: the Socket.IO text frame plus the
    WebSocket header (2 bytes up to 125, 4 up to 65,535)."""
    async with http.ws_connect(url.rstrip("/") + EIO_QUERY) as ws:
        await ws.receive()  # Engine.IO open
        await ws.send_str("40" + json.dumps({"token": token("viewer", "frame-probe")}))
        await ws.receive()  # Socket.IO connect
        await ws.send_str("420" + json.dumps(["join_session", {"session_id": session}]))
        async for message in ws:
            data = message.data
            if isinstance(data, str) and data == "2":
                await ws.send_str("3")
            elif isinstance(data, str) and data.startswith('42["detection_event"'):
                size = len(data.encode())
                return size + (2 if size <= 125 else 4)
    return 0


async def replay_phase(run: Run, http: Any, session: str, stored: int) -> tuple[Counters, dict[str, Any]]:
    """Clients in this process join `session` from last_seq 0, a few at a time, and wait for the replay."""
    receiver = Receiver()
    clients: list[WireClient] = []
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with gate:
            client = WireClient(run.system.proxy_url, receiver, ViewerState(session))
            await client.connect(http, {"token": token("viewer", f"replay-{i}")})
            answer = await client.call("join_session", {"session_id": session, "last_seq": 0}, within=60)
            if not (isinstance(answer, dict) and answer.get("ok")):
                raise RuntimeError(f"replay join failed: {answer}")
            clients.append(client)
            while client.viewer is not None and client.viewer.last_seq < stored and not client.closed:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def work() -> dict[str, Any]:
        await asyncio.gather(*(one(i) for i in range(run.args.replay_clients)))
        return {"clients": len(clients), "received": receiver.total}

    try:
        return await run.measured("replay", work)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def status_phase(run: Run, http: Any) -> tuple[Counters, int]:
    headers = {"Authorization": f"Bearer {token('admin', 'capacity-admin')}"}
    sessions = await run.system.create_sessions(http, run.args.status_sessions)
    # One viewer per session, so that every node that has one is subscribed to its channel.
    await run.connect(run.specs(len(sessions), list(sessions), "status-viewer"))

    async def work() -> int:
        changes = 0
        for action in ("pause", "resume", "stop"):
            for session in sessions:
                body = {"reason": "capacity"} if action == "stop" else None
                async with http.post(
                    f"{run.system.proxy_url}/api/sessions/{session}/{action}", json=body, headers=headers
                ) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{action} failed: {resp.status} {await resp.text()}")
                changes += 1
        return changes

    phase, changes = await run.measured("status", work)
    await run.pool.close_all()
    return phase, changes


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    async with database(args.db) as (db_url, sqlite_path):
        pool = Pool(args.workers)
        system = TestpulseCluster(args.nodes, db_url)
        log(f"cluster up: {system.describe()}")
        redis_client = aioredis.Redis.from_url(system.cluster.redis_url or "")
        try:
            async with http_session() as http:
                pids = {**system.node_pids(), **system.aux_pids()}
                postmaster = postgres_pid(db_url) if args.db == "postgres" else None
                if postmaster is not None:
                    pids["postgres"] = postmaster
                probe = Probe(
                    http,
                    system.node_urls,
                    ProcessSet(pids, with_children=("nginx", "postgres")),
                    redis_client,
                    PostgresStats(db_url) if args.db == "postgres" else None,
                )
                return await phases(args, system, pool, probe, http, sqlite_path, db_url)
        finally:
            await redis_client.aclose()
            system.stop()
            pool.shutdown()


async def phases(
    args: argparse.Namespace,
    system: TestpulseCluster,
    pool: Pool,
    probe: Probe,
    http: Any,
    sqlite_path: Path | None,
    db_url: str,
) -> dict[str, Any]:
    run = Run(args, system, pool, probe)
    nodes = run.nodes
    # Warm-up: lazily built structures and first-use imports are not charged to anything.
    warm = await system.create_sessions(http, 2)
    await run.connect(run.specs(100, list(warm), "warm"))
    await pool.close_all()
    publisher = Publisher(system.proxy_url)
    await publisher.connect(http, token("detector", "warm-publisher"))
    await publish_window(publisher, list(warm), 100, 2)
    await publisher.close()
    await asyncio.sleep(1)

    log(f"baseline: {args.baseline_seconds:g}s idle")
    run.phases["_baseline"] = dict(await probe.measure_baseline(args.baseline_seconds))

    sessions = await system.create_sessions(http, args.sessions)
    _connect, connected = await run.measured(
        "connect", lambda: run.connect(run.specs(args.clients, [None], "idle-client"))
    )
    _join, joined = await run.measured("join", lambda: run.connect(run.specs(args.clients, list(sessions), "viewer")))
    presence_sessions = await system.create_sessions(http, max(1, args.sessions // 10))
    _presence, presence_joined = await run.measured(
        "presence",
        lambda: run.connect(run.specs(args.presence_clients, list(presence_sessions), "present", presence=True)),
    )
    await pool.close_all()
    await asyncio.sleep(1)

    quiet = await system.create_sessions(http, 1)
    publisher = Publisher(system.proxy_url)
    await publisher.connect(http, token("detector", "capacity-publisher"))
    _publish, published = await run.measured(
        "publish", lambda: publish_window(publisher, list(quiet), args.rate, args.seconds)
    )
    fast_sessions = await system.create_sessions(http, args.fast_sessions)
    fast_rate = args.rate * args.fast_sessions
    await run.measured("publish_fast", lambda: publish_window(publisher, list(fast_sessions), fast_rate, args.seconds))
    await publisher.close()

    big, big_result = await fanout_phase(run, http, args.viewers, "fanout")
    _small, small_result = await fanout_phase(run, http, args.viewers_small, "fanout_small")
    _status, changes = await status_phase(run, http)
    _replay, replay_result = await replay_phase(run, http, quiet[0], published)

    if sqlite_path is not None:
        size = await asyncio.to_thread(sqlite_detections_size, sqlite_path)
    else:
        assert probe.postgres is not None
        size = await probe.postgres.detections_size()

    log("redis pub/sub costs on a redis-server of its own")
    pubsub = await measure_pubsub_costs(
        payload_bytes=int(big["redis.net_in"] / max(1.0, big["node.redis_published"])),
        messages=args.redis_messages,
        subscribers=args.redis_subscribers,
    )
    subscriber_nodes = big_result["subscriber_nodes"]
    measured = costs(
        *(args, nodes, run.phases, connected, joined, presence_joined, published, changes),
        *(subscriber_nodes, big_result["frame_bytes"]),
    )
    return measured | {
        "fanout_runs": {"fanout": big_result, "fanout_small": small_result},
        "replay_run": replay_result,
        "database_size": size | {"bytes_per_detection": per(size["total"], size["rows"])},
        "redis_pubsub": pubsub,
        "phases": {name: summary(phase) for name, phase in run.phases.items()},
        "database_url": db_url.split("@")[-1],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    started = time.monotonic()
    measured = await measure(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "out", "costs_file")}
    measured["settings"] = settings
    document = {"benchmark": "capacity-costs", "environment": env, **measured}
    path = save(args.out, f"capacity-costs-{args.db}", document)
    print(
        json.dumps(summary({k: measured[k] for k in ("node_cpu_us", "proxy_cpu_us", "memory_kb", "bytes")}), indent=2)
    )
    print(json.dumps(summary({k: measured[k] for k in ("redis", "database", "database_size")}), indent=2))
    print(json.dumps(measured["redis_pubsub"], indent=2))
    print(f"\nresults: {path} ({time.monotonic() - started:.0f}s)")
    if args.write:
        store = "postgresql" if args.db == "postgres" else "sqlite"
        write_costs(args.costs_file, store, measured, env)
        print(f"costs: {args.costs_file} [{store}]")
    return document


def register(commands: Any) -> None:
    p = commands.add_parser("capacity-costs", help="unit costs for the capacity model (loadtests/capacity.py)")
    p.add_argument("--db", default="sqlite", help="sqlite (temp file) or postgres (a throwaway server via initdb)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight")
    p.add_argument("--baseline-seconds", type=float, default=8.0, help="idle time measured and subtracted")
    p.add_argument("--clients", type=int, default=1000, help="clients of the connect and of the join phase each")
    p.add_argument("--sessions", type=int, default=100, help="sessions the join phase spreads over")
    p.add_argument("--presence-clients", type=int, default=300)
    p.add_argument("--rate", type=float, default=200.0, help="detections/s of the publish and fan-out phases")
    p.add_argument("--seconds", type=float, default=15.0, help="publishing time of each publish/fan-out phase")
    p.add_argument("--fast-sessions", type=int, default=5, help="sessions of the second publish phase, each at --rate")
    p.add_argument("--viewers", type=int, default=100, help="viewers of the big fan-out")
    p.add_argument("--viewers-small", type=int, default=10, help="viewers of the small fan-out")
    p.add_argument("--status-sessions", type=int, default=50)
    p.add_argument("--replay-clients", type=int, default=20)
    p.add_argument("--redis-messages", type=int, default=50000, help="per subscriber count in the Redis pub/sub test")
    p.add_argument("--redis-subscribers", default="0,1,2,4,8", help="subscriber connections tried")
    p.add_argument("--write", type=int, default=1, help="1: update --costs-file with the results")
    p.add_argument("--costs-file", type=Path, default=COSTS_FILE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.set_defaults(run=run)
