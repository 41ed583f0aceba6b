"""Real processes for tests: free ports, a throwaway PostgreSQL and testpulse nodes, each proven gone on exit.

Every process starts in its own process group with its output in a log file. Leaving a context
manager stops the group (the process's own graceful signal, then SIGKILL after a deadline) and
then asserts that nothing of the group is left, so a test run never leaks a server. New kinds of
process (Redis, nginx, a whole cluster) follow the same shape: `spawn()` + `running()` with a
readiness probe, wrapped in a context manager that yields what the tests need to reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


class ProcessFailed(RuntimeError):
    """A process exited early, never became ready, or could not be stopped; the message holds its log tail."""


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after; a lost race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def wait_until(
    probe: Callable[[], Awaitable[bool]], *, deadline: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll an async probe until it returns True; TimeoutError naming `what` after `deadline` seconds."""
    give_up = time.monotonic() + deadline
    while not await probe():
        if time.monotonic() >= give_up:
            raise TimeoutError(f"{what} not reached within {deadline:.1f}s")
        await asyncio.sleep(interval)


@dataclass
class Process:
    """A child process leading its own process group, with its output in `log_path`."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    stop_signal: signal.Signals = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, why: str) -> ProcessFailed:
        tail = self.log_tail()
        return ProcessFailed(f"{self.name} (pid {self.pid}) {why}; last log lines of {self.log_path}:\n{tail}")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member runs as another user: it exists
            return True
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    async def stop(self, deadline: float = 15.0) -> None:
        """Ask the group to stop with its graceful signal, SIGKILL it after `deadline` s, then prove it is gone."""
        if self.running:
            self._signal_group(self.stop_signal)
            try:
                await asyncio.wait_for(self.proc.wait(), deadline)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await asyncio.wait_for(self.proc.wait(), 10.0)

        async def group_gone() -> bool:
            return not self.group_alive()

        # The leader is reaped; its children (postgres backends, workers) may need a moment more.
        try:
            await wait_until(group_gone, deadline=5.0, what=f"{self.name}'s process group gone")
        except TimeoutError:
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await wait_until(group_gone, deadline=2.0)
        self.assert_gone()

    def assert_gone(self) -> None:
        assert self.proc.returncode is not None, f"{self.name} (pid {self.pid}) is still running"
        assert not self.group_alive(), f"processes of {self.name}'s group {self.pid} are still alive"


def _demote(user: str) -> dict[str, object]:
    """Popen arguments that run the child as `user` (only meaningful when we are root)."""
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


async def spawn(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> Process:
    """Start `argv` in a new process group, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    extra = _demote(user) if user is not None and os.geteuid() == 0 else {}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *[str(a) for a in argv],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
            **extra,  # type: ignore[arg-type]
        )
    return Process(name, proc, log_path, stop_signal)


async def until_ready(process: Process, ready: Callable[[], Awaitable[bool]], *, deadline: float = 30.0) -> None:
    """Wait until `ready()` holds; ProcessFailed (with the log tail) if the process dies or the deadline passes."""

    async def probe() -> bool:
        if not process.running:
            raise process.failure(f"exited with code {process.proc.returncode} before it was ready")
        return await ready()

    try:
        await wait_until(probe, deadline=deadline, what=f"{process.name} ready")
    except TimeoutError:
        raise process.failure(f"was not ready within {deadline:.0f}s") from None


@asynccontextmanager
async def running(
    process: Process,
    ready: Callable[[], Awaitable[bool]],
    *,
    ready_timeout: float = 30.0,
    stop_timeout: float = 15.0,
) -> AsyncIterator[Process]:
    """Wait until `ready()` holds, yield, and stop the process (proving it gone) in finally."""
    try:
        await until_ready(process, ready, deadline=ready_timeout)
        yield process
    finally:
        await process.stop(stop_timeout)


async def run_once(
    argv: Sequence[str | os.PathLike[str]], *, log_path: Path, deadline: float = 120.0, **kwargs: object
) -> None:
    """Run a one-shot command to completion; ProcessFailed with its output when it fails."""
    process = await spawn(Path(argv[0]).name, argv, log_path=log_path, **kwargs)  # type: ignore[arg-type]
    try:
        code = await asyncio.wait_for(process.proc.wait(), deadline)
    except TimeoutError:
        await process.stop(1.0)
        raise process.failure(f"did not finish within {deadline:.0f}s") from None
    if code != 0:
        raise process.failure(f"failed with exit code {code}")


# ---- PostgreSQL --------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ProcessFailed("PostgreSQL binaries not found (install postgresql; see scripts/setup)")
    return Path(initdb).parent


def postgres_argv(bindir: Path, data: Path, port: int, socket_dir: Path, *, max_connections: int) -> list[str | Path]:
    """A test server: loopback only, its socket in `socket_dir`, and durability traded for speed."""
    settings = {
        "listen_addresses": HOST,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": str(max_connections),
    }
    options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
    return [bindir / "postgres", "-D", data, "-p", str(port), "-k", socket_dir, *options]


