"""`python -m loadtests.bench connections --clients 50000 --nodes 1`: how many idle WebSocket
clients a node holds, with heartbeats on as shipped (Engine.IO PING every 25 s, 20 s to answer).

Raises its own descriptor limit (children inherit it), starts one node (`--nodes 1`) or a cluster
behind the repo's nginx.conf (`--through-proxy`), and opens idle Socket.IO-over-WebSocket clients
from several load-generator processes, each client's socket bound to one of several 127.0.0.x
source addresses (one source and destination pair has only ~28k ephemeral ports). The clients are
raw WebSocket frames on asyncio protocols (a few KB each): they complete the Socket.IO CONNECT with
a token, answer every Engine.IO PING `2` with PONG `3` and WebSocket pings with pongs, and count
what closed under them. Once all are connected it samples node RSS, node CPU (% of one core, from
/proc/PID/stat), the node's connected-clients gauge and the clients that were dropped, then prints
a table and writes JSON. docs/connections.md has the figures and the limits met on the way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import resource
import socket
import struct
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from loadtests.bench.common import DEFAULT_OUT, Profile, environment, log, save, table
from loadtests.bench.loadgen import WorkerProcesses, install_uvloop

PATH = b"/socket.io/?EIO=4&transport=websocket"
_KEY = base64.b64encode(b"testpulse-bench!")


# ---- limits ------------------------------------------------------------------------------------


def raise_nofile(needed: int) -> dict[str, int]:
    """Soft and hard RLIMIT_NOFILE of this process (and so of every child it starts) to at least
    `needed`; raising the hard limit takes root (CAP_SYS_RESOURCE). Returns what was and is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(needed, soft)
    if target > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    elif target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"needed": needed, "soft_before": soft, "hard_before": hard, "soft": now_soft, "hard": now_hard}


def kernel_limits() -> dict[str, str]:
    out: dict[str, str] = {}
    for key in (
        "net/ipv4/ip_local_port_range",
        "net/core/somaxconn",
        "net/ipv4/tcp_max_syn_backlog",
        "fs/file-max",
        "fs/nr_open",
        "net/netfilter/nf_conntrack_max",
    ):
        with contextlib.suppress(OSError):
            out[key.replace("/", ".")] = Path("/proc/sys", key).read_text().strip().replace("\t", " ")
    return out


def ephemeral_ports() -> int:
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return high - low + 1


# ---- the idle client ---------------------------------------------------------------------------


class HandshakeError(Exception):
    """A client that did not get as far as the Socket.IO CONNECT; the message is its reason."""


class Tally:
    """What one worker's clients saw: PINGs answered and how each closed."""

    def __init__(self) -> None:
        self.pings = 0
        self.closed: Counter[str] = Counter()
        self.open = 0


