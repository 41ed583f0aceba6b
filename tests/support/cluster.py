"""A whole cluster under test: `testpulse cluster --json` as a subprocess, viewers that survive node
failures by rejoining with last_seq, a steady publisher, and probes of processes, HTTP and Redis.

The cluster command is what users run, so the tests exercise its real topology: redis-server (or
the test's own, via --redis-url), N `testpulse serve` nodes and nginx with the repo's nginx.conf.
Leaving `run_cluster` SIGTERMs the command alone (it tears its children down in order) and then
proves that the command, every process it started and its whole process group are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from redis import asyncio as aioredis

from support.client import TRANSPORTS, Client, detection, wait_on
from support.processes import ROOT, Process, free_port, spawn, testpulse_command, until_ready, wait_until
from testpulse.domain.auth import issue_token
from testpulse.settings import Settings

SECRET = "testpulse-cluster-tests-secret-0123456789-abcdef"

# Short drains keep teardown fast; rate limits high enough that no test meets them by accident.
CLUSTER_ENV = {
    "TESTPULSE_JWT_SECRET": SECRET,
    "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "3",
    "TESTPULSE_LOG_LEVEL": "info",
    "TESTPULSE_RATE_LIMIT_PER_SECOND": "2000",
    "TESTPULSE_RATE_LIMIT_BURST": "2000",
}

CONTROL_CHANNEL = "testpulse:control"

OpenClient = Callable[..., Awaitable[Client]]
"""open_client(url, role="admin", transport="websocket", name=None) -> a connected recording Client."""


def room_channel(session_id: str) -> str:
    return f"testpulse:room:session:{session_id}"


# ---- processes ---------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` or in its process group."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                parents[int(entry.name)] = stat[1]
                groups[int(entry.name)] = stat[2]
    found = {p for p, g in groups.items() if g == pid and p != pid}
    frontier = [pid, *found]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found and child != pid:
                found.add(child)
                frontier.append(child)
    return found


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


async def wait_gone(pids: Iterable[int], *, deadline: float, what: str) -> None:
    """Wait until none of `pids` runs; AssertionError listing the survivors otherwise."""
    pids = set(pids)
    try:
        await wait_until(lambda: _none_alive(pids), deadline=deadline, what=what)
    except TimeoutError:
        survivors = {p: command_name(p) for p in pids if pid_alive(p)}
        raise AssertionError(f"{what}: still running after {deadline:.0f}s: {survivors}") from None


async def _none_alive(pids: set[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


# ---- the cluster -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    id: str
    url: str
    pid: int


@dataclass
class RunningCluster:
    """What `testpulse cluster --json` printed, plus tokens signed with the cluster's secret."""

    proxy: str
    nodes: list[NodeInfo]
    redis_url: str
    database_url: str
    run_dir: Path
    process: Process
    settings: Settings = field(
        default_factory=lambda: Settings.from_env(
            {"TESTPULSE_JWT_SECRET": SECRET, "TESTPULSE_DATABASE_URL": "sqlite+aiosqlite:///unused.db"}
        )
    )

    def node(self, node_id: str) -> NodeInfo:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    def token(self, role: str = "admin", *, sub: str | None = None, ttl: float = 900.0) -> str:
        return issue_token(self.settings, role=role, sub=sub or f"cluster-{role}", ttl_seconds=ttl)

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role)}"}

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            text = (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def nginx_errors(self, lines: int = 20) -> str:
        """The tail of nginx's error log, without its start-up notices."""
        try:
            text = (self.run_dir / "nginx" / "logs" / "error.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join([line for line in text.splitlines() if "setrlimit" not in line][-lines:]) or "(empty)"

    def logs(self, lines: int = 25) -> str:
        """The tail of every node's log, for failure messages."""
        return "\n".join(f"--- {n.id} ---\n{self.log_tail(n.id, lines)}" for n in self.nodes)

    def children(self) -> set[int]:
        return descendants(self.process.pid)


def cluster_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: ours without TESTPULSE_*, plus the cluster's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTPULSE_")}
    env.update(CLUSTER_ENV)
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _described(output: Path) -> dict[str, Any] | None:
    try:
        lines = output.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("{"):
            return dict(json.loads(line))
    return None


async def start_cluster(
    run_dir: Path,
    database_url: str,
    *,
    nodes: int = 3,
    redis_url: str | None = None,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 60.0,
    port: int | None = None,
    redis_cluster: int | None = None,
) -> RunningCluster:
    """Run `testpulse cluster --json` in a process group of its own and wait for its JSON line.
    `port` is the proxy's (default: a free one): a second cluster on the first one's port is what
    a client that stayed open meets when it reconnects."""
    os.makedirs(run_dir, exist_ok=True)
    output = run_dir / "cluster.out"
    argv = [*testpulse_command(), "cluster", "--json", "--nodes", str(nodes), "--port", str(port or free_port())]
    argv += ["--database-url", database_url, "--run-dir", str(run_dir)]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
    if redis_cluster is not None:
        argv += ["--redis-cluster", str(redis_cluster)]
    process = await spawn("testpulse cluster", argv, log_path=output, env=cluster_env(env), cwd=ROOT)

    async def described() -> bool:
        return _described(output) is not None

    try:
        await until_ready(process, described, deadline=start_timeout)
    except BaseException:
        await stop_cluster_process(process)
        raise
    info = _described(output)
    assert info is not None
    return RunningCluster(
        proxy=info["proxy"],
        nodes=[NodeInfo(n["id"], n["url"], int(n["pid"])) for n in info["nodes"]],
        redis_url=info["redis"],
        database_url=info["database"],
        run_dir=Path(info["run_dir"]),
        process=process,
    )


async def stop_cluster_process(process: Process, deadline: float = 40.0) -> None:
    """SIGTERM the command alone (it stops nodes, nginx and Redis in order), then prove that the
    command, everything it started and its process group are gone."""
    started = descendants(process.pid)
    if process.running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.proc.wait(), deadline)
        except TimeoutError:
            await process.stop(1.0)
            raise AssertionError(f"testpulse cluster did not stop within {deadline:.0f}s") from None
    try:
        await wait_gone(started, deadline=10.0, what="processes started by testpulse cluster")
    finally:
        for pid in started:  # a failed test must not leak a server into the next one
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await process.stop(5.0)  # the group: proves nothing of it is left


@asynccontextmanager
async def run_cluster(
    run_dir: Path,
    database_url: str,
    *,
    nodes: int = 3,
    redis_url: str | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> AsyncIterator[RunningCluster]:
    cluster = await start_cluster(run_dir, database_url, nodes=nodes, redis_url=redis_url, env=env, port=port)
    try:
        yield cluster
    finally:
        await stop_cluster_process(cluster.process)


# ---- HTTP --------------------------------------------------------------------------------------


async def stored_events(base_url: str, headers: Mapping[str, str], session_id: str) -> list[dict[str, Any]]:
    """Every stored detection of a session, in seq order (GET /api/sessions/{id}/events, paged)."""
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base_url, headers=dict(headers), timeout=15.0) as http:
        while True:
            after = events[-1]["seq"] if events else 0
            response = await http.get(f"/api/sessions/{session_id}/events", params={"after_seq": after, "limit": 1000})
            assert response.status_code == 200, response.text
            page = response.json()["events"]
            events += page
            if len(page) < 1000:
                return events


async def http_status(url: str, patience: float = 2.0) -> int | None:
    """The status of GET `url`, or None when nothing answers within `patience` seconds."""
    try:
        async with httpx.AsyncClient(timeout=patience) as http:
            return (await http.get(url)).status_code
    except httpx.HTTPError:
        return None


# ---- checking sequences ------------------------------------------------------------------------


def sequence_problems(seqs: list[int], expected: list[int]) -> str:
    """'' when `seqs` is exactly `expected`; otherwise what is wrong, briefly."""
    if seqs == expected:
        return ""
    seen: set[int] = set()
    duplicates = sorted({s for s in seqs if s in seen or seen.add(s)})  # type: ignore[func-returns-value]
    missing = sorted(set(expected) - set(seqs))
    unexpected = sorted(set(seqs) - set(expected))
    disorder = next((i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1]), None)
    parts = [f"got {len(seqs)} seqs, expected {len(expected)}"]
    if duplicates:
        parts.append(f"duplicates {duplicates[:10]}")
    if missing:
        parts.append(f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:10]}")
    if disorder is not None:
        parts.append(f"out of order at index {disorder}: ...{seqs[max(0, disorder - 3) : disorder + 3]}")
    return "; ".join(parts)


