"""Load-generator processes: each worker holds a share of the connections in its own (uvloop) event
loop and answers commands from the coordinator over a pipe. Viewers record what they receive in the
worker; the coordinator merges the workers' reports."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from loadtests.bench.wire import (
    Receiver,
    ViewerState,
    WireClient,
    WireError,
    http_session,
    merge_sparse,
    percentiles,
    sparse_from_values,
)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the stdlib loop works, slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _worker_main(conn: Connection) -> None:
    raise_fd_limit()
    install_uvloop()
    asyncio.run(_Worker(conn).serve())


class _Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.receiver = Receiver()
        self.clients: list[WireClient] = []

    async def serve(self) -> None:
        async with http_session() as http:
            self.http = http
            while True:
                command = await asyncio.to_thread(self.conn.recv)
                op = command.pop("op")
                if op == "exit":
                    await self.close_all()
                    self.conn.send(None)
                    return
                answer = await getattr(self, op)(**command)
                self.conn.send(answer)

    async def connect(self, specs: list[dict[str, Any]], concurrency: int, within: float) -> dict[str, Any]:
        """Connect (and join) every spec: {url, token?, session?, batch_ms?, presence?}; timings of connect+join."""
        gate = asyncio.Semaphore(max(1, concurrency))
        latencies: list[float] = []
        failures: Counter[str] = Counter()

        async def one(spec: dict[str, Any]) -> None:
            async with gate:
                session = spec.get("session")
                client = WireClient(spec["url"], self.receiver, ViewerState(session))
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(within):
                        await client.connect(self.http, {"token": spec["token"]} if spec.get("token") else None)
                        if session is not None:
                            join: dict[str, Any] = {"session_id": session}
                            if spec.get("batch_ms"):
                                join["batch_ms"] = spec["batch_ms"]
                            if spec.get("presence"):
                                join["presence"] = True
                            answer = await client.call("join_session", join)
                            if not (isinstance(answer, dict) and answer.get("ok")):
                                error = answer.get("error", {}) if isinstance(answer, dict) else {}
                                raise WireError(f"join_{error.get('code', 'failed')}")
                except WireError as exc:
                    failures[exc.code] += 1
                    await client.close()
                    return
                except TimeoutError:
                    failures["timeout"] += 1
                    await client.close()
                    return
                latencies.append((time.perf_counter() - started) * 1000.0)
                self.clients.append(client)

        started_at = time.time()
        await asyncio.gather(*(one(spec) for spec in specs))
        return {
            "ok": len(latencies),
            "failures": dict(failures),
            "latencies": latencies,
            "started_at": started_at,
            "finished_at": time.time(),
        }

    async def churn(
        self,
        url: str,
        transport: str,
        tokens: list[str],
        session: str,
        cycles: int,
        leave_timeout: float,
        within: float,
    ) -> dict[str, Any]:
        """`cycles` connect-join-leave cycles of python-socketio's own AsyncClient (a real client:
        its disconnect sends Socket.IO's DISCONNECT and Engine.IO's CLOSE, then waits for its read
        loop, which over long-polling means the held GET), one lane per token in flight."""
        import socketio

        remaining = iter(range(cycles))
        joins: list[float] = []
        leaves: list[float] = []
        failures: Counter[str] = Counter()
        leave_timeouts = 0

        async def cycle(token: str) -> None:
            nonlocal leave_timeouts
            sio = socketio.AsyncClient(reconnection=False, handle_sigint=False, http_session=self.http)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(within):
                    await sio.connect(url, auth={"token": token}, transports=[transport], wait_timeout=within)
                    answer = await sio.call("join_session", {"session_id": session}, timeout=within)
                if not (isinstance(answer, dict) and answer.get("ok")):
                    error = answer.get("error", {}) if isinstance(answer, dict) else {}
                    failures[f"join_{error.get('code', 'failed')}"] += 1
                else:
                    joins.append((time.perf_counter() - started) * 1000.0)
            except TimeoutError:
                failures["timeout"] += 1
            except Exception as exc:  # noqa: BLE001 - counted by kind; the run goes on
                failures[type(exc).__name__] += 1
            left = time.perf_counter()
            try:
                await asyncio.wait_for(sio.disconnect(), leave_timeout)
                leaves.append((time.perf_counter() - left) * 1000.0)
            except TimeoutError:
                # The client gave up waiting for its held GET (cancelled, so its TCP connection
                # closes); what the server still holds of it is what the RSS shows.
                leave_timeouts += 1

        async def lane(token: str) -> None:
            for _ in remaining:
                await cycle(token)

        started_at = time.time()
        await asyncio.gather(*(lane(token) for token in tokens))
        return {
            "ok": len(joins),
            "failures": dict(failures),
            "leave_hist": sparse_from_values(leaves),
            "join_hist": sparse_from_values(joins),
            "leave_timeouts": leave_timeouts,
            "started_at": started_at,
            "finished_at": time.time(),
        }

    async def reset(self) -> int:
        self.receiver.reset()
        for client in self.clients:
            if client.viewer is not None:
                client.viewer.reset()
        return len(self.clients)

    async def progress(self) -> dict[str, Any]:
        """Per session: the lowest last seq among this worker's open viewers, and open/closed counts."""
        low: dict[str, int] = {}
        closed = 0
        for client in self.clients:
            viewer = client.viewer
            if client.closed:
                closed += 1
                continue
            if viewer is None or viewer.session_id is None:
                continue
            current = low.get(viewer.session_id)
            if current is None or viewer.last_seq < current:
                low[viewer.session_id] = viewer.last_seq
        return {"low": low, "closed": closed, "received": self.receiver.total}

    async def stats(self) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        viewers = []
        for client in self.clients:
            errors.update(client.errors)
            if client.closed:
                reasons[client.close_reason or "unknown"] += 1
            v = client.viewer
            if v is not None and v.session_id is not None:
                viewers.append((v.session_id, v.count, v.out_of_order, v.duplicates, v.last_seq, client.closed))
        r = self.receiver
        return {
            "received": r.total,
            "frames": r.frames,
            "first_at": r.first_at,
            "last_at": r.last_at,
            "hist": r.hist.sparse(),
            "viewers": viewers,
            "open": sum(1 for c in self.clients if not c.closed),
            "errors": dict(errors),
            "close_reasons": dict(reasons),
        }

    async def close_all(self) -> int:
        clients, self.clients = self.clients, []
        for start in range(0, len(clients), 500):
            await asyncio.gather(*(c.close() for c in clients[start : start + 500]), return_exceptions=True)
        return len(clients)