@asynccontextmanager
async def throwaway_postgres(database: str = "testpulse") -> AsyncIterator[str]:
    """A private PostgreSQL on a free port, yielding an asyncpg SQLAlchemy URL to a fresh `database`.

    With TESTPULSE_TEST_POSTGRES_URL set, that URL is yielded instead and nothing is started.
    The cluster is initialised in a temp dir (owned by `postgres` when we are root, since initdb
    refuses root), tuned for speed over durability, and deleted after the server is proven gone.
    """
    external = os.environ.get("TESTPULSE_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    import asyncpg

    bindir = postgres_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="tp-pg-"))
    as_root = os.geteuid() == 0
    user = "postgres" if as_root else None
    try:
        if as_root:
            shutil.chown(workdir, "postgres", "postgres")
        data = workdir / "data"
        runuser = ["runuser", "-u", "postgres", "--"] if as_root else []
        await run_once(
            [
                *runuser,
                bindir / "initdb",
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            log_path=workdir / "initdb.log",
        )
        port = free_port()
        server = await spawn(
            "postgres",
            postgres_argv(bindir, data, port, workdir, max_connections=200),
            log_path=workdir / "postgres.log",
            user=user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: SIGTERM would wait for every client to leave
        )

        async def accepts_connections() -> bool:
            try:
                conn = await asyncpg.connect(host=HOST, port=port, user="postgres", database="postgres", timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return False
            await conn.close()
            return True

        async with running(server, accepts_connections, ready_timeout=30.0, stop_timeout=20.0):
            conn = await asyncpg.connect(host=HOST, port=port, user="postgres", database="postgres")
            try:
                await conn.execute(f'CREATE DATABASE "{database}"')
            finally:
                await conn.close()
            yield f"postgresql+asyncpg://postgres@{HOST}:{port}/{database}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---- testpulse nodes ---------------------------------------------------------------------------


def testpulse_command() -> list[str]:
    script = Path(sys.executable).parent / "testpulse"
    return [str(script)] if script.exists() else [sys.executable, "-m", "testpulse"]


@dataclass
class RunningNode:
    """A `testpulse serve` process answering on `url`."""

    url: str
    port: int
    process: Process
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)


@asynccontextmanager
async def run_node(
    env: Mapping[str, str],
    port: int | None = None,
    *,
    log_dir: Path | None = None,
    ready_timeout: float = 30.0,
    stop_timeout: float = 15.0,
) -> AsyncIterator[RunningNode]:
    """Start `testpulse serve` configured only by `env` (TESTPULSE_* from our own environment are
    dropped), wait for GET /health, yield it, and SIGTERM it (SIGKILL after `stop_timeout`).

    On exit the process group is gone and the port no longer accepts connections."""
    own_dir = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="tp-node-")) if log_dir is None else log_dir
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TESTPULSE_")}
    child_env.update(env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        process, chosen = await _start_node(child_env, port, logs, ready_timeout, stop_timeout)
        try:
            yield RunningNode(f"http://{HOST}:{chosen}", chosen, process, process.log_path, dict(env))
        finally:
            await process.stop(stop_timeout)
        assert not port_is_open(chosen), f"port {chosen} still accepts connections after the node stopped"
    finally:
        if own_dir:
            shutil.rmtree(logs, ignore_errors=True)


async def _start_node(
    env: dict[str, str], port: int | None, logs: Path, ready_timeout: float, stop_timeout: float
) -> tuple[Process, int]:
    for attempt in range(3):
        chosen = free_port() if port is None else port
        process = await spawn(
            f"testpulse node :{chosen}",
            [*testpulse_command(), "serve", "--host", HOST, "--port", str(chosen)],
            log_path=logs / f"node-{chosen}.log",
            env=env,
            cwd=ROOT,
        )

        async def healthy(url: str = f"http://{HOST}:{chosen}") -> bool:
            try:
                async with httpx.AsyncClient(timeout=2.0) as http:
                    return (await http.get(f"{url}/health")).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            await until_ready(process, healthy, deadline=ready_timeout)
            return process, chosen
        except ProcessFailed:
            await process.stop(stop_timeout)
            # Someone took the free port between our probe and the node's bind: try another one.
            lost_race = "address already in use" in process.log_tail().lower()
            if port is not None or not lost_race or attempt == 2:
                raise
    raise AssertionError("unreachable")


# ---- Redis -------------------------------------------------------------------------------------


async def redis_answers(port: int, host: str = HOST) -> bool:
    """True when a Redis server on `port` answers PING."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class RedisServer:
    """A private redis-server on a fixed port that a test may stop, kill and start again (same port,
    empty dataset: nothing is persisted), e.g. to restart Redis under a running cluster."""

    port: int
    workdir: Path
    process: Process | None = None
    starts: int = 0
    extra_args: tuple[str, ...] = ()  # e.g. ("--replicaof", host, port)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    async def start(self, ready_timeout: float = 15.0) -> None:
        assert not self.running, "redis-server is already running"
        self.starts += 1
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = await spawn(
            f"redis-server :{self.port}",
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                *self.extra_args,
            ],
            log_path=self.workdir / "redis.log",
        )
        try:
            await until_ready(self.process, lambda: redis_answers(self.port), deadline=ready_timeout)
        except ProcessFailed:
            await self.process.stop(5.0)
            raise

    async def stop(self, deadline: float = 10.0) -> None:
        """SIGTERM (SIGKILL after `deadline`), then prove the process is gone and the port closed."""
        if self.process is not None:
            await self.process.stop(deadline)
        assert not port_is_open(self.port), f"port {self.port} still accepts connections after redis stopped"

    async def kill(self) -> None:
        """SIGKILL: Redis vanishes without closing anything gracefully."""
        if self.process is not None and self.process.running:
            self.process._signal_group(signal.SIGKILL)
        await self.stop(5.0)

    def freeze(self) -> None:
        """SIGSTOP: Redis stops answering, yet every connection stays open and the kernel still
        accepts new ones (a hung server, or a partition that drops packets rather than refusing)."""
        assert self.process is not None and self.process.running, "redis-server is not running"
        self.process._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after freeze(): Redis answers what queued up meanwhile."""
        assert self.process is not None, "redis-server was never started"
        self.process._signal_group(signal.SIGCONT)


@asynccontextmanager
async def run_redis(port: int | None = None, *, workdir: Path | None = None) -> AsyncIterator[RedisServer]:
    """A redis-server on `port` (a free one by default); stopped and proven gone on exit."""
    own_dir = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="tp-redis-")) if workdir is None else workdir
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        server = RedisServer(port if port is not None else free_port(), folder)
        try:
            await server.start()
            break
        except ProcessFailed:
            lost_race = server.process is not None and "address already in use" in server.process.log_tail().lower()
            if port is not None or not lost_race or attempt == 2:
                raise
    try:
        yield server
    finally:
        try:
            await server.stop()
        finally:
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)


