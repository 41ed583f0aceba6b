"""The local no-Docker cluster: redis-server, N nodes and nginx on loopback, torn down cleanly."""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from testpulse.devtools.children import ClusterError, die_with_parent, find_binary, free_port
from testpulse.devtools.redis_cluster import RedisClusterServers

# Copies of the repository's nginx.conf and deploy/prometheus/ ship inside the package, so that an
# installed wheel runs the cluster from any folder; tests/unit/test_bundled_data.py keeps them identical.
BUNDLED = importlib.resources.files("testpulse") / "data"
NGINX_CONF = BUNDLED / "nginx.conf"
PROMETHEUS_DIR = BUNDLED / "prometheus"
PROXY_FAIL_TIMEOUT_SECONDS = 5  # nginx.conf: `max_fails=1 fail_timeout=5s` on every node
NODES_BLOCK = re.compile(r"(    # BEGIN testpulse nodes\n).*?(    # END testpulse nodes\n)", re.S)


@dataclass
class NodeSpec:
    node_id: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def render_nginx_conf(
    template: str,
    nodes: list[NodeSpec],
    *,
    port: int,
    handshake_rate: int | None = None,
    connections_per_ip: int | None = None,
    upstream_sources: list[str] | None = None,
) -> str:
    """The repo's nginx.conf for these nodes and this port; only the marked parts change.

    `upstream_sources`: local addresses nginx binds its connections to the nodes to, spread by
    client address and port. One source address reaches one node address with at most
    ip_local_port_range's ports (~28k by default); more sources hold more proxied WebSockets."""
    servers = "".join(f"        server 127.0.0.1:{n.port} max_fails=1 fail_timeout=5s;\n" for n in nodes)
    lines = [
        "    upstream testpulse_nodes {",
        "        least_conn;",
        "        zone testpulse_nodes 64k;",
        servers.rstrip("\n"),
        "        keepalive 64;",
        "    }",
    ]
    for n in nodes:
        lines += [
            f"    upstream testpulse_{n.node_id} {{",
            f"        server 127.0.0.1:{n.port};",
            "        keepalive 16;",
            "    }",
        ]
    lines += ["    map $arg_sid $testpulse_upstream {", "        default         testpulse_nodes;"]
    lines += [f'        "~^{re.escape(n.node_id)}\\."     testpulse_{n.node_id};' for n in nodes]
    lines += ["    }"]
    if upstream_sources:
        share = 100.0 / len(upstream_sources)
        lines += ['    split_clients "$remote_addr:$remote_port" $testpulse_upstream_source {']
        lines += [f"        {share:.2f}% {a};" for a in upstream_sources[:-1]]
        lines += [f"        * {upstream_sources[-1]};", "    }", "    proxy_bind $testpulse_upstream_source;"]
    block = "\n".join(lines) + "\n"
    rendered, count = NODES_BLOCK.subn(lambda m: m.group(1) + block + m.group(2), template)
    if count != 1:
        raise ClusterError("nginx.conf lost its '# BEGIN/END testpulse nodes' markers")
    substitutions = [(r"listen 127\.0\.0\.1:\d+", f"listen 127.0.0.1:{port}")]
    if handshake_rate is not None:
        substitutions.append((r"rate=\d+r/s;", f"rate={handshake_rate}r/s;"))
    if connections_per_ip is not None:
        substitutions.append(
            (r"limit_conn connections_per_ip \d+;", f"limit_conn connections_per_ip {connections_per_ip};")
        )
    for pattern, replacement in substitutions:
        rendered, count = re.subn(pattern, replacement, rendered)
        if count != 1:
            raise ClusterError(f"nginx.conf: expected one match of {pattern!r}, found {count}")
    return rendered