# ---- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    at: float
    node: str
    last_seq: int
    replayed: int


class Viewer:
    """A viewer that stays in one session across failures, as a real client does.

    One python-socketio AsyncClient with its own reconnection (no reconnect logic here): after a
    drain, a node kill or a slow-consumer drop the server closes only the transport (PROTOCOL.md
    1.1), and the client comes back by itself through `url` (the proxy, normally). On every
    `connect` it joins with last_seq = the last seq it saw (0 at first: everything). By the
    contract it then sees every seq once, in order.
    """

    def __init__(
        self,
        name: str,
        url: str,
        token: str,
        session_id: str,
        *,
        transport: str = "websocket",
        retry_delay: float = 0.1,
    ) -> None:
        self.name = name
        self.url = url
        self.token = token
        self.session_id = session_id
        self.transport = transport
        self.retry_delay = retry_delay
        self.seqs: list[int] = []
        self.labels: dict[int, str] = {}
        self.updates: list[dict[str, Any]] = []
        self.status_at: str | None = None  # updated_at of the latest status change held
        self.errors: list[dict[str, Any]] = []
        self.nodes: list[str] = []  # the node of each joined connection, in order
        self.joins: list[Join] = []
        self.disconnects: list[tuple[float, Any]] = []
        self.failures: list[str] = []  # failed joins
        self._changed = asyncio.Event()
        self._connection = 0  # counts `connect` events: a join belongs to one connection
        self._node_now: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sio = self._client()

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    @property
    def node(self) -> str | None:
        """The node of the current (or last) connection."""
        return self.nodes[-1] if self.nodes else None

    @property
    def connected(self) -> bool:
        return bool(self._sio.connected)

    @property
    def connections(self) -> int:
        """How many times the client has connected (its own reconnections included)."""
        return self._connection

    async def start(self, *, deadline: float = 20.0) -> Viewer:
        """Connect and join; returns once the first join is acknowledged."""
        await self._sio.connect(
            self.url, auth={"token": self.token}, transports=TRANSPORTS[self.transport], wait_timeout=5, retry=True
        )
        await self.wait_for(lambda: self.joins, deadline=deadline, what="first join")
        return self

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sio.disconnect()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._sio.shutdown()

    # ---- the client --------------------------------------------------------------------------

    def _client(self) -> socketio.AsyncClient:
        sio = socketio.AsyncClient(
            reconnection=True,
            reconnection_delay=self.retry_delay,
            reconnection_delay_max=1.0,
            handle_sigint=False,
        )

        def on_connect() -> None:
            self._connection += 1
            self._node_now = None
            # Not awaited here: python-socketio reads the join's ack on the task running this handler.
            task = asyncio.create_task(self._join(self._connection), name=f"join {self.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def on_status(data: Any) -> None:
            self._node_now = str(data.get("node"))
            self._changed.set()

        def on_detection(data: Any) -> None:
            if isinstance(data, dict) and data.get("session_id") == self.session_id:
                self.seqs.append(int(data["seq"]))
                self.labels[int(data["seq"])] = str(data.get("label"))
                self._changed.set()

        def on_update(data: Any) -> None:
            if isinstance(data, dict) and data.get("session_id") == self.session_id:
                self.updates.append(data)
                self._hold_status_at(data.get("updated_at"))
                self._changed.set()

        def on_error(data: Any) -> None:
            self.errors.append(data)
            self._changed.set()

        def on_disconnect(reason: Any = None) -> None:
            self.disconnects.append((time.monotonic(), reason))
            self._changed.set()

        sio.on("connect", on_connect)
        sio.on("connection_status", on_status)
        sio.on("detection_event", on_detection)
        sio.on("test_session_update", on_update)
        sio.on("error", on_error)
        sio.on("disconnect", on_disconnect)
        return sio

    def _hold_status_at(self, at: Any) -> None:
        # The node writes every time in one ISO 8601 format, so they compare as strings.
        if isinstance(at, str) and (self.status_at is None or at > self.status_at):
            self.status_at = at

    async def _join(self, connection: int) -> None:
        """Join with last_seq while this connection lasts."""
        # `namespaces`, not `connected`: python-socketio sets the latter only once connect() returns.
        while connection == self._connection and "/" in self._sio.namespaces:
            last_seq = self.last_seq
            request: dict[str, Any] = {"session_id": self.session_id, "last_seq": last_seq}
            if self.status_at is not None:
                request["status_since"] = self.status_at  # the status changes missed while away come too
            try:
                ack = await self._sio.call("join_session", request, timeout=5)
            except (socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError) as exc:
                self.failures.append(f"join: {type(exc).__name__}")
                continue
            if isinstance(ack, dict) and ack.get("ok"):
                self._hold_status_at(ack.get("session", {}).get("updated_at"))
                with contextlib.suppress(AssertionError):
                    await self.wait_for(lambda: self._node_now, deadline=5.0, what="connection_status")
                self.nodes.append(self._node_now or "?")
                self.joins.append(Join(time.monotonic(), self.nodes[-1], last_seq, int(ack.get("replayed", 0))))
                self._changed.set()
                return
            self.failures.append(f"join refused: {ack!r}")
            # A refused join (the node is draining, the store is away) is retried on this connection.
            with contextlib.suppress(AssertionError):
                await self.wait_for(lambda c=connection: c != self._connection, deadline=0.2, what="a new connection")

    # ---- waiting -----------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], *, deadline: float = 10.0, what: str = "condition") -> Any:
        return await wait_on(self._changed, predicate, deadline, lambda: f"{self.name}: {what}; {self.summary()}")

    async def wait_for_seq(self, seq: int, *, deadline: float = 15.0) -> None:
        await self.wait_for(lambda: self.last_seq >= seq, deadline=deadline, what=f"seq {seq}")

    def problems(self, expected_last: int) -> str:
        """'' when this viewer saw exactly seqs 1..expected_last in order."""
        return sequence_problems(self.seqs, list(range(1, expected_last + 1)))

    def summary(self) -> str:
        return (
            f"{len(self.seqs)} seqs (last {self.last_seq}), connections {self._connection}, nodes {self.nodes}, "
            f"joins {len(self.joins)}, "
            f"errors {self.errors[-3:]}, disconnects {len(self.disconnects)}, failures {self.failures[-3:]}"
        )


async def watch(
    session_id: str, urls: Iterable[str], token: str, *, transport: str = "websocket", prefix: str = "viewer"
) -> list[Viewer]:
    """Start one Viewer per URL (URLs may repeat), concurrently; each has joined when this returns."""
    viewers = [
        Viewer(f"{prefix}{i}", url, token, session_id, transport=transport) for i, url in enumerate(urls, start=1)
    ]
    try:
        await asyncio.gather(*(v.start() for v in viewers))
    except BaseException:
        await asyncio.gather(*(v.close() for v in viewers))
        raise
    return viewers


Watch = Callable[..., Awaitable[list[Viewer]]]
"""viewers(session_id, urls, transport="websocket") -> joined Viewers."""


class Publisher:
    """Publishes detections one at a time (each waits for its ack) until stopped; records the acked seqs."""

    def __init__(self, client: Client, session_id: str, *, interval: float = 0.0, label: str = "det") -> None:
        self.client = client
        self.session_id = session_id
        self.interval = interval
        self.label = label
        self.acked: list[int] = []
        self.refusals: list[Any] = []
        self.acked_at: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name=f"publisher {self.label}")
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            payload = {"session_id": self.session_id, **detection(i, label=f"{self.label}-{i}")}
            try:
                ack = await self.client.call("publish_detection", payload, deadline=10.0)
            except socketio.exceptions.TimeoutError:
                self.refusals.append("timeout")
                continue
            if isinstance(ack, dict) and ack.get("ok"):
                self.acked.append(int(ack["seq"]))
                self.acked_at.append(time.monotonic())
            else:
                self.refusals.append(ack)
            if self.interval:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)

    async def wait_acked(self, count: int, *, deadline: float = 15.0) -> None:
        async def enough() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError(f"publisher {self.label} stopped early")
            return len(self.acked) >= count

        await wait_until(enough, deadline=deadline, what=f"{count} acked detections of {self.label}")

    async def stop(self) -> list[int]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.acked


