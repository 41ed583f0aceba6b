"""Systems under test, started and stopped by the benchmarks: one testpulse node, a testpulse
cluster (testpulse.devtools.cluster.Cluster: Redis, N nodes, the repo's nginx.conf) and the same cluster
shape running the stock python-socketio server (stock_server.py) or the Node.js baseline
(node_baseline/server.js: socket.io with @socket.io/redis-adapter) behind the same nginx config.
Also: tokens, sessions, node counters, and a sampler of CPU and RSS per process."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from testpulse.devtools.cluster import Cluster, NodeSpec, free_port, wait_http_ok
from testpulse.domain.auth import issue_token
from testpulse.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_SECRET = "testpulse-bench-secret-0123456789abcdef-XYZ"

# Benchmark publishers and the load generator come from one address: the per-connection event limit
# and the per-address handshake limit are raised so that they measure the node, not the limiter.
BENCH_NODE_ENV = {
    "TESTPULSE_JWT_SECRET": BENCH_SECRET,
    "TESTPULSE_RATE_LIMIT_PER_SECOND": "1000000",
    "TESTPULSE_RATE_LIMIT_BURST": "1000000",
    "TESTPULSE_CONNECT_RATE_PER_SECOND": "1000000",
    "TESTPULSE_CONNECT_RATE_BURST": "1000000",
    "TESTPULSE_LOG_LEVEL": "warning",
    "TESTPULSE_SHUTDOWN_TIMEOUT_SECONDS": "5",
}

_SETTINGS = Settings.from_env({"TESTPULSE_JWT_SECRET": BENCH_SECRET, "TESTPULSE_DATABASE_URL": "sqlite+aiosqlite:///x"})


def token(role: str, sub: str, ttl: float = 4 * 3600) -> str:
    return issue_token(_SETTINGS, role=role, sub=sub, ttl_seconds=ttl)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def sqlite_url(folder: Path) -> str:
    return f"sqlite+aiosqlite:///{folder / 'bench.db'}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (no HELP/TYPE lines)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def metric_sum(values: dict[str, float], name: str, exclude: Iterable[str] = ()) -> float:
    if name.endswith("}"):
        return values.get(name, 0.0)
    pattern = re.compile(rf"^{re.escape(name)}(\{{.*\}})?$")
    return sum(v for k, v in values.items() if pattern.match(k) and not any(x in k for x in exclude))


# Where a detection's time goes inside a testpulse node, from the node's own histograms.
SERVER_HISTOGRAMS = {
    "publish_handler": ("testpulse_handler_seconds", 'event="publish_detection"'),
    "store_write": ("testpulse_store_write_seconds", ""),
    "delivery_lag": ("testpulse_delivery_lag_seconds", ""),
}
_LE = re.compile(r'le="([^"]+)"')


def histogram_summary(before: dict[str, float], after: dict[str, float], name: str, labels: str) -> dict[str, Any]:
    """count, mean and interpolated p50/p99 (ms) of what a Prometheus histogram gained between snapshots."""
    buckets: list[tuple[float, float]] = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{") and labels in key:
            match = _LE.search(key)
            if match:
                buckets.append((float(match.group(1)), value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    sum_key = f"{name}_sum{{{labels}}}" if labels else f"{name}_sum"
    spent = after.get(sum_key, 0.0) - before.get(sum_key, 0.0)
    out: dict[str, Any] = {"count": int(total), "mean_ms": round(1000 * spent / total, 2) if total else None}
    for q in (50, 99):
        value = None
        if total:
            rank, lower, seen = total * q / 100.0, 0.0, 0.0
            for upper, cumulative in buckets:
                if cumulative >= rank:
                    if upper == float("inf"):
                        value = lower
                    else:
                        width = cumulative - seen
                        value = lower + (upper - lower) * ((rank - seen) / width if width else 1.0)
                    break
                lower, seen = upper, cumulative
        out[f"p{q}_ms"] = round(1000 * value, 2) if value is not None else None
    return out


class System:
    """What scenarios need of a system under test."""

    kind = "testpulse"
    proxy_url = ""
    node_urls: dict[str, str]

    def token(self, role: str, sub: str) -> str | None:
        return token(role, sub)

    def node_pids(self) -> dict[str, int]:
        raise NotImplementedError

    def aux_pids(self) -> dict[str, int]:
        return {}

    async def create_sessions(self, http: aiohttp.ClientSession, count: int) -> list[str]:
        """`count` running sessions (created and started over HTTP with an admin token)."""
        headers = {"Authorization": f"Bearer {token('admin', 'bench-admin')}"}
        base = self.proxy_url or next(iter(self.node_urls.values()))
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with gate:
                async with http.post(f"{base}/api/sessions", json={"name": f"bench-{i}"}, headers=headers) as resp:
                    body = await resp.json()
                    if resp.status != 201:
                        raise RuntimeError(f"creating a session failed: {resp.status} {body}")
                session_id = str(body["session"]["id"])
                async with http.post(f"{base}/api/sessions/{session_id}/start", headers=headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"starting a session failed: {resp.status} {await resp.text()}")
                return session_id

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def node_counters(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        """Per node: connected clients and messages received from Redis (relevant ones by kind)."""
        out: dict[str, dict[str, float]] = {}
        for node, url in self.node_urls.items():
            async with http.get(f"{url}/metrics") as resp:
                values = parse_metrics(await resp.text())
            out[node] = {
                "clients": metric_sum(values, "testpulse_connected_clients"),
                "redis_received": metric_sum(values, "testpulse_redis_messages_received_total"),
                "redis_detections": metric_sum(values, 'testpulse_redis_messages_received_total{kind="detections"}'),
                "events_emitted": metric_sum(values, "testpulse_events_emitted_total"),
                "slow_consumers": metric_sum(values, "testpulse_slow_consumer_disconnects_total"),
                "write_rejected": metric_sum(values, "testpulse_write_queue_rejected_total"),
            }
        return out

    async def metrics_snapshot(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for node, url in self.node_urls.items():
            async with http.get(f"{url}/metrics") as resp:
                out[node] = parse_metrics(await resp.text())
        return out

    def server_latency(
        self, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
    ) -> dict[str, dict[str, Any]]:
        return {
            node: {
                what: histogram_summary(before.get(node, {}), after[node], name, labels)
                for what, (name, labels) in SERVER_HISTOGRAMS.items()
            }
            for node in after
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "proxy": self.proxy_url, "nodes": dict(self.node_urls)}

    def stop(self) -> None:
        raise NotImplementedError


class SingleNode(System):
    """One testpulse node (`python -m testpulse serve`) without Redis, on SQLite or a given database."""

    def __init__(
        self, database_url: str | None = None, env: dict[str, str] | None = None, server_repo: Path | None = None
    ) -> None:
        """`server_repo`: run the node from another checkout with its own .venv (an older commit,
        for a before/after comparison); by default this repo's interpreter and code."""
        self.dir = Path(tempfile.mkdtemp(prefix="testpulse-bench-node-"))
        repo = server_repo or REPO_ROOT
        python = str(repo / ".venv" / "bin" / "python") if server_repo is not None else sys.executable
        self.server_repo = repo
        self.database_url = database_url or sqlite_url(self.dir)
        self.port = free_port()
        self.node_urls = {"node1": f"http://127.0.0.1:{self.port}"}
        full_env = {
            **os.environ,
            **BENCH_NODE_ENV,
            **(env or {}),
            "TESTPULSE_DATABASE_URL": self.database_url,
            "TESTPULSE_NODE_ID": "node1",
        }
        full_env.pop("TESTPULSE_REDIS_URL", None)
        self.log_path = self.dir / "node1.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "testpulse", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=repo,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_http_ok(f"{self.node_urls['node1']}/health", time.monotonic() + 30, self.proc)  # type: ignore[arg-type]
        except BaseException:
            self.stop()
            raise

    def node_pids(self) -> dict[str, int]:
        return {"node1": self.proc.pid}

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "database": self.database_url.split("@")[-1], "log": str(self.log_path)}
        if self.server_repo != REPO_ROOT:
            described["server_repo"] = str(self.server_repo)
        return described

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _ClusterSystem(System):
    cluster: Cluster

    def _started(self) -> None:
        info = self.cluster.describe()
        self.proxy_url = info["proxy"]
        self.node_urls = {n["id"]: n["url"] for n in info["nodes"]}

    def node_pids(self) -> dict[str, int]:
        return {spec.node_id: self.cluster.processes[spec.node_id].pid for spec in self.cluster.specs}

    def aux_pids(self) -> dict[str, int]:
        return {name: self.cluster.processes[name].pid for name in ("nginx", "redis") if name in self.cluster.processes}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "run_dir": str(self.cluster.run_dir)}

    def stop(self) -> None:
        self.cluster.stop(grace=10.0)


