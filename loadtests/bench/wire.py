"""A lean Engine.IO v4 / Socket.IO v5 client over aiohttp WebSockets, for load generation.

Only what the benchmarks need: WebSocket transport from the first request (no long-polling, so no
stickiness is needed behind a proxy), the CONNECT packet with an auth payload, events with and
without acks, Engine.IO pings answered with pongs, and a fast path for `detection_event` that
records seq order and publish-to-receive latency without any per-event callback.

Wire format (default namespace "/"):
  server -> client  `0{"sid":..,"pingInterval":..}` open, `2` ping, `40{..}` connected,
                    `44{..}` connect_error, `42["event",data]`, `43<id>[answer]`, `41` disconnect
  client -> server  `3` pong, `40{auth}` connect, `42<id>["event",data]`
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from array import array
from collections.abc import Iterable
from typing import Any

import aiohttp

EIO_QUERY = "/socket.io/?EIO=4&transport=websocket"
DETECTION_PREFIX = '42["detection_event",'
_DETECTION_OFFSET = len(DETECTION_PREFIX)
# Extension (join_session with batch_ms): one frame carries a window of detection_event payloads.
BATCH_PREFIX = '42["detection_batch",'
_BATCH_OFFSET = len(BATCH_PREFIX)

# Latency histogram: 0.1 ms buckets up to 60 s (the last bucket holds everything above).
HIST_PER_MS = 10
HIST_BUCKETS = 60_000 * HIST_PER_MS + 1
GAPS_MAX = 100_000
FIRST_GAP_MAX = 1000


class WireError(Exception):
    """The handshake failed or the server refused the connection; `code` is short and bounded."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Histogram:
    """Counts of latencies in 0.1 ms buckets; cheap to add to, merged as sparse dicts."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = array("I", bytes(HIST_BUCKETS * array("I").itemsize))

    def add(self, ms: float) -> None:
        index = int(ms * HIST_PER_MS)
        if index < 0:
            index = 0
        elif index >= HIST_BUCKETS:
            index = HIST_BUCKETS - 1
        self.counts[index] += 1

    def sparse(self) -> dict[int, int]:
        return {i: c for i, c in enumerate(self.counts) if c}


def merge_sparse(parts: Iterable[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for part in parts:
        for index, count in part.items():
            merged[int(index)] = merged.get(int(index), 0) + count
    return merged


def sparse_from_values(values_ms: Iterable[float]) -> dict[int, int]:
    out: dict[int, int] = {}
    for ms in values_ms:
        index = min(max(int(ms * HIST_PER_MS), 0), HIST_BUCKETS - 1)
        out[index] = out.get(index, 0) + 1
    return out


def percentiles(sparse: dict[int, int], points: Iterable[float] = (50, 99)) -> dict[str, float | None]:
    """Percentiles (ms, bucket upper bound) plus max and count of a sparse histogram."""
    total = sum(sparse.values())
    result: dict[str, float | None] = {}
    ordered = sorted(sparse.items())
    for point in points:
        key = f"p{point:g}"
        if not total:
            result[key] = None
            continue
        rank = max(1, math.ceil(total * point / 100.0))
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                result[key] = round((index + 1) / HIST_PER_MS, 1)
                break
    result["max"] = round((ordered[-1][0] + 1) / HIST_PER_MS, 1) if ordered else None
    result["count"] = total
    return result


class ViewerState:
    """What one viewer saw of the detection stream since the last reset."""

    __slots__ = ("count", "duplicates", "gaps", "last_seq", "out_of_order", "session_id")

    def __init__(self, session_id: str | None) -> None:
        self.session_id = session_id
        self.last_seq = 0
        self.gaps: set[int] = set()  # seqs skipped over, not seen yet (bounded)
        self.reset()

    def reset(self) -> None:
        """Start a new measurement window; the last seq and the gaps are kept to judge order across windows."""
        self.count = 0
        self.out_of_order = 0  # arrived after a higher seq (filled a gap)
        self.duplicates = 0  # seen before

    def see(self, seq: int) -> None:
        last = self.last_seq
        if seq > last:
            # A first seq above 1 leaves a gap only in a young session (joined mid-stream otherwise).
            if seq > last + 1 and (last or seq <= FIRST_GAP_MAX) and len(self.gaps) < GAPS_MAX:
                self.gaps.update(range(last + 1, min(seq, last + 1 + GAPS_MAX)))
            self.last_seq = seq
        elif seq in self.gaps:
            self.gaps.discard(seq)
            self.out_of_order += 1
        else:
            self.duplicates += 1
        self.count += 1


class Receiver:
    """Shared sink for the detection events of many viewers of one process."""

    __slots__ = ("first_at", "frames", "hist", "last_at", "total")

    def __init__(self) -> None:
        self.hist = Histogram()
        self.reset()

    def reset(self) -> None:
        self.hist = Histogram()
        self.total = 0  # detections received
        self.frames = 0  # frames that carried them
        self.first_at = 0.0
        self.last_at = 0.0


_ids = itertools.count(1)
_CONTROL = (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.BINARY)


class WireClient:
    """One Socket.IO connection. `viewer` and `receiver` (optional) record detection events."""

    __slots__ = (
        "_acks",
        "_next_ack",
        "_reader",
        "close_reason",
        "closed",
        "errors",
        "ident",
        "receiver",
        "url",
        "viewer",
        "ws",
    )

    def __init__(self, url: str, receiver: Receiver | None = None, viewer: ViewerState | None = None) -> None:
        self.url = url.rstrip("/")
        self.receiver = receiver
        self.viewer = viewer
        self.ident = next(_ids)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._next_ack = 0
        self.closed = False
        self.close_reason = ""
        self.errors: dict[str, int] = {}  # `error` event codes received

    async def connect(self, http: aiohttp.ClientSession, auth: dict[str, Any] | None, within: float = 15.0) -> None:
        """WebSocket handshake, Engine.IO open, Socket.IO CONNECT; raises WireError."""
        try:
            async with asyncio.timeout(within):
                self.ws = ws = await http.ws_connect(
                    self.url + EIO_QUERY,
                    autoping=True,  # WebSocket-level pings (uvicorn's keepalive) are answered by aiohttp
                    max_msg_size=0,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )
                opened = await ws.receive()
                if opened.type is not aiohttp.WSMsgType.TEXT or not opened.data.startswith("0"):
                    raise WireError("bad_open", str(opened.data)[:80])
                await ws.send_str("40" + (json.dumps(auth, separators=(",", ":")) if auth else ""))
                while True:
                    msg = await ws.receive()
                    if msg.type in _CONTROL:
                        continue
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise WireError("closed_in_handshake", str(msg.type))
                    data = msg.data
                    if data.startswith("40"):
                        break
                    if data.startswith("44"):
                        try:
                            info = json.loads(data[2:])
                            code = (info.get("data") or info).get("code") or "connect_error"
                        except (ValueError, AttributeError):
                            code = "connect_error"
                        raise WireError(str(code)[:40], data[:200])
                    if data == "2":
                        await ws.send_str("3")
        except WireError:
            await self.close()
            raise
        except TimeoutError:
            await self.close()
            raise WireError("timeout") from None
        except aiohttp.WSServerHandshakeError as exc:
            await self.close()
            raise WireError(f"http_{exc.status}") from None
        except (aiohttp.ClientError, OSError) as exc:
            await self.close()
            raise WireError(type(exc).__name__) from None
        self._reader = asyncio.create_task(self._read())

    async def call(self, event: str, data: Any, within: float = 15.0) -> Any:
        """Emit with an ack and wait for the answer (the first ack argument)."""
        return await asyncio.wait_for(await self.emit_with_ack(event, data), within)

    async def emit_with_ack(self, event: str, data: Any) -> asyncio.Future[Any]:
        """Emit with an ack; returns the future of the answer without waiting for it."""
        if self.ws is None or self.closed:
            raise WireError("closed", self.close_reason)
        ack_id = self._next_ack
        self._next_ack += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        await self.ws.send_str(f"42{ack_id}" + json.dumps([event, data], separators=(",", ":")))
        return future

    async def emit(self, event: str, data: Any) -> None:
        if self.ws is None or self.closed:
            raise WireError("closed", self.close_reason)
        await self.ws.send_str("42" + json.dumps([event, data], separators=(",", ":")))

    async def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        receiver, viewer = self.receiver, self.viewer
        text = aiohttp.WSMsgType.TEXT
        try:
            while True:
                msg = await ws.receive()
                if msg.type is not text:
                    if msg.type in _CONTROL:
                        continue
                    self.close_reason = self.close_reason or f"ws_{msg.type.name.lower()}"
                    break
                data = msg.data
                if data.startswith(DETECTION_PREFIX):
                    if viewer is not None:
                        event = json.loads(data[_DETECTION_OFFSET:-1])
                        viewer.see(event["seq"])
                        if receiver is not None:
                            now = time.time()
                            ts = event.get("ts")
                            if ts is not None:
                                receiver.hist.add(now * 1000.0 - ts)
                            receiver.total += 1
                            receiver.frames += 1
                            if not receiver.first_at:
                                receiver.first_at = now
                            receiver.last_at = now
                    continue
                if data.startswith(BATCH_PREFIX):
                    if viewer is not None:
                        batch = json.loads(data[_BATCH_OFFSET:-1])
                        now = time.time()
                        for event in batch["items"]:
                            viewer.see(event["seq"])
                            if receiver is not None:
                                ts = event.get("ts")
                                if ts is not None:
                                    receiver.hist.add(now * 1000.0 - ts)
                                receiver.total += 1
                        if receiver is not None:
                            if not receiver.first_at:
                                receiver.first_at = now
                            receiver.last_at = now
                            receiver.frames += 1
                    continue
                head = data[:2]
                if head == "43":
                    bracket = data.index("[")
                    future = self._acks.pop(int(data[2:bracket]), None)
                    if future is not None and not future.done():
                        answer = json.loads(data[bracket:])
                        future.set_result(answer[0] if answer else None)
                elif data == "2":
                    await ws.send_str("3")
                elif head == "42":
                    if data.startswith('42["error",'):
                        try:
                            code = str(json.loads(data[2:])[1].get("code"))[:40]
                        except (ValueError, AttributeError, IndexError):
                            code = "unparsable"
                        self.errors[code] = self.errors.get(code, 0) + 1
                elif head == "41" or data.startswith("1"):
                    self.close_reason = "server_disconnect"
                    break
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self.close_reason = self.close_reason or type(exc).__name__
        finally:
            self.closed = True
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(WireError("closed", self.close_reason))
            self._acks.clear()
            if not ws.closed:
                await ws.close()

    async def close(self) -> None:
        self.closed = True
        self.close_reason = self.close_reason or "client_close"
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.wait_for(self.ws.close(), 2.0)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


def http_session() -> aiohttp.ClientSession:
    """One session per process; no connection limit (aiohttp's default caps at 100)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