async def finish_publishing(publisher: Publisher, watching: list[Viewer], cluster: RunningCluster) -> int:
    """Stop publishing; every viewer must then hold exactly the seqs 1..last, the same the store holds,
    without having been disconnected (a Redis fault must not move anyone); the last seq."""
    acked = await publisher.stop()
    assert acked == list(range(1, len(acked) + 1)), publisher.refusals
    for viewer in watching:
        await viewer.wait_for_seq(acked[-1], deadline=15)
    # A fence: a duplicate of anything before it would arrive before it.
    payload = {"session_id": publisher.session_id, **detection(0, label="fence")}
    fence = int((await publisher.client.ok("publish_detection", payload))["seq"])
    for viewer in watching:
        await viewer.wait_for_seq(fence)
        assert not viewer.problems(fence), f"{viewer.name}: {viewer.problems(fence)}; {viewer.summary()}"
        assert not viewer.errors and not viewer.disconnects and len(viewer.joins) == 1, viewer.summary()
    stored = [e["seq"] for e in await stored_events(cluster.proxy, cluster.headers("viewer"), publisher.session_id)]
    assert stored == list(range(1, fence + 1))
    return fence


# ---- Redis -------------------------------------------------------------------------------------


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


async def control_subscribers(url: str) -> int:
    """PUBSUB NUMSUB of the control channel: how many nodes listen to the cluster right now."""
    async with redis_client(url) as redis:
        counts = await redis.pubsub_numsub(CONTROL_CHANNEL)
    return int(counts[0][1])


