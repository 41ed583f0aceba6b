"""A Redis master, its replica and three Sentinels on loopback: a real failover under a running cluster.

Every process is a RedisServer-shaped child (tests/support/processes.py), stopped and proven gone
on exit. The Sentinels judge a master down after one second of silence, so a failover takes a
few seconds instead of the default minute.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import asyncio as aioredis

from support.processes import HOST, Process, RedisServer, free_port, port_is_open, redis_answers, spawn, until_ready

SERVICE = "mymaster"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000


@dataclass
class SentinelProcess:
    """One redis-server in Sentinel mode, with a config file of its own (Sentinel rewrites it)."""

    port: int
    workdir: Path
    master_port: int
    process: Process | None = None

    async def start(self, ready_timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {HOST}\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {SERVICE} {HOST} {self.master_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = await spawn(
            f"redis-sentinel :{self.port}", [binary, conf, "--sentinel"], log_path=self.workdir / "sentinel.log"
        )
        await until_ready(self.process, lambda: redis_answers(self.port), deadline=ready_timeout)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop(10.0)
        assert not port_is_open(self.port), f"sentinel port {self.port} still open after it stopped"

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(host=HOST, port=self.port, socket_connect_timeout=1, socket_timeout=2)


@dataclass
class SentinelGroup:
    servers: list[RedisServer]  # the first started as master, the second as its replica
    sentinels: list[SentinelProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/0/{SERVICE}"

    async def _ask_all(self, ask: Callable[[aioredis.Redis], Awaitable[Any]]) -> list[Any]:
        """Every Sentinel's answer (None from one that did not answer)."""
        answers: list[Any] = []
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                answers.append(await ask(client))
            except (OSError, aioredis.RedisError):
                answers.append(None)
            finally:
                await client.aclose()
        return answers

    async def master_port(self) -> int | None:
        """The master's port when every Sentinel names the same one, else None."""
        ports = set()
        for answer in await self._ask_all(lambda c: c.sentinel_get_master_addr_by_name(SERVICE)):
            if not isinstance(answer, list | tuple) or len(answer) != 2:
                return None
            ports.add(int(answer[1]))
        return ports.pop() if len(ports) == 1 else None

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    async def settled(self) -> bool:
        """Every Sentinel agrees on a master that answers as one, and sees every other server as
        its replica with a working link: a failover now has a replica to promote."""
        port = await self.master_port()
        if port is None or not await role_is(port, "master"):
            return False
        others = {s.port for s in self.servers if s.port != port}
        for answer in await self._ask_all(lambda c: c.sentinel_slaves(SERVICE)):
            if not isinstance(answer, list):
                return False
            healthy = {
                int(replica["port"])
                for replica in answer
                if isinstance(replica, dict)
                and replica.get("flags") == "slave"
                and replica.get("master-link-status") == "ok"
                and int(replica.get("master-port", 0)) == port
            }
            if not others <= healthy:
                return False
        return True

    async def failover(self) -> None:
        """SENTINEL FAILOVER: the master is demoted on purpose (the graceful kind)."""
        client = self.sentinels[0].client()
        try:
            await client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            await client.aclose()

    async def kill(self, server: RedisServer) -> None:
        """SIGKILL: the master vanishes; only the Sentinels' timeout notices."""
        assert server.process is not None
        server.process._signal_group(signal.SIGKILL)
        await server.stop(5.0)


async def role_is(port: int, role: str) -> bool:
    """True when the Redis at `port` answers ROLE with `role` (master, slave)."""
    client = aioredis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=2)
    try:
        answer = await client.execute_command("ROLE")
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()
    found = answer[0].decode() if isinstance(answer[0], bytes) else answer[0]
    return bool(found == role)


@asynccontextmanager
async def run_sentinel_group(workdir: Path | None = None) -> AsyncIterator[SentinelGroup]:
    """A master, one replica and three Sentinels (quorum 2), all stopped and proven gone on exit."""
    folder = Path(tempfile.mkdtemp(prefix="tp-sentinel-")) if workdir is None else workdir
    async with AsyncExitStack() as stack:
        if workdir is None:
            stack.callback(shutil.rmtree, folder, True)
        master = RedisServer(free_port(), folder / "redis-a")
        replica = RedisServer(free_port(), folder / "redis-b", extra_args=("--replicaof", HOST, str(master.port)))
        group = SentinelGroup([master, replica])
        for server in group.servers:
            server.workdir.mkdir(parents=True, exist_ok=True)
            stack.push_async_callback(server.stop)
            await server.start()
        for index in range(3):
            sentinel = SentinelProcess(free_port(), folder / f"sentinel-{index}", master.port)
            stack.push_async_callback(sentinel.stop)
            group.sentinels.append(sentinel)
            await sentinel.start()
        yield group
