"""The official JavaScript socket.io-client, driven from pytest: tests/interop/driver.mjs as a
subprocess of the machine's node, configured with one JSON line, commanded over stdin and reporting
over stdout (line-delimited JSON).

The driver's clients reconnect only by socket.io-client's own reconnection; this wrapper never asks
them to. `JsClients` starts the driver, asks for reports, waits on conditions over them and always
kills the driver on exit, so a failed test leaves no node process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.cluster import sequence_problems
from support.processes import ROOT

DRIVER = ROOT / "tests" / "interop" / "driver.mjs"
NODE_MODULES = ROOT / "node_modules" / "socket.io-client"

# socket.io-client's `transports` option for the suite's three ways of connecting.
JS_TRANSPORTS: dict[str, list[str]] = {
    "websocket": ["websocket"],
    "polling": ["polling"],
    "upgrade": ["polling", "websocket"],
}

Report = dict[str, Any]


def node_binary() -> str | None:
    return shutil.which("node")


def js_clients_missing() -> str | None:
    """Why the JS clients cannot run here, or None when they can."""
    if node_binary() is None:
        return "node is not installed (run ./scripts/setup)"
    if not NODE_MODULES.is_dir():
        return "node_modules/socket.io-client is missing (run ./scripts/setup)"
    return None


@dataclass(frozen=True)
class ViewerSpec:
    name: str
    transport: str = "websocket"
    url: str | None = None  # another than the driver's shared url (e.g. one node)
    token: str | None = None  # another than the shared viewer token (e.g. another sub)
    presence: bool = False  # join with presence: true

    def config(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "transports": JS_TRANSPORTS[self.transport]}
        if self.url is not None:
            spec["url"] = self.url
        if self.token is not None:
            spec["token"] = self.token
        if self.presence:
            spec["presence"] = True
        return spec


def viewer_mix(count: int, transports: Sequence[str] = ("websocket", "polling", "upgrade")) -> list[ViewerSpec]:
    """`count` viewers named v1..vN, their transports taken in turn from `transports`."""
    return [ViewerSpec(f"v{i + 1}", transports[i % len(transports)]) for i in range(count)]


class JsClients:
    """A running driver: viewers of one session and an optional detector."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.last: Report | None = None
        self.problems: list[str] = []
        self._next_id = 0
        self._answers: dict[int, asyncio.Future[Report]] = {}
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="js driver stdout")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                self.problems.append(line.decode(errors="replace").rstrip())
                continue
            kind = message.get("type")
            if kind == "ready":
                self._ready.set()
            elif kind in ("report", "ack"):
                future = self._answers.pop(message.get("id"), None)
                if kind == "report":
                    self.last = message
                if future is not None and not future.done():
                    future.set_result(message)
            else:
                self.problems.append(json.dumps(message))
        for future in self._answers.values():
            if not future.done():
                future.set_exception(RuntimeError(f"the JS driver exited: {self.stderr_tail()}"))

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:]) or "(no stderr)"
        except OSError:
            return "(no stderr)"

    async def command(self, cmd: str, *, deadline: float = 15.0, **fields: Any) -> Report:
        """Send one command and wait for its answer (a report, or an ack that names any error)."""
        if self.proc.returncode is not None:
            raise RuntimeError(f"the JS driver exited with {self.proc.returncode}: {self.stderr_tail()}")
        self._next_id += 1
        ident = self._next_id
        future: asyncio.Future[Report] = asyncio.get_running_loop().create_future()
        self._answers[ident] = future
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, "id": ident, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        answer = await asyncio.wait_for(future, deadline)
        if answer.get("error"):
            raise AssertionError(f"driver command {cmd} failed: {answer['error']}")
        return answer

    async def report(self, *, full: bool = False) -> Report:
        return await self.command("report", full=full)

    async def stop_publishing(self) -> Report:
        return await self.command("stop_publishing", deadline=30.0)

    async def start_publishing(self) -> Report:
        return await self.command("start_publishing")

    async def pause_reading(self, viewer: str) -> Report:
        return await self.command("pause_reading", viewer=viewer)

    async def resume_reading(self, viewer: str) -> Report:
        return await self.command("resume_reading", viewer=viewer)

    async def emit(self, viewer: str, event: str, payload: Any, *, deadline: float = 15.0) -> Any:
        """`viewer` emits `event` with an ack callback; returns the ack."""
        return (await self.command("emit", deadline=deadline, viewer=viewer, event=event, payload=payload))["answer"]

    async def wait_for(
        self,
        predicate: Callable[[Report], Any],
        *,
        deadline: float = 30.0,
        what: str = "condition",
        interval: float = 0.2,
    ) -> Report:
        """Ask for reports until `predicate(report)` holds; AssertionError with a summary after `deadline`."""
        give_up = time.monotonic() + deadline
        while True:
            report = await self.report()
            if predicate(report):
                return report
            if time.monotonic() >= give_up:
                raise AssertionError(f"JS clients: {what} not reached within {deadline:.0f}s\n{summary(report)}")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.returncode is None and self.proc.stdin is not None:
                self.proc.stdin.write(b'{"cmd":"quit"}\n')
                await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 3.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        finally:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