class TestpulseCluster(_ClusterSystem):
    kind = "testpulse"

    def __init__(self, nodes: int, database_url: str | None = None, **options: Any) -> None:
        """`options`: more Cluster fields (handshake_rate, connections_per_ip, upstream_sources)."""
        run_dir = Path(tempfile.mkdtemp(prefix="testpulse-bench-cluster-"))
        self.cluster = Cluster(
            nodes=nodes,
            port=free_port(),
            database_url=database_url or sqlite_url(run_dir),
            run_dir=run_dir,
            node_env=dict(BENCH_NODE_ENV),
            **options,
        )
        self.cluster.start()
        self._started()


class _StockNodes(Cluster):
    """testpulse.devtools.cluster.Cluster whose nodes are the stock server; Redis and nginx start as usual."""

    extra_args: tuple[str, ...] = ()

    def _start_node(self, spec: NodeSpec) -> None:
        assert self.redis_url is not None
        env = {**os.environ, "STOCK_REDIS_URL": self.redis_url, "STOCK_NODE_ID": spec.node_id}
        argv = [sys.executable, "-m", "uvicorn", "loadtests.bench.stock_server:app"]
        # uvicorn defaults, but quiet like the testpulse nodes (their access log is off, level warning).
        argv += ["--host", "127.0.0.1", "--port", str(spec.port), "--log-level", "warning", *self.extra_args]
        self._spawn(spec.node_id, argv, env)


