"""The TestExecution page under load (a benchmark, not a test): headless Chromium on one session's
live view while a publisher holds a steady rate, through nginx and a 3-node cluster.

For each rate it reports detections shown per second (window.testpulse.received), the main
thread's busy share (CDP Performance.getMetrics TaskDuration over wall time), the JS heap after the
run, and the page's gaps and duplicates.

    .venv/bin/python -m loadtests.bench.page_bench --rates 200,1000,5000 --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from testpulse.devtools.cluster import Cluster
from testpulse.domain.auth import issue_token
from testpulse.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "browser" / "driver.mjs"
SECRET = "testpulse-page-bench-secret-0123456789-abcdef"


class Driver:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ids = 0

    async def call(self, cmd: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.ids += 1
        self.proc.stdin.write((json.dumps({"id": self.ids, "cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        while True:
            answer = json.loads(await self.proc.stdout.readline())
            if answer.get("id") == self.ids:
                if not answer["ok"]:
                    raise RuntimeError(answer["error"])
                return answer["result"]


async def publish(base: str, token: str, session_id: str, rate: int, stop: asyncio.Event) -> int:
    """Hold `rate` detections/s with batches every 50 ms, straight to a node."""
    sent = 0
    started = time.monotonic()
    labels = ("person", "car", "bicycle", "dog", "truck")
    async with httpx.AsyncClient(base_url=base, timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
        while not stop.is_set():
            due = int(rate * (time.monotonic() - started)) - sent
            while due > 0:
                n = min(due, 1000)
                items = [
                    {
                        "label": labels[(sent + i) % 5],
                        "confidence": ((sent + i) % 100) / 100,
                        "bbox": [1, 2, 3, 4],
                        "frame": sent + i,
                        "ts": time.time() * 1000,
                    }
                    for i in range(n)
                ]
                response = await http.post(f"/api/sessions/{session_id}/detections", json={"detections": items})
                if response.status_code != 201:
                    await asyncio.sleep(0.05)
                    break
                sent += n
                due -= n
            await asyncio.sleep(0.05)
    return sent


async def measure(cluster: Cluster, driver: Driver, settings: Settings, rate: int, duration: float) -> dict[str, Any]:
    operator = issue_token(settings, role="operator", sub="bench", ttl_seconds=3600 + duration)
    async with httpx.AsyncClient(base_url=cluster.proxy_url, headers={"Authorization": f"Bearer {operator}"}) as http:
        session_id = (await http.post("/api/sessions", json={"name": f"bench {rate}/s"})).json()["session"]["id"]
        await http.post(f"/api/sessions/{session_id}/start")
    viewer = issue_token(settings, role="viewer", sub=f"bench-{rate}", ttl_seconds=3600 + duration)
    page = f"p{rate}"
    await driver.call("open", page=page, url=f"{cluster.proxy_url}/sessions/{session_id}#token={viewer}")
    stop = asyncio.Event()
    detector = issue_token(settings, role="detector", sub="bench", ttl_seconds=3600 + duration)
    publisher = asyncio.create_task(publish(cluster.specs[0].url, detector, session_id, rate, stop))
    await asyncio.sleep(5)  # warm up: the page switches to batches once it sees the rate
    first = await driver.call("metrics", page=page)
    state0 = await driver.call("eval", page=page, js="() => window.testpulse")
    t0 = time.monotonic()
    await asyncio.sleep(duration)
    last = await driver.call("metrics", page=page)
    state1 = await driver.call("eval", page=page, js="() => window.testpulse")
    wall = time.monotonic() - t0
    stop.set()
    sent = await publisher
    await driver.call("close", page=page)
    return {
        "rate": rate,
        "seconds": round(wall, 1),
        "published": sent,
        "shown_per_second": round((state1["received"] - state0["received"]) / wall, 1),
        "main_thread_busy_percent": round(100 * (last["TaskDuration"] - first["TaskDuration"]) / wall, 1),
        "js_heap_mb": round(last["JSHeapUsedSize"] / 1e6, 1),
        "gaps": state1["gaps"],
        "duplicates": state1["duplicates"],
    }


async def main(rates: list[int], duration: float) -> None:
    os.environ.setdefault("TESTPULSE_JWT_SECRET", SECRET)
    os.environ.setdefault("TESTPULSE_RATE_LIMIT_PER_SECOND", "100000")
    os.environ.setdefault("TESTPULSE_RATE_LIMIT_BURST", "100000")
    settings = Settings.from_env({"TESTPULSE_JWT_SECRET": os.environ["TESTPULSE_JWT_SECRET"]})
    run_dir = Path(tempfile.mkdtemp(prefix="testpulse-page-bench-"))
    from testpulse.devtools.cluster import free_port

    cluster = Cluster(
        nodes=3, port=free_port(), run_dir=run_dir, database_url=f"sqlite+aiosqlite:///{run_dir / 'bench.db'}"
    )
    cluster.start()
    proc = await asyncio.create_subprocess_exec(
        "node", str(DRIVER), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        await proc.stdout.readline()
        driver = Driver(proc)
        for rate in rates:
            print(json.dumps(await measure(cluster, driver, settings, rate, duration)), flush=True)
        await driver.call("quit")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="200,1000,5000", help="detections/s, comma-separated")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds measured per rate (default 10 min)")
    args = parser.parse_args()
    asyncio.run(main([int(r) for r in args.rates.split(",")], args.duration))