def wait_http_ok(url: str, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    while True:
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{url}: process exited with status {proc.returncode}")
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise ClusterError(f"{url} did not become healthy in time")
        time.sleep(0.05)


@dataclass
class Cluster:
    nodes: int = 3
    port: int = 8080
    redis_url: str | None = None
    redis_cluster: int | None = None  # start a Redis Cluster of this many masters (each with a replica)
    database_url: str | None = None
    run_dir: Path | None = None
    handshake_rate: int | None = None
    connections_per_ip: int | None = None
    upstream_sources: list[str] | None = None
    with_prometheus: bool = False
    prometheus_port: int | None = None
    node_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    specs: list[NodeSpec] = field(default_factory=list)
    redis_servers: RedisClusterServers | None = None

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.run_dir = Path(self.run_dir or tempfile.mkdtemp(prefix="testpulse-cluster-"))
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            if self.redis_url is None and self.redis_cluster:
                self.redis_servers = RedisClusterServers(self.run_dir / "redis-cluster", masters=self.redis_cluster)
                self.redis_url = self.redis_servers.start().url
                deadline = time.monotonic() + timeout  # the nodes get the whole budget of their own
                # Stopped, and reported when they exit, like every other child.
                self.processes.update({f"redis-{p}": proc for p, proc in self.redis_servers.processes.items()})
            elif self.redis_url is None:
                self.redis_url = self._start_redis(deadline)
            self.database_url = (
                self.database_url
                or os.environ.get("TESTPULSE_DATABASE_URL")
                or (f"sqlite+aiosqlite:///{Path.cwd() / 'testpulse.db'}")
            )
            self.specs = [NodeSpec(f"node{i}", free_port()) for i in range(1, self.nodes + 1)]
            for spec in self.specs:
                self._start_node(spec)
            for spec in self.specs:
                wait_http_ok(f"{spec.url}/health", deadline, self.processes[spec.node_id])
            self._start_nginx(deadline)
            if self.with_prometheus:
                self._start_prometheus(deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        assert self.run_dir is not None
        log = open(self.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent
        )
        log.close()
        self.processes[name] = proc
        return proc

    def _start_redis(self, deadline: float, port: int | None = None) -> str:
        port = port or free_port()
        assert self.run_dir is not None
        proc = self._spawn(
            "redis",
            [
                find_binary("redis-server"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.run_dir),
            ],
        )
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError("redis-server did not start; see logs/redis.log")
            time.sleep(0.05)

    def _start_node(self, spec: NodeSpec) -> None:
        assert self.redis_url is not None and self.database_url is not None
        env = {
            **os.environ,
            # The local cluster migrates its database for you (production nodes wait for `testpulse migrate`).
            "TESTPULSE_MIGRATE_ON_START": "true",
            **self.node_env,
            "TESTPULSE_REDIS_URL": self.redis_url,
            "TESTPULSE_DATABASE_URL": self.database_url,
            "TESTPULSE_NODE_ID": spec.node_id,
        }
        self._spawn(
            spec.node_id,
            [sys.executable, "-m", "testpulse", "serve", "--host", "127.0.0.1", "--port", str(spec.port)],
            env,
        )

    def _start_nginx(self, deadline: float) -> None:
        assert self.run_dir is not None
        prefix = self.run_dir / "nginx"
        for sub in ("conf", "logs", "temp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        # nginx workers run as nobody when started by root: they must be able to write temp files.
        (prefix / "temp").chmod(0o777)
        conf = render_nginx_conf(
            NGINX_CONF.read_text(),
            self.specs,
            port=self.port,
            handshake_rate=self.handshake_rate,
            connections_per_ip=self.connections_per_ip,
            upstream_sources=self.upstream_sources,
        )
        temp_paths = "".join(
            f"{kind}_temp_path {prefix / 'temp' / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = conf.replace("http {\n", f"http {{\n    {temp_paths}\n", 1)
        (prefix / "conf" / "nginx.conf").write_text(conf)
        globals_ = f"daemon off; pid {prefix / 'nginx.pid'}; error_log {prefix / 'logs' / 'error.log'} warn;"
        nginx = find_binary("nginx")
        check = subprocess.run(
            [nginx, "-t", "-q", "-p", str(prefix), "-c", "conf/nginx.conf", "-g", globals_],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise ClusterError(f"nginx rejected the rendered config: {check.stderr.strip()}")
        proc = self._spawn("nginx", [nginx, "-p", str(prefix), "-c", "conf/nginx.conf", "-g", globals_])
        wait_http_ok(f"{self.proxy_url}/health", deadline, proc)

    def _start_prometheus(self, deadline: float) -> None:
        """deploy/prometheus/prometheus.yml and its alert rules, scraping this cluster's nodes."""
        assert self.run_dir is not None
        folder = self.run_dir / "prometheus"
        folder.mkdir(exist_ok=True)
        config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
        targets = "".join(f"          - 127.0.0.1:{spec.port}\n" for spec in self.specs)
        config, count = re.subn(
            r"(      - targets:\n)(?:          - [^\n]+\n)+", lambda m: m.group(1) + targets, config
        )
        if count != 1:
            raise ClusterError("deploy/prometheus/prometheus.yml: expected one static target list")
        (folder / "prometheus.yml").write_text(config)
        (folder / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
        self.prometheus_port = self.prometheus_port or free_port()
        proc = self._spawn(
            "prometheus",
            [
                find_binary("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--storage.tsdb.retention.time=1d",
                "--web.enable-lifecycle",
            ],
        )
        wait_http_ok(f"{self.prometheus_url}/-/ready", deadline, proc)

    @property
    def prometheus_url(self) -> str | None:
        return f"http://127.0.0.1:{self.prometheus_port}" if self.with_prometheus else None

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {
            "proxy": self.proxy_url,
            "redis": self.redis_url,
            "database": self.database_url,
            "run_dir": str(self.run_dir),
            "prometheus": self.prometheus_url,
            "nodes": [{"id": s.node_id, "url": s.url, "pid": self.processes[s.node_id].pid} for s in self.specs],
        }

    def restart_node(self, node_id: str, grace: float = 15.0, timeout: float = 30.0) -> None:
        """Drain one node (SIGTERM), wait for it to exit, start it again on the same port and id.
        Doing this node by node is a rolling restart: nginx sends handshakes to the others meanwhile."""
        spec = next(s for s in self.specs if s.node_id == node_id)
        terminate(self.processes[node_id], grace)
        self._start_node(spec)
        wait_http_ok(f"{spec.url}/ready", time.monotonic() + timeout, self.processes[node_id])

    def restart_redis(self, grace: float = 5.0, timeout: float = 30.0) -> None:
        """Stop the cluster's redis-server and start it again on the same port, empty (it keeps
        nothing on disk): what nodes meet when Redis is restarted under them."""
        proc = self.processes.get("redis")
        if proc is None or self.redis_url is None:
            raise ClusterError("this cluster did not start its own redis-server")
        port = int(self.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        terminate(proc, grace)
        self._start_redis(time.monotonic() + timeout, port)

    def dead_children(self) -> list[str]:
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    def stop(self, grace: float = 15.0) -> None:
        """Nodes first (they drain), then nginx, then Redis; SIGKILL whatever outlives the grace."""
        nodes = [s.node_id for s in self.specs]
        redis = ["redis", "prometheus", *(name for name in self.processes if name.startswith("redis-"))]
        for group in (nodes, ["nginx"], redis):
            procs = [self.processes[name] for name in group if name in self.processes]
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGQUIT if proc is self.processes.get("nginx") else signal.SIGTERM)
            end = time.monotonic() + grace
            for proc in procs:
                try:
                    proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if the process outlives `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    cluster = Cluster(
        nodes=args.nodes,
        port=args.port,
        redis_url=args.redis_url,
        redis_cluster=args.redis_cluster,
        database_url=args.database_url,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        handshake_rate=args.handshake_rate,
        connections_per_ip=args.connections_per_ip,
        with_prometheus=args.with_prometheus,
        prometheus_port=args.prometheus_port,
    )
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    rolling = False

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        nonlocal rolling
        rolling = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"testpulse cluster: {exc}", file=sys.stderr)
        return 1
    info = cluster.describe()
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(
            f"testpulse cluster is up: {info['proxy']}  (Ctrl-C stops all; SIGHUP restarts nodes one by one)",
            flush=True,
        )
        for node in info["nodes"]:
            print(f"  {node['id']}: {node['url']}  (pid {node['pid']})", flush=True)
        print(f"  redis: {info['redis']}\n  database: {info['database']}\n  logs: {info['run_dir']}/logs", flush=True)
        if info["prometheus"]:
            print(f"  prometheus: {info['prometheus']}", flush=True)
        print(f"  page: {info['proxy']}/", flush=True)
        operator_link = _operator_link(info["proxy"])
        if operator_link:
            print(f"  operator link (1 h): {operator_link}", flush=True)
    reported: set[str] = set()
    while not stopping:
        if rolling:
            rolling = False
            for index, spec in enumerate(cluster.specs):
                if index:
                    # A draining node answers handshakes with 503, and nginx then skips it for
                    # fail_timeout (5 s). Restarting the next node sooner could leave the proxy
                    # with no node in rotation ("no live upstreams"): let it forgive the last one.
                    time.sleep(PROXY_FAIL_TIMEOUT_SECONDS + 1)
                print(f"testpulse cluster: rolling restart of {spec.node_id}", flush=True)
                cluster.restart_node(spec.node_id)
            reported.clear()
        for name in cluster.dead_children():
            if name not in reported:
                reported.add(name)
                print(f"testpulse cluster: {name} exited (status {cluster.processes[name].returncode})", flush=True)
        time.sleep(0.2)
    print("testpulse cluster: stopping", flush=True)
    cluster.stop()
    return 0


def _operator_link(proxy_url: str) -> str | None:
    """In development mode, a ready link to the page for an operator (the token in the fragment)."""
    from testpulse.domain.auth import issue_token
    from testpulse.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError:
        return None
    if settings.env != "development":
        return None
    token = issue_token(settings, role="operator", sub="operator", ttl_seconds=3600)
    return f"{proxy_url}/#token={token}"


def register(commands: Any) -> None:
    parser = commands.add_parser("cluster", help="run a local cluster: redis-server, N nodes and nginx on loopback")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--port", type=int, default=8080, help="the proxy's port")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument(
        "--redis-cluster",
        type=int,
        default=None,
        metavar="N",
        help="start a Redis Cluster of N masters (N >= 3), each with one replica, instead of one redis-server",
    )
    parser.add_argument("--database-url", default=None, help="default: TESTPULSE_DATABASE_URL or ./testpulse.db")
    parser.add_argument("--run-dir", default=None, help="logs and nginx prefix (default: a temp dir)")
    parser.add_argument("--handshake-rate", type=int, default=None, help="nginx handshakes/s per client address")
    parser.add_argument("--connections-per-ip", type=int, default=None, help="nginx connections per client address")
    parser.add_argument("--with-prometheus", action="store_true", help="also run Prometheus scraping every node")
    parser.add_argument("--prometheus-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--json", action="store_true", help="print the cluster's addresses as one JSON line")
    parser.set_defaults(run=run)
