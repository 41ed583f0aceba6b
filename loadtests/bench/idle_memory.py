"""`python -m loadtests.bench.idle_memory [CLIENTS]`: where an idle client's node memory goes.

Runs one testpulse node in this process (SQLite, no Redis), connects CLIENTS viewers (1,000 by
default) that each join one of 20 sessions from a load-generator process, and diffs tracemalloc
snapshots taken before and after: the allocation sites that grew, in bytes and objects per
client. The bench's `idle` scenario measures RSS; this tells which lines it is made of.
"""

from __future__ import annotations

import asyncio
import gc
import linecache
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

FRAMES = 6  # of each allocation's traceback kept (the top one is shown)
SHOWN = 40


async def measure(clients: int) -> None:
    import uvicorn

    from loadtests.bench.loadgen import Pool
    from loadtests.bench.systems import BENCH_NODE_ENV, System, free_port, token
    from loadtests.bench.wire import http_session

    folder = Path(tempfile.mkdtemp(prefix="testpulse-idle-memory-"))
    os.environ.update(
        {
            **BENCH_NODE_ENV,
            "TESTPULSE_DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'idle.db'}",
            "TESTPULSE_NODE_ID": "node1",
            "TESTPULSE_MIGRATE_ON_START": "true",
        }
    )
    os.environ.pop("TESTPULSE_REDIS_URL", None)
    from testpulse.app import create_app
    from testpulse.settings import Settings
    from testpulse.transport import auto

    app = create_app(Settings.from_env())
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws=auto.uvicorn_ws(app.node.transport),
        ws_ping_interval=None,
        ws_per_message_deflate=False,
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn has no event to wait on
        await asyncio.sleep(0.05)
    node = System()
    node.node_urls = {"node1": f"http://127.0.0.1:{port}"}
    pool = Pool(1)
    try:
        async with http_session() as http:
            sessions = await node.create_sessions(http, 20)

        def specs(count: int, tag: str) -> list[dict[str, Any]]:
            url = node.node_urls["node1"]
            return [
                {"url": url, "token": token("viewer", f"{tag}-{i}"), "session": sessions[i % len(sessions)]}
                for i in range(count)
            ]

        await pool.connect(specs(50, "warm-up"), concurrency=100, within=60)  # lazily built structures
        await pool.close_all()
        await asyncio.sleep(2)
        gc.collect()
        tracemalloc.start(FRAMES)
        before = tracemalloc.take_snapshot()
        joined = await pool.connect(specs(clients, "idle"), concurrency=100, within=120)
        await asyncio.sleep(3)
        gc.collect()
        after = tracemalloc.take_snapshot()
        report(before, after, joined["ok"], app.node.transport)
    finally:
        await pool.close_all()
        pool.shutdown()
        server.should_exit = True
        await serving


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, clients: int, transport: str) -> None:
    own = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(own), after.filter_traces(own)
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    per = max(1, clients)
    print(f"{clients} idle clients (transport {transport}): traced memory grew {total / per:.0f} B per client")
    for stat in stats[:SHOWN]:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1]
        line = linecache.getline(frame.filename, frame.lineno).strip()[:80]
        print(f"{stat.size_diff / per:7.0f} B {stat.count_diff / per:5.2f} obj  {where}:{frame.lineno}  {line}")


def main() -> None:
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))


if __name__ == "__main__":
    main()
