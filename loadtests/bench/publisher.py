"""One publisher connection in the coordinator's loop: sequential, windowed (pipelined) or paced
(open loop at a fixed rate) publishing, with every ack accounted for. Detections carry
`ts = time.time() * 1000` so that viewers measure publish-to-receive latency."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from loadtests.bench.wire import WireClient, WireError, percentiles, sparse_from_values


class Publisher:
    def __init__(self, url: str) -> None:
        self.client = WireClient(url)
        self.reset()

    async def connect(self, http: aiohttp.ClientSession, token: str | None) -> None:
        await self.client.connect(http, {"token": token} if token else None)

    def reset(self) -> None:
        self.requests = 0  # events sent
        self.detections_sent = 0
        self.detections_acked = 0  # accepted (ok) detections
        self.errors: Counter[str] = Counter()  # detections refused, by error code
        self.ack_ms: list[float] = []
        self.max_seq: dict[str, int] = {}  # highest acked seq per session
        self.pending: set[asyncio.Future[Any]] = set()
        self.frame = 0
        self.started_at = time.time()
        self.stopped_sending_at = self.started_at

    def _detection(self, session_id: str | None) -> dict[str, Any]:
        self.frame += 1
        item: dict[str, Any] = {
            "label": "person",
            "confidence": 0.87,
            "bbox": [10.0, 20.0, 30.0, 40.0],
            "frame": self.frame,
            "ts": time.time() * 1000.0,
        }
        if session_id is not None:
            item["session_id"] = session_id
        return item

    async def send(self, session_id: str, batch: int = 0) -> asyncio.Future[Any]:
        """One publish_detection (batch=0) or one publish_detections of `batch` items."""
        if batch:
            event = "publish_detections"
            payload: dict[str, Any] = {
                "session_id": session_id,
                "detections": [self._detection(None) for _ in range(batch)],
            }
            count = batch
        else:
            event, payload, count = "publish_detection", self._detection(session_id), 1
        sent = time.perf_counter()
        self.requests += 1
        self.detections_sent += count
        try:
            future = await self.client.emit_with_ack(event, payload)
        except (WireError, aiohttp.ClientError, OSError, RuntimeError):
            self.errors["send_failed"] += count
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_result(None)
            return failed
        self.pending.add(future)
        future.add_done_callback(lambda f: self._acked(f, session_id, count, sent))
        return future

    def _acked(self, future: asyncio.Future[Any], session_id: str, count: int, sent: float) -> None:
        self.pending.discard(future)
        if future.cancelled():
            self.errors["no_ack_in_time"] += count
            return
        if future.exception() is not None:
            self.errors["connection_closed"] += count
            return
        answer = future.result()
        self.ack_ms.append((time.perf_counter() - sent) * 1000.0)
        if isinstance(answer, dict) and answer.get("ok"):
            self.detections_acked += count
            seq = answer.get("seq", answer.get("last_seq"))
            if isinstance(seq, int) and seq > self.max_seq.get(session_id, 0):
                self.max_seq[session_id] = seq
        else:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            self.errors[str(error.get("code", "bad_answer"))] += count

    async def sequential(self, session_id: str, seconds: float, batch: int = 0) -> None:
        """Send, wait for the ack, repeat."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not self.client.closed:
            future = await self.send(session_id, batch)
            with contextlib.suppress(TimeoutError, WireError):
                await asyncio.wait_for(asyncio.shield(future), 30)
        self.stopped_sending_at = time.time()

    async def windowed(
        self,
        session_id: str,
        seconds: float,
        window: int,
        batch: int = 0,
        lag: Callable[[], int] | None = None,
        lag_max: int = 0,
    ) -> None:
        """Keep `window` events in flight. With `lag`, also hold back while the acked seq runs more
        than `lag_max` detections ahead of what a probe viewer received (delivery flow control)."""
        end = time.perf_counter() + seconds
        gate = asyncio.Semaphore(window)
        while time.perf_counter() < end and not self.client.closed:
            await gate.acquire()
            if lag is not None:
                while lag() > lag_max and time.perf_counter() < end:  # noqa: ASYNC110 - a probe, not an event
                    await asyncio.sleep(0.0005)
            future = await self.send(session_id, batch)
            future.add_done_callback(lambda _f: gate.release())
        self.stopped_sending_at = time.time()

    async def paced(self, sessions: Sequence[str], rate: float, seconds: float, batch: int = 0) -> float:
        """Open loop: `rate` events per second over `sessions` round-robin, never waiting for acks.
        Returns the achieved send rate (events/s)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        total = int(rate * seconds)
        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.client.closed:
                self.errors["connection_closed"] += (total - i) * max(batch, 1)
                break
            await self.send(sessions[i % len(sessions)], batch)
        elapsed = loop.time() - start
        self.stopped_sending_at = time.time()
        return total / elapsed if elapsed > 0 else 0.0

    async def settle(self, within: float = 10.0) -> int:
        """Wait for outstanding acks; returns how many never came."""
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=within)
        missing = len(self.pending)
        for future in list(self.pending):
            future.cancel()  # counted as "no_ack_in_time"
        return missing

    def summary(self, elapsed: float | None = None) -> dict[str, Any]:
        elapsed = elapsed if elapsed is not None else max(1e-9, self.stopped_sending_at - self.started_at)
        return {
            "requests": self.requests,
            "detections_sent": self.detections_sent,
            "detections_acked": self.detections_acked,
            "acked_per_s": round(self.detections_acked / elapsed, 1) if elapsed else None,
            "errors": dict(self.errors),
            "ack_ms": percentiles(sparse_from_values(self.ack_ms)),
            "max_seq": dict(self.max_seq),
            "elapsed_s": round(elapsed, 3),
            "connection": f"closed: {self.client.close_reason}" if self.client.closed else "open",
        }

    async def close(self) -> None:
        await self.client.close()