@asynccontextmanager
async def run_js_clients(
    *,
    url: str,
    session_id: str,
    viewer_token: str,
    detector_token: str | None = None,
    viewers: Sequence[ViewerSpec] = (),
    publish_rate: float | None = None,
    publish_transport: str = "websocket",
    pad_bytes: int = 0,
    options: Mapping[str, Any] | None = None,
    log_dir: Path,
    ready_timeout: float = 15.0,
) -> AsyncIterator[JsClients]:
    """Start the driver with these clients; yields once it has created them (they connect on their own)."""
    node = node_binary()
    assert node is not None, js_clients_missing()
    config: dict[str, Any] = {
        "url": url,
        "session_id": session_id,
        "viewer_token": viewer_token,
        "detector_token": detector_token,
        "viewers": [v.config() for v in viewers],
        "publish": (
            {"rate": publish_rate, "transports": JS_TRANSPORTS[publish_transport], "pad_bytes": pad_bytes}
            if publish_rate
            else None
        ),
        "options": dict(options or {}),
    }
    os.makedirs(log_dir, exist_ok=True)
    stderr_path = log_dir / "js-driver.err"
    with stderr_path.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            node,
            str(DRIVER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=str(ROOT),
            limit=64 * 1024 * 1024,  # a full report holds every seq of every viewer on one line
        )
    clients = JsClients(proc, stderr_path)
    try:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(config) + "\n").encode())
        await proc.stdin.drain()
        await asyncio.wait_for(clients._ready.wait(), ready_timeout)
        yield clients
    finally:
        await clients.close()


# ---- reading reports -----------------------------------------------------------------------------


def all_connected(report: Report) -> bool:
    """Every viewer is connected and joined on its current connection, and the detector is connected."""
    viewers_ok = all(v["connected"] and v["joins"] >= v["connects"] >= 1 for v in report["viewers"])
    detector = report.get("detector")
    return viewers_ok and (detector is None or bool(detector["connected"]))


def hold_exactly(report: Report, last_seq: int) -> bool:
    """Every viewer holds 1..last_seq once each, in order (judged from the driver's counters)."""
    return all(
        v["count"] == last_seq and v["last"] == last_seq and v["duplicates"] == 0 and v["disorder"] == 0
        for v in report["viewers"]
    )


def viewer_problems(report: Report, last_seq: int) -> dict[str, str]:
    """From a full report: each viewer whose seqs are not exactly 1..last_seq, and what is wrong."""
    expected = list(range(1, last_seq + 1))
    found = {v["name"]: sequence_problems(v["seqs"], expected) for v in report["viewers"]}
    return {name: problem for name, problem in found.items() if problem}


def summary(report: Report) -> str:
    """A few lines for a failure message: who is not connected or not complete, and why."""
    lines = []
    for v in report["viewers"]:
        lines.append(
            f"{v['name']}: connected={v['connected']} active={v['active']} transport={v['transport']} "
            f"node={v['node']} connects={v['connects']} joins={v['joins']} count={v['count']} last={v['last']} "
            f"dup={v['duplicates']} disorder={v['disorder']} statuses={v['statuses'][-6:]} "
            f"errors={[(e.get('code'), e.get('reconnect')) for e in v['errors'][-3:]]} "
            f"disconnects={[d['reason'] for d in v['disconnects'][-3:]]} "
            f"connect_errors={v['connect_errors'][-2:]} join_failures={v['join_failures'][-3:]}"
        )
    d = report.get("detector")
    if d is not None:
        lines.append(
            f"detector: connected={d['connected']} active={d['active']} node={d['node']} connects={d['connects']} "
            f"acked={d['acked_count']} last_acked={d['last_acked']} refusals={d['refusals']} "
            f"disconnects={[x['reason'] for x in d['disconnects'][-3:]]}"
        )
    return "\n".join(lines)