class _BaselineCluster(_ClusterSystem):
    """A cluster of one of the baselines: the stock server's events, no auth, no database, so no
    tokens, sessions that are just names, and counters from each node's `/stats`."""

    def token(self, role: str, sub: str) -> str | None:
        return None

    async def metrics_snapshot(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        return {}

    async def create_sessions(self, http: aiohttp.ClientSession, count: int) -> list[str]:
        run = secrets.token_hex(4)
        return [f"{self.kind}-{run}-{i:04d}" for i in range(count)]

    async def node_counters(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for node, url in self.node_urls.items():
            async with http.get(f"{url}/stats") as resp:
                stats = await resp.json()
            out[node] = {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}
        return out


class StockCluster(_BaselineCluster):
    kind = "stock"
    extra_args: tuple[str, ...] = ()

    def __init__(self, nodes: int, extra_args: Iterable[str] = ()) -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="testpulse-bench-stock-"))
        self.cluster = _StockNodes(nodes=nodes, port=free_port(), database_url="unused", run_dir=run_dir)
        self.cluster.extra_args = tuple(extra_args)
        self.extra_args = tuple(extra_args)
        cwd = Path.cwd()
        os.chdir(REPO_ROOT)  # the nodes import loadtests.bench.stock_server from the repo root
        try:
            self.cluster.start()
        finally:
            os.chdir(cwd)
        self._started()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "uvicorn_extra_args": list(self.extra_args)}


NODE_BASELINE = Path(__file__).resolve().parent / "node_baseline"


def node_binary() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("the node baseline needs Node.js (`node` on PATH); ./scripts/setup installs it")
    if not (NODE_BASELINE / "node_modules" / "socket.io").is_dir():
        raise RuntimeError(f"{NODE_BASELINE}/node_modules is missing: run ./scripts/setup (npm ci there)")
    return found


