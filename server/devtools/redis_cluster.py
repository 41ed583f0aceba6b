"""A local Redis Cluster on loopback: N masters with one replica each, for `testpulse cluster
--redis-cluster N` and the tests that migrate slots and fail masters over under a running cluster.

Synchronous on purpose (like server/devtools/cluster.py, which runs it): the tests call it in a thread.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from testpulse.devtools.children import ClusterError, die_with_parent, find_binary, free_port

HOST = "127.0.0.1"
SLOTS = 16384
# A master silent this long is failed over by its replica: seconds, not Redis's 15 s default.
NODE_TIMEOUT_MS = 2000


@dataclass
class RedisClusterServers:
    """`masters` masters and as many replicas, each a redis-server with `--cluster-enabled yes` in
    a folder of its own under `run_dir`; `start()` returns once every server reports
    cluster_state:ok and knows every other."""

    run_dir: Path
    masters: int = 3
    node_timeout_ms: int = NODE_TIMEOUT_MS
    ports: list[int] = field(default_factory=list)
    bus_ports: dict[int, int] = field(default_factory=dict)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The seed nodes, every server (any one is enough for the client to find the rest)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
        if self.masters < 3:
            raise ClusterError("a Redis Cluster needs at least 3 masters (redis-cli --cluster create refuses fewer)")
        deadline = time.monotonic() + timeout
        self.ports = [free_port() for _ in range(2 * self.masters)]
        # The bus port is named: the default (port + 10000) is out of range for most free ports.
        self.bus_ports = {port: free_port() for port in self.ports}
        try:
            for port in self.ports:
                self.start_server(port)
            for port in self.ports:
                self._wait(lambda p=port: self._answers(p), deadline, f"redis-server :{port} to answer")
            servers = [f"{HOST}:{p}" for p in self.ports]
            create = subprocess.run(
                [find_binary("redis-cli"), "--cluster", "create", *servers, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            if create.returncode != 0:
                raise ClusterError(f"redis-cli --cluster create failed: {create.stdout[-500:]}{create.stderr[-500:]}")
            self._wait(self.settled, deadline, "the Redis Cluster to report cluster_state:ok on every server")
        except BaseException:
            self.stop()
            raise
        return self

    def start_server(self, port: int) -> None:
        """(Re)start the server of `port` with its own nodes.conf, so it rejoins as who it was."""
        folder = self.run_dir / f"redis-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        argv = [
            find_binary("redis-server"),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(self.bus_ports[port]),
            "--cluster-config-file",
            str(folder / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # testpulse keeps nothing in Redis that the database does not have (pub/sub, presence),
            # so a replica that has not finished its sync may still take over: availability first.
            # A replica of a fresh failover is then never left unable to stand in for its master.
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ]
        log = open(folder / "redis.log", "ab")  # noqa: SIM115 - lives as long as the child
        self.processes[port] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        log.close()

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=5)

    def info(self, port: int) -> dict[str, str]:
        with self.client(port) as client:
            parsed = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        return {str(key): str(value) for key, value in dict(parsed).items()}

    def role(self, port: int) -> str:
        with self.client(port) as client:
            return str(client.execute_command("ROLE")[0].decode())

    def master_ports(self) -> list[int]:
        """The ports of the servers that are masters now (failovers change which)."""
        return [port for port in self.running_ports() if self._safe_role(port) == "master"]

    def running_ports(self) -> list[int]:
        return [port for port, proc in self.processes.items() if proc.poll() is None]

    def settled(self) -> bool:
        """Every running server says the cluster is ok with every slot served, and sees the same
        slot map (a failover or a slot move reaches the others by gossip)."""
        try:
            infos = [self.info(port) for port in self.running_ports()]
            maps = {tuple(self.slot_map(port)) for port in self.running_ports()}
        except (redis.RedisError, OSError):
            return False
        return len(maps) == 1 and all(
            info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == str(SLOTS) for info in infos
        )

    def node_id(self, port: int) -> str:
        with self.client(port) as client:
            raw = client.execute_command("CLUSTER MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def slot_map(self, port: int) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) ranges as the server of `port` sees them."""
        with self.client(port) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        return sorted((int(start), int(end), int(master[1])) for start, end, master, *_ in ranges)

    def owner_port(self, slot: int) -> int:
        """The port of the master serving `slot`, as the first running master sees it (after a
        change, settled() says when every server sees the same)."""
        for port in self.master_ports():
            for start, end, master in self.slot_map(port):
                if start <= slot <= end:
                    return master
        raise ClusterError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        master = self.node_id(master_port)
        for port in self.running_ports():
            with self.client(port) as client:
                role = client.execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == master_port:
                return port
        raise ClusterError(f"no running replica of :{master_port} ({master})")

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move one slot to another master the way `redis-cli --cluster reshard` does, slot by
        slot: IMPORTING on the target, MIGRATING on the source, MIGRATE its keys, then assign it
        to the target everywhere (the source then unsubscribes the slot's shard channels)."""
        from_port = self.owner_port(slot)
        if from_port == to_port:
            raise ClusterError(f"slot {slot} is already on :{to_port}")
        source, target = self.node_id(from_port), self.node_id(to_port)
        with self.client(to_port) as dst, self.client(from_port) as src:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "REPLACE", "KEYS", *keys)
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", target)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", target)
        for port in self.master_ports():
            if port not in (from_port, to_port):
                with self.client(port) as other:
                    other.execute_command("CLUSTER SETSLOT", slot, "NODE", target)

    def reshard(self, from_port: int, to_port: int, slots: int, timeout: float = 120.0) -> None:
        """`redis-cli --cluster reshard`: move `slots` slots (the lowest first) from one master to another."""
        moves = ["--cluster-from", self.node_id(from_port), "--cluster-to", self.node_id(to_port)]
        moves += ["--cluster-slots", str(slots), "--cluster-yes"]
        done = subprocess.run(
            [find_binary("redis-cli"), "--cluster", "reshard", f"{HOST}:{from_port}", *moves],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"redis-cli --cluster reshard failed: {done.stdout[-500:]}{done.stderr[-500:]}")

    def slots_of(self, port: int) -> int:
        return sum(end - start + 1 for start, end, master in self.slot_map(port) if master == port)

    def failover(self, master_port: int, timeout: float = 30.0) -> int:
        """CLUSTER FAILOVER on the master's replica (a graceful, coordinated switch); returns the
        replica's port once it is a master."""
        replica = self.replica_of(master_port)
        with self.client(replica) as client:
            client.execute_command("CLUSTER FAILOVER")
        self._wait(lambda: self._safe_role(replica) == "master", time.monotonic() + timeout, f":{replica} promoted")
        return replica

    def replica_synced(self, port: int) -> bool:
        """The server is a replica whose link to its master is up (it has finished its sync)."""
        try:
            with self.client(port) as client:
                info = client.info("replication")
        except (redis.RedisError, OSError):
            return False
        return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

    def kill_master(self, master_port: int, timeout: float = 30.0) -> int:
        """SIGKILL a master; returns its replica's port once the cluster has promoted it."""
        replica = self.replica_of(master_port)
        self.kill(master_port)
        self._wait(lambda: self._safe_role(replica) == "master", time.monotonic() + timeout, f":{replica} promoted")
        return replica

    def kill(self, port: int) -> None:
        proc = self.processes[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _safe_role(self, port: int) -> str | None:
        try:
            return self.role(port)
        except (redis.RedisError, OSError):
            return None

    def _answers(self, port: int) -> bool:
        try:
            with self.client(port) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _wait(self, condition: object, deadline: float, what: str) -> None:
        assert callable(condition)
        while not condition():
            dead = [port for port, proc in self.processes.items() if proc.poll() not in (None, -signal.SIGKILL)]
            if dead:
                raise ClusterError(f"redis-server :{dead[0]} exited; see {self.run_dir}/redis-{dead[0]}/redis.log")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.1)