class IdleClient(asyncio.Protocol):
    """One Socket.IO client over a raw WebSocket: handshake, CONNECT with a token, then only PONGs."""

    __slots__ = ("auth", "buffer", "connected", "host", "stage", "tally", "transport")

    def __init__(self, host: bytes, auth: bytes, tally: Tally, connected: asyncio.Future[None]) -> None:
        self.host = host
        self.auth = auth
        self.tally = tally
        self.connected: asyncio.Future[None] | None = connected
        self.buffer = b""
        self.stage = 0  # 0 HTTP upgrade, 1 waiting for OPEN, 2 waiting for CONNECT, 3 idle, 4 closed by us
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        transport.write(
            b"GET " + PATH + b" HTTP/1.1\r\nHost: " + self.host + b"\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + _KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if self.stage == 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self._fail("http_" + buffer[9:12].decode(errors="replace"))
                return
            buffer = buffer[end + 4 :]
            self.stage = 1
        while len(buffer) >= 2:
            opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(buffer) < 4:
                    break
                length, start = struct.unpack_from("!H", buffer, 2)[0], 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                length, start = struct.unpack_from("!Q", buffer, 2)[0], 10
            if len(buffer) < start + length:
                break
            payload, buffer = buffer[start : start + length], buffer[start + length :]
            self._frame(opcode, payload)
        self.buffer = buffer

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 1:
            if payload == b"2":
                self.tally.pings += 1
                self._send(1, b"3")
            elif self.stage == 1 and payload[:1] == b"0":
                self.stage = 2
                self._send(1, b"40" + self.auth)
            elif self.stage == 2 and payload[:2] == b"40":
                self.stage = 3
                self.tally.open += 1
                if self.connected is not None and not self.connected.done():
                    self.connected.set_result(None)
                self.connected = None
            elif payload[:2] == b"44":
                self._fail("connect_error")
            elif payload[:2] == b"41" or payload[:1] == b"1":
                self._close_reason("server_disconnect")
        elif opcode == 9:
            self._send(10, payload)
        elif opcode == 8:
            self._close_reason("ws_close_" + str(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else ""))

    def _send(self, opcode: int, payload: bytes) -> None:
        # Masked with a zero key: the payload goes as it is (fine for a benchmark; RFC 6455 wants
        # an unpredictable key only against proxies that cache).
        if self.transport is not None:
            n = len(payload)
            head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
            self.transport.write(head + b"\0\0\0\0" + payload)

    def _fail(self, reason: str) -> None:
        if self.connected is not None and not self.connected.done():
            self.connected.set_exception(HandshakeError(reason))
        self.connected = None
        self.stage = 4
        if self.transport is not None:
            self.transport.close()

    def _close_reason(self, reason: str) -> None:
        if self.stage == 3:
            self.tally.closed[reason] += 1
            self.tally.open -= 1
            self.stage = 5
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stage == 3:
            self._close_reason("connection_lost")
        elif self.connected is not None and not self.connected.done():
            self.connected.set_exception(HandshakeError("lost_in_handshake"))
        self.transport = None

    def close(self) -> None:
        self.stage = 4
        if self.transport is not None:
            self.transport.close()


# ---- the load-generator worker -----------------------------------------------------------------


def _worker_main(conn: Connection) -> None:
    install_uvloop()
    asyncio.run(_Worker(conn).serve())


class _Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.tally = Tally()
        self.clients: list[IdleClient] = []

    async def serve(self) -> None:
        while True:
            command = await asyncio.to_thread(self.conn.recv)
            op = command.pop("op")
            if op == "exit":
                for client in self.clients:
                    client.close()
                await asyncio.sleep(0.5)
                self.conn.send(None)
                return
            self.conn.send(await getattr(self, op)(**command))

    async def connect(
        self, url: str, sources: list[str], first: int, count: int, in_flight: int, within: float
    ) -> dict[str, Any]:
        from loadtests.bench.systems import token

        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        host_header = parts.netloc.encode()
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(in_flight)
        failures: Counter[str] = Counter()
        ok = 0

        async def one(i: int) -> None:
            nonlocal ok
            auth = json.dumps({"token": token("viewer", f"idle-{i}")}, separators=(",", ":")).encode()
            async with gate:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    sock.bind((sources[i % len(sources)], 0))
                    connected: asyncio.Future[None] = loop.create_future()
                    async with asyncio.timeout(within):
                        await loop.sock_connect(sock, (host, port))
                        _, client = await loop.create_connection(
                            lambda: IdleClient(host_header, auth, self.tally, connected), sock=sock
                        )
                        self.clients.append(client)
                        await connected
                    ok += 1
                except TimeoutError:
                    failures["timeout"] += 1
                except OSError as exc:
                    failures[exc.strerror or type(exc).__name__] += 1
                    sock.close()
                except HandshakeError as exc:
                    failures[str(exc)] += 1

        started = time.time()
        await asyncio.gather(*(one(i) for i in range(first, first + count)))
        return {"ok": ok, "failures": dict(failures), "seconds": time.time() - started}

    async def stats(self) -> dict[str, Any]:
        return {"open": self.tally.open, "pings": self.tally.pings, "closed": dict(self.tally.closed)}


class Generator(WorkerProcesses):
    """The coordinator's handle on the idle-client processes."""

    exit_timeout = 20.0  # tens of thousands of clients to close

    def __init__(self, workers: int) -> None:
        super().__init__(_worker_main, workers)

    async def connect(
        self, url: str, sources: list[str], clients: int, in_flight: int, within: float
    ) -> dict[str, Any]:
        n = len(self.pipes)
        shares = [clients // n + (1 if i < clients % n else 0) for i in range(n)]
        firsts = [sum(shares[:i]) for i in range(n)]
        answers = await self._ask(
            [
                {
                    "op": "connect",
                    "url": url,
                    "sources": sources,
                    "first": first,
                    "count": share,
                    "in_flight": max(1, in_flight // n),
                    "within": within,
                }
                for first, share in zip(firsts, shares, strict=True)
            ]
        )
        failures: Counter[str] = Counter()
        for answer in answers:
            failures.update(answer["failures"])
        return {"ok": sum(a["ok"] for a in answers), "failures": dict(failures)}

    async def stats(self) -> dict[str, Any]:
        answers = await self._ask([{"op": "stats"} for _ in self.pipes])
        closed: Counter[str] = Counter()
        for answer in answers:
            closed.update(answer["closed"])
        return {
            "open": sum(a["open"] for a in answers),
            "pings": sum(a["pings"] for a in answers),
            "closed": dict(closed),
        }


# ---- sampling ----------------------------------------------------------------------------------


def proc_usage(pid: int, children: bool = False) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process, with its children's when asked (nginx workers)."""
    cpu, rss = 0.0, 0
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid)
        for proc in [parent, *(parent.children() if children else [])]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
    return cpu, rss


async def connected_clients(http: Any, url: str) -> dict[str, float]:
    from loadtests.bench.systems import metric_sum, parse_metrics

    async with http.get(f"{url}/metrics") as resp:
        values = parse_metrics(await resp.text())
    return {
        "clients": metric_sum(values, "testpulse_connected_clients"),
        "ping_timeouts": metric_sum(values, 'testpulse_disconnects_total{reason="ping_timeout"}'),
        "disconnects": metric_sum(values, "testpulse_disconnects_total"),
    }


async def wait_connected(http: Any, urls: dict[str, str], expected: int, within: float) -> int:
    deadline = time.monotonic() + within
    total = 0
    while time.monotonic() < deadline:
        total = 0
        for url in urls.values():
            total += int((await connected_clients(http, url))["clients"])
        if total >= expected:
            return total
        await asyncio.sleep(1.0)
    return total


# ---- the scenario ------------------------------------------------------------------------------


def source_addresses(count: int) -> list[str]:
    return [f"127.0.0.{10 + i}" for i in range(count)]


async def run(args: argparse.Namespace) -> None:
    from loadtests.bench.systems import SingleNode, TestpulseCluster
    from loadtests.bench.wire import http_session

    # Descriptors: each client holds one in the generator and one in its node; through the proxy
    # nginx holds two more per client (it sets its workers' own limit, worker_rlimit_nofile).
    needed = args.clients + 4096
    limits = raise_nofile(needed)
    was, now = f"{limits['soft_before']}/{limits['hard_before']}", f"{limits['soft']}/{limits['hard']}"
    log(f"RLIMIT_NOFILE (soft/hard) needed >= {needed}: was {was}, now {now}")
    if limits["soft"] < needed:
        raise SystemExit(
            f"RLIMIT_NOFILE: {needed} descriptors needed, the hard limit is {limits['hard']} and raising it"
            " takes CAP_SYS_RESOURCE (see docs/connections.md); run fewer --clients or raise `ulimit -Hn`"
        )
    ports = ephemeral_ports()
    sources = args.sources or max(2, -(-args.clients // (ports // 2)))
    addresses = source_addresses(sources)
    if args.clients / sources > ports:
        raise SystemExit(f"{args.clients} clients over {sources} sources exceed {ports} ephemeral ports each")
    upstream_sources = 0
    if args.through_proxy:
        per_node = -(-args.clients // args.nodes)
        upstream_sources = args.upstream_sources or max(1, -(-per_node // (ports // 2)))
        system: Any = TestpulseCluster(
            args.nodes,
            handshake_rate=1_000_000,
            connections_per_ip=1_000_000,
            upstream_sources=source_addresses(upstream_sources) if upstream_sources > 1 else None,
        )
        target = system.proxy_url
    else:
        if args.nodes != 1:
            raise SystemExit("without --through-proxy the scenario runs one node (--nodes 1)")
        system = SingleNode()
        target = system.node_urls["node1"]
    node_pids = system.node_pids()
    aux = system.aux_pids() if args.through_proxy else {}
    log(f"{args.clients} clients to {target} from {sources} source addresses, {args.workers} generator processes")
    generator = Generator(args.workers)
    result: dict[str, Any] = {}
    try:
        async with http_session() as http:
            before = {node: proc_usage(pid) for node, pid in node_pids.items()}
            started = time.monotonic()
            joined = await generator.connect(target, addresses, args.clients, args.in_flight, args.connect_timeout)
            connect_seconds = time.monotonic() - started
            log(f"connected {joined['ok']} in {connect_seconds:.0f} s; failures {joined['failures']}")
            seen = await wait_connected(http, system.node_urls, joined["ok"], 30)
            await asyncio.sleep(args.settle)
            samples: list[dict[str, Any]] = []
            gen_stats0 = await generator.stats()
            metrics0 = {node: await connected_clients(http, url) for node, url in system.node_urls.items()}
            last = {node: proc_usage(pid) for node, pid in node_pids.items()}
            last_aux = {name: proc_usage(pid, children=name == "nginx") for name, pid in aux.items()}
            window_cpu = {node: cpu for node, (cpu, _) in last.items()}
            last_t = window_start = time.monotonic()
            profiles = {
                node: Profile(pid, args.seconds, args.out / "profiles" / f"connections-{node}.collapsed")
                for node, pid in node_pids.items()
                if args.profile
            }
            while time.monotonic() - window_start < args.seconds:
                await asyncio.sleep(args.interval)
                now = time.monotonic()
                row: dict[str, Any] = {"t": round(now - window_start, 1)}
                for node, pid in node_pids.items():
                    cpu, rss = proc_usage(pid)
                    m = await connected_clients(http, system.node_urls[node])
                    row[node] = {
                        "rss_mb": round(rss / 2**20, 1),
                        "cpu_pct": round(100 * (cpu - last[node][0]) / (now - last_t), 1),
                        "clients": int(m["clients"]),
                    }
                    last[node] = (cpu, rss)
                for name, pid in aux.items():
                    cpu, rss = proc_usage(pid, children=name == "nginx")
                    row[name] = {
                        "rss_mb": round(rss / 2**20, 1),
                        "cpu_pct": round(100 * (cpu - last_aux[name][0]) / (now - last_t), 1),
                    }
                    last_aux[name] = (cpu, rss)
                last_t = now
                samples.append(row)
                log(" ".join(f"{k}={v}" for k, v in row.items()))
            window = time.monotonic() - window_start
            gen_stats = await generator.stats()
            metrics1 = {node: await connected_clients(http, url) for node, url in system.node_urls.items()}
            gen_rss = sum(proc_usage(pid)[1] for pid in generator.pids)
            profiled = {node: p.finish() for node, p in profiles.items()}
        per_node: dict[str, Any] = {}
        for node in node_pids:
            rss = [s[node]["rss_mb"] for s in samples]
            cpu_total = last[node][0] - before[node][0]
            per_node[node] = {
                "clients": int(metrics1[node]["clients"]),
                "rss_mb_max": max(rss),
                "rss_mb_end": rss[-1],
                "kb_per_client": round(rss[-1] * 1024 / metrics1[node]["clients"], 1)
                if metrics1[node]["clients"]
                else None,
                "cpu_pct_of_one_core": round(100 * (last[node][0] - window_cpu[node]) / window, 2),
                "cpu_pct_max_sample": max(s[node]["cpu_pct"] for s in samples),
                "cpu_s_including_connect": round(cpu_total, 1),
                "ping_timeouts": int(metrics1[node]["ping_timeouts"]),
                "disconnects_in_window": int(metrics1[node]["disconnects"] - metrics0[node]["disconnects"]),
            }
        dropped = sum(gen_stats["closed"].values())
        result = {
            "clients": args.clients,
            "nodes": args.nodes,
            "through_proxy": bool(args.through_proxy),
            "connected": joined["ok"],
            "connected_on_nodes": seen,
            "connect_failures": joined["failures"],
            "connect_seconds": round(connect_seconds, 1),
            "source_addresses": addresses,
            "upstream_source_addresses": upstream_sources,
            "window_seconds": round(window, 1),
            "per_node": per_node,
            "proxy": {
                name: {
                    "rss_mb_max": max(s[name]["rss_mb"] for s in samples),
                    "cpu_pct_mean": round(sum(s[name]["cpu_pct"] for s in samples) / len(samples), 2),
                }
                for name in aux
            },
            "pings_answered_in_window": gen_stats["pings"] - gen_stats0["pings"],
            "dropped": dropped,
            "dropped_by_reason": gen_stats["closed"],
            "heartbeat_timeouts": sum(n["ping_timeouts"] for n in per_node.values()),
            "generator_rss_mb": round(gen_rss / 2**20, 1),
            "generator_kb_per_client": round(gen_rss / 1024 / max(1, joined["ok"]), 2),
            "limits": {"nofile": limits, "kernel": kernel_limits(), "ephemeral_ports": ports},
            "samples": samples,
            "profiles": profiled or None,
            "system": system.describe(),
        }
    finally:
        generator.shutdown()
        system.stop()
    document = {"environment": environment(), "connections": result}
    path = save(args.out, "connections", document)
    print(render(result))
    print(f"\nresults: {path}")


def render(r: dict[str, Any]) -> str:
    rows = [
        [
            node,
            n["clients"],
            n["rss_mb_max"],
            n["kb_per_client"],
            n["cpu_pct_of_one_core"],
            n["cpu_pct_max_sample"],
            n["ping_timeouts"],
        ]
        for node, n in r["per_node"].items()
    ]
    rows += [[name, "-", p["rss_mb_max"], "-", p["cpu_pct_mean"], "-", "-"] for name, p in r["proxy"].items()]
    lines = [
        f"connections: {r['connected']:,}/{r['clients']:,} idle clients connected in {r['connect_seconds']} s"
        f" ({'through nginx' if r['through_proxy'] else 'direct'}, {len(r['source_addresses'])} source addresses),"
        f" then {r['window_seconds']} s sampled",
        "",
        table(
            ["process", "clients", "rss MB (max)", "KB/client", "cpu % of a core", "cpu % max", "ping timeouts"], rows
        ),
        "",
        f"dropped clients: {r['dropped']} {r['dropped_by_reason'] or ''}; heartbeat timeouts on nodes:"
        f" {r['heartbeat_timeouts']}; PINGs answered in the window: {r['pings_answered_in_window']:,}",
        f"connect failures: {r['connect_failures'] or 'none'}; generator RSS {r['generator_rss_mb']} MB"
        f" ({r['generator_kb_per_client']} KB/client)",
        f"RLIMIT_NOFILE needed {r['limits']['nofile']['needed']:,} (was {r['limits']['nofile']['soft_before']:,}),"
        f" ephemeral ports per source/destination pair {r['limits']['ephemeral_ports']:,}",
    ]
    for node, summary in (r.get("profiles") or {}).items():
        if summary and "self_pct" in summary:
            top = ", ".join(f"{name} {pct}%" for name, pct in summary["self_pct"][:8])
            lines.append(f"{node} profile ({summary['samples']} samples, {summary['file']}): {top}")
    return "\n".join(lines)


def register(commands: Any) -> None:
    p = commands.add_parser("connections", help="idle WebSocket clients a node (or a cluster through nginx) holds")
    p.add_argument("--clients", type=int, default=50_000)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--through-proxy", action="store_true", help="a cluster (Redis, nodes) behind the repo's nginx.conf")
    p.add_argument("--sources", type=int, default=0, help="127.0.0.x client source addresses (default: enough ports)")
    p.add_argument(
        "--upstream-sources", type=int, default=0, help="nginx proxy_bind addresses toward the nodes (default: enough)"
    )
    p.add_argument("--workers", type=int, default=4, help="load-generator processes")
    p.add_argument("--in-flight", type=int, default=200, help="connects in flight over all workers")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the last connect before sampling")
    p.add_argument("--seconds", type=float, default=60.0, help="sampling window")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument(
        "--profile", action="store_true", help="py-spy every node over the sampling window (<out>/profiles/)"
    )
    p.set_defaults(run=run)