class WorkerProcesses:
    """Load-generator processes (spawned, each running `target` on its end of a pipe) and the
    coordinator's side: one command per worker, the answers gathered; `exit` ends them."""

    exit_timeout = 10.0  # for a worker to close its clients and answer `exit`

    def __init__(self, target: Callable[[Connection], None], workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(max(1, workers)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def _ask(self, commands: list[dict[str, Any]]) -> list[Any]:
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        return list(await asyncio.gather(*(asyncio.to_thread(pipe.recv) for pipe in self.pipes)))

    def shutdown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send({"op": "exit"})
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll(self.exit_timeout):
                    pipe.recv()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


class Pool(WorkerProcesses):
    """The coordinator's handle on the Socket.IO client workers."""

    def __init__(self, workers: int = 2) -> None:
        super().__init__(_worker_main, workers)

    async def broadcast(self, op: str, **kwargs: Any) -> list[Any]:
        return await self._ask([{"op": op, **kwargs} for _ in self.pipes])

    async def connect(
        self, specs: list[dict[str, Any]], concurrency: int = 2000, within: float = 30.0
    ) -> dict[str, Any]:
        """Spread specs over the workers round-robin; all workers connect at once."""
        shares: list[list[dict[str, Any]]] = [specs[i :: len(self.pipes)] for i in range(len(self.pipes))]
        per_worker = max(1, concurrency // len(self.pipes))
        answers = await self._ask(
            [{"op": "connect", "specs": share, "concurrency": per_worker, "within": within} for share in shares]
        )
        failures: Counter[str] = Counter()
        latencies: list[float] = []
        for answer in answers:
            failures.update(answer["failures"])
            latencies.extend(answer["latencies"])
        return {
            "ok": sum(a["ok"] for a in answers),
            "failures": dict(failures),
            "latencies": latencies,
            "started_at": min(a["started_at"] for a in answers),
            "finished_at": max(a["finished_at"] for a in answers),
        }

    async def churn(
        self,
        url: str,
        transport: str,
        tokens: list[str],
        session: str,
        cycles: int,
        leave_timeout: float,
        within: float = 30.0,
    ) -> dict[str, Any]:
        """Spread the cycles and the lanes (one per token) over the workers; all start at once."""
        n = len(self.pipes)
        commands = [
            {
                "op": "churn",
                "url": url,
                "transport": transport,
                "tokens": tokens[i::n],
                "session": session,
                "cycles": cycles // n + (1 if i < cycles % n else 0),
                "leave_timeout": leave_timeout,
                "within": within,
            }
            for i in range(n)
        ]
        answers = await self._ask(commands)
        failures: Counter[str] = Counter()
        for answer in answers:
            failures.update(answer["failures"])
        joins = merge_sparse(a["join_hist"] for a in answers)
        leaves = merge_sparse(a["leave_hist"] for a in answers)
        return {
            "ok": sum(a["ok"] for a in answers),
            "failures": dict(failures),
            "join_ms": percentiles(joins),
            "leave_ms": percentiles(leaves),
            "leave_timeouts": sum(a["leave_timeouts"] for a in answers),
            "started_at": min(a["started_at"] for a in answers),
            "finished_at": max(a["finished_at"] for a in answers),
        }

    async def reset(self) -> None:
        await self.broadcast("reset")

    async def progress(self) -> dict[str, Any]:
        answers = await self.broadcast("progress")
        low: dict[str, int] = {}
        for answer in answers:
            for session, seq in answer["low"].items():
                low[session] = min(seq, low.get(session, seq))
        return {
            "low": low,
            "closed": sum(a["closed"] for a in answers),
            "received": sum(a["received"] for a in answers),
        }

    async def stats(self) -> dict[str, Any]:
        answers = await self.broadcast("stats")
        errors: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for answer in answers:
            errors.update(answer["errors"])
            reasons.update(answer["close_reasons"])
        firsts = [a["first_at"] for a in answers if a["first_at"]]
        return {
            "received": sum(a["received"] for a in answers),
            "frames": sum(a["frames"] for a in answers),
            "first_at": min(firsts) if firsts else 0.0,
            "last_at": max((a["last_at"] for a in answers), default=0.0),
            "hist": merge_sparse(a["hist"] for a in answers),
            "viewers": [v for a in answers for v in a["viewers"]],
            "open": sum(a["open"] for a in answers),
            "errors": dict(errors),
            "close_reasons": dict(reasons),
        }

    async def close_all(self) -> None:
        await self.broadcast("close_all")