@dataclass
class PostgresServer:
    """A private PostgreSQL that a test may stop and start again on the same port and data directory
    (a database outage), unlike `throwaway_postgres`, which only yields a URL."""

    port: int
    workdir: Path
    process: Process | None = None
    starts: int = 0

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@{HOST}:{self.port}/{database}"

    async def accepts_connections(self) -> bool:
        import asyncpg

        try:
            conn = await asyncpg.connect(host=HOST, port=self.port, user="postgres", database="postgres", timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        await conn.close()
        return True

    async def start(self, ready_timeout: float = 30.0) -> None:
        assert not self.running, "postgres is already running"
        self.starts += 1
        self.process = await spawn(
            "postgres",
            postgres_argv(postgres_bindir(), self.data, self.port, self.workdir, max_connections=300),
            log_path=self.workdir / "postgres.log",
            user="postgres" if os.geteuid() == 0 else None,
            stop_signal=signal.SIGINT,  # what `pg_ctl stop -m fast` sends: roll back, disconnect everyone
        )
        try:
            await until_ready(self.process, self.accepts_connections, deadline=ready_timeout)
        except ProcessFailed:
            await self.process.stop(10.0)
            raise

    async def stop(self, deadline: float = 20.0) -> None:
        """A fast shutdown, proven complete (process group gone, port closed)."""
        if self.process is not None:
            await self.process.stop(deadline)
        assert not port_is_open(self.port), f"port {self.port} still accepts connections after postgres stopped"

    async def create_database(self, name: str) -> str:
        """A fresh database on this server; its SQLAlchemy URL."""
        import asyncpg

        conn = await asyncpg.connect(host=HOST, port=self.port, user="postgres", database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)


@asynccontextmanager
async def run_postgres() -> AsyncIterator[PostgresServer]:
    """A PostgreSQL on a free port in a temp dir (initdb'd as `postgres` when we are root); stopped,
    proven gone and deleted on exit."""
    bindir = postgres_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="tp-pgserver-"))
    as_root = os.geteuid() == 0
    try:
        if as_root:
            shutil.chown(workdir, "postgres", "postgres")
        runuser = ["runuser", "-u", "postgres", "--"] if as_root else []
        initdb = [bindir / "initdb", "-D", workdir / "data", "-U", "postgres", "--auth=trust", "--no-sync"]
        await run_once([*runuser, *initdb, "--encoding=UTF8", "--locale=C"], log_path=workdir / "initdb.log")
        server = PostgresServer(free_port(), workdir)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
