"""redis-server CPU per PUBLISH and per SPUBLISH by number of subscriber connections, on a
redis-server of its own (loopback, no persistence). The publisher pipelines messages of the size
a node publishes; each subscriber is a raw socket that reads and discards, so that Redis, not the
readers, sets the pace. CPU is Redis's own `INFO cpu` (user + sys) before and after: seconds of
CPU, whatever the wall time on a busy machine.

In a Redis Cluster a session's channel lives on one shard (sharded pub/sub), and the subscribers
of that channel are the nodes with a viewer of that session: this is what one shard pays per
message for M such nodes."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
from typing import Any

import redis.asyncio as aioredis

from testpulse.devtools.cluster import find_binary, free_port

MARKER = b"capacity-end-marker"


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Subscriber:
    def __init__(self, port: int, command: bytes, channel: bytes) -> None:
        self.port, self.command, self.channel = port, command, channel
        self.done = asyncio.Event()

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(_resp(self.command, self.channel))
        await self.writer.drain()
        await self.reader.readuntil(self.channel)  # the subscribe confirmation
        self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        tail = b""
        while True:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                return
            if MARKER in tail + chunk:
                self.done.set()
                tail = b""
            else:
                tail = chunk[-len(MARKER) :]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.writer.close()


async def _cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _one(
    client: aioredis.Redis, port: int, command: str, subscribers: int, payload: bytes, messages: int, batch: int
) -> dict[str, Any]:
    channel = f"capacity:{command}:{subscribers}".encode()
    subs = [
        _Subscriber(port, b"SSUBSCRIBE" if command == "spublish" else b"SUBSCRIBE", channel) for _ in range(subscribers)
    ]
    for sub in subs:
        await sub.start()
    publish = client.spublish if command == "spublish" else client.publish
    for sub in subs:
        sub.done.clear()
    before = await _cpu(client)
    started = time.monotonic()
    for start in range(0, messages, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, messages - start)):
            getattr(pipe, command)(channel, payload)
        await pipe.execute()
    await publish(channel, MARKER)
    await asyncio.gather(*(sub.done.wait() for sub in subs))
    wall = time.monotonic() - started
    cpu = await _cpu(client) - before
    for sub in subs:
        await sub.close()
    return {
        "command": command,
        "subscribers": subscribers,
        "pipelined": batch,
        "messages": messages,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 2),
        "cpu_us_per_message": round(1e6 * cpu / messages, 2),
        "messages_per_cpu_second": round(messages / cpu) if cpu > 0 else None,
    }


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Least squares of cpu_us_per_message = base + per_subscriber x subscribers."""
    xs = [float(r["subscribers"]) for r in rows]
    ys = [float(r["cpu_us_per_message"]) for r in rows]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return {"base_us": round(mean_y - slope * mean_x, 3), "per_subscriber_us": round(slope, 3)}


async def measure_pubsub_costs(payload_bytes: int, messages: int, subscribers: str) -> dict[str, Any]:
    counts = [int(x) for x in subscribers.split(",") if x.strip()]
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="testpulse-redis-cost-")
    proc = await asyncio.create_subprocess_exec(
        *(find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no"),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    client = aioredis.Redis(port=port)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                if await client.ping():
                    break
            await asyncio.sleep(0.05)
        payload = b"x" * max(16, payload_bytes)
        rows = []
        # A node's outbox sends what has queued up as one pipeline: one message per round trip
        # when traffic is light, a hundred when it is heavy. Both bounds are measured.
        variants = [
            ("publish", 100, messages),
            ("publish", 1, messages // 4),
            ("spublish", 100, messages),
            ("spublish", 1, messages // 4),
        ]
        for command, batch, count in variants:
            await _one(client, port, command, 1, payload, 2000, batch)  # warm-up
            for subscribers_ in counts:
                rows.append(await _one(client, port, command, subscribers_, payload, count, batch))
        return {
            "payload_bytes": len(payload),
            "redis_version": (await client.info("server"))["redis_version"],
            "runs": rows,
            "fit": {
                f"{command}_pipelined_{batch}": fit(
                    [r for r in rows if r["command"] == command and r["pipelined"] == batch]
                )
                for command, batch, _ in variants
            },
        }
    finally:
        await client.aclose()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