# ---- fixtures (imported by the conftests of tests/cluster and tests/faults) ----------------------


@pytest.fixture
async def open_client(cluster: RunningCluster) -> AsyncIterator[OpenClient]:
    """open_client(url, role="admin", transport="websocket", name=None) -> a connected recording Client
    that has received its connection_status; every one is disconnected after the test."""
    clients: list[Client] = []

    async def make(url: str, role: str = "admin", *, transport: str = "websocket", name: str | None = None) -> Client:
        client = Client(name or f"{role}-{len(clients)}")
        clients.append(client)
        await client.connect(url, token=cluster.token(role), transport=transport)
        await client.wait_for_event("connection_status")
        return client

    yield make

    async def close(client: Client) -> None:
        with contextlib.suppress(Exception):
            await client.disconnect()

    await asyncio.gather(*(close(c) for c in clients))


@pytest.fixture
async def viewers(cluster: RunningCluster) -> AsyncIterator[Watch]:
    """viewers(session_id, urls, transport="websocket") -> joined Viewers (one per URL), closed after the test."""
    made: list[Viewer] = []

    async def make(session_id: str, urls: list[str], *, transport: str = "websocket") -> list[Viewer]:
        started = await watch(session_id, urls, cluster.token("viewer"), transport=transport, prefix=f"v{len(made)}-")
        made.extend(started)
        return started

    yield make
    await asyncio.gather(*(v.close() for v in made))