class _NodeBaselineNodes(Cluster):
    """testpulse.devtools.cluster.Cluster whose nodes are node_baseline/server.js, one `node` process each (so
    the sampler sees the process that does the work); Redis and nginx start as usual."""

    def _start_node(self, spec: NodeSpec) -> None:
        assert self.redis_url is not None
        env = {**os.environ, "NODE_BASELINE_REDIS_URL": self.redis_url, "NODE_BASELINE_NODE_ID": spec.node_id}
        argv = [node_binary(), str(NODE_BASELINE / "server.js"), "--host", "127.0.0.1", "--port", str(spec.port)]
        self._spawn(spec.node_id, argv, env)


class NodeBaselineCluster(_BaselineCluster):
    kind = "node"

    def __init__(self, nodes: int) -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="testpulse-bench-nodejs-"))
        self.cluster = _NodeBaselineNodes(nodes=nodes, port=free_port(), database_url="unused", run_dir=run_dir)
        self.cluster.start()
        self._started()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "node_version": _node_version()}


def _node_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
        return subprocess.run([node_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    return "unknown"


class Sampler:
    """Samples CPU time and RSS of labelled processes (and their children) in a thread."""

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.25, with_children: Iterable[str] = ()) -> None:
        self.interval = interval
        self.procs: dict[str, list[psutil.Process]] = {}
        for label, group in pids.items():
            procs: list[psutil.Process] = []
            for pid in group:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    procs.append(proc)
                    if label in with_children:
                        procs.extend(proc.children(recursive=True))
            self.procs[label] = procs
        self.rss_start = self._rss()
        self.rss_peak = dict(self.rss_start)
        self.cpu_split_start = self._cpu_split()
        self.writes_start = self._writes()
        self.cpu_start = {label: user + system for label, (user, system) in self.cpu_split_start.items()}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label, procs in self.procs.items():
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            out[label] = total
        return out

    def _cpu(self) -> dict[str, float]:
        return {label: user + system for label, (user, system) in self._cpu_split().items()}

    def _writes(self) -> dict[str, int]:
        """write(2)-family system calls so far (/proc/PID/io syscw): how many socket writes a
        node made, under uvloop (libuv writes a TCP socket with write/writev)."""
        out: dict[str, int] = {}
        for label, procs in self.procs.items():
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error, AttributeError):
                    total += proc.io_counters().write_count
            out[label] = total
        return out

    def _cpu_split(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for label, procs in self.procs.items():
            user = system = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    user += times.user
                    system += times.system
            out[label] = (user, system)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for label, rss in self._rss().items():
                self.rss_peak[label] = max(self.rss_peak.get(label, 0), rss)

    def rss_now(self) -> dict[str, int]:
        return self._rss()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(2)
        wall = time.monotonic() - self.started
        split_end = self._cpu_split()
        cpu_end = {label: user + system for label, (user, system) in split_end.items()}
        rss_end = self._rss()
        return {
            "wall_s": round(wall, 2),
            "cpu_pct": {k: round(100.0 * (cpu_end[k] - self.cpu_start[k]) / wall, 1) for k in cpu_end},
            "cpu_s": {k: round(cpu_end[k] - self.cpu_start[k], 3) for k in cpu_end},
            "cpu_system_s": {k: round(split_end[k][1] - self.cpu_split_start[k][1], 3) for k in split_end},
            "write_calls": {k: v - self.writes_start.get(k, 0) for k, v in self._writes().items()},
            "rss_mb_start": {k: round(v / 2**20, 1) for k, v in self.rss_start.items()},
            "rss_mb_peak": {k: round(v / 2**20, 1) for k, v in self.rss_peak.items()},
            "rss_mb_end": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
        }


def sampler_for(system: System, loadgen_pids: list[int]) -> Sampler:
    pids: dict[str, list[int]] = {node: [pid] for node, pid in system.node_pids().items()}
    pids.update({name: [pid] for name, pid in system.aux_pids().items()})
    pids["loadgen"] = [*loadgen_pids, os.getpid()]
    return Sampler(pids, with_children={"nginx"})


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
