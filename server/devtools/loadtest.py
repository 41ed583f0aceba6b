"""`testpulse loadtest SCENARIO`: a headless Locust run of loadtests/locust/<scenario>.py, gated by its objectives.

Without --target a local cluster (testpulse.devtools.cluster.Cluster: redis-server, N nodes, nginx) is started on
free loopback ports for the run and stopped after it. The locustfile evaluates the objectives
(connect p99, delivery p99, failure ratio, gaps, duplicates, completeness) and exits non-zero when
one fails; this command passes that exit code on, so `testpulse loadtest ... && deploy` is a gate.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from testpulse.devtools.children import ClusterError, free_port
from testpulse.devtools.cluster import Cluster, terminate
from testpulse.devtools.soak import Conductor
from testpulse.devtools.soak import Plan as SoakPlan

SCENARIOS = ("storm", "fanout", "reconnect", "steady", "soak")
SOAK_RUN_TIME = 4 * 3600.0  # soak --run-time default
# Beyond --run-time a run spends the ramp, the drain (bounded by --drain-timeout, 20 s by default)
# and a few bounded waits; past this margin it is stuck and is stopped.
OVERRUN_SECONDS = 150.0
DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")

# Scenario knobs forwarded to the locustfile when given (see loadtests/locust/control.py).
KNOBS: list[tuple[str, type[Any], str]] = [
    ("--sessions", int, "sessions created for the run"),
    ("--detectors", int, "detector users (part of --users)"),
    ("--operators", int, "operator users (part of --users; steady)"),
    ("--detections-per-second", float, "publish rate of each detector"),
    ("--batch", int, "detections per publish (>1 uses publish_detections)"),
    ("--inflight", int, "publishes a detector may have unanswered at once"),
    ("--polling-share", float, "share of viewers on long-polling"),
    ("--upgrade-share", float, "share of viewers that poll, then upgrade to WebSocket"),
    ("--churn-seconds", float, "viewers reload about this often (0: never)"),
    ("--fault-at", float, "when the fault fires, as a fraction of the main phase"),
    ("--drain-timeout", float, "longest wait for every viewer to catch up at the end"),
    ("--recover-timeout", float, "longest reconnect+rejoin of one viewer"),
    ("--disconnect-share", float, "share of viewers a disconnect fault drops"),
    ("--settle-seconds", float, "pause between the ramp and the main phase"),
    ("--join", str, "viewers join with last_seq=0 (start) or live"),
    ("--kill-node", str, "node id to kill with --fault kill-node (default: the busiest)"),
]
OBJECTIVES: list[tuple[str, str]] = [
    ("--slo-connect-p99-ms", "connect p99 in ms, or off (default 2000)"),
    ("--slo-delivery-p99-ms", "delivery p99 in ms, or off (default 1000)"),
    ("--slo-failure-ratio", "failed/all requests, or off (default 0.01)"),
    ("--slo-max-gaps", "seq gaps seen by viewers, or off (default 0)"),
    ("--slo-max-duplicates", "duplicate seqs seen by viewers, or off (default 0)"),
]


def parse_duration(text: str) -> float:
    """Locust-style duration: 45, 45s, 2m, 1h30m."""
    parts = DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use 45s, 2m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("TESTPULSE_"):
        raise argparse.ArgumentTypeError(f"expected TESTPULSE_NAME=value, got {text!r}")
    return key, value


class CpuSampler:
    """CPU% of the run's processes (Locust, nodes, nginx, Redis) once a second, from /proc, so that a
    report can say what limited a run: a saturated generator, saturated nodes, or a busy machine."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.samples: dict[str, list[float]] = {}
        self.load: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK")

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        processes = {
            name: {"mean": round(sum(v) / len(v), 1), "peak": round(max(v), 1)} for name, v in self.samples.items() if v
        }
        return {"cpu_percent": processes, "load_average_1m": self.load, "cpus": os.cpu_count()}

    @staticmethod
    def _stat(pid: str) -> tuple[int, int] | None:
        """(parent pid, utime + stime in ticks) of a process, from /proc/<pid>/stat."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[1]), int(fields[11]) + int(fields[12])

    def _run(self) -> None:
        last: dict[str, tuple[float, int]] = {}
        while not self._stop.wait(1.0):
            self.load.append(round(os.getloadavg()[0], 2))
            # A watched process counts with its direct children (nginx's workers, Locust's forks).
            stats = {pid: st for pid in os.listdir("/proc") if pid.isdigit() and (st := self._stat(pid))}
            now = time.monotonic()
            for name, pid in list(self.pids.items()):
                if str(pid) not in stats:
                    continue
                ticks = stats[str(pid)][1] + sum(t for parent, t in stats.values() if parent == pid)
                if name in last:
                    then, before = last[name]
                    self.samples.setdefault(name, []).append(100.0 * max(0, ticks - before) / self._hz / (now - then))
                last[name] = (now, ticks)


def describe_cpu(resources: dict[str, Any]) -> str:
    shown = ", ".join(f"{name} {v['mean']:.0f}/{v['peak']:.0f}" for name, v in resources["cpu_percent"].items())
    load = resources["load_average_1m"]
    spread = f"{min(load):.1f}-{max(load):.1f}" if load else "-"
    return f"CPU% mean/peak: {shown}; load average (1 min) {spread} on {resources['cpus']} CPUs"


def locustfile(scenario: str) -> Path:
    """The scenario's locustfile: the Locust scenarios ship in the wheel as the testpulse.devtools.scenarios package,
    so `testpulse loadtest` runs from any folder, installed or not."""
    found = importlib.resources.files("testpulse.devtools.scenarios") / f"{scenario}.py"
    if not isinstance(found, Path):
        raise ClusterError(
            f"testpulse.devtools.scenarios is not installed as files on disk ({found}); Locust needs a path"
        )
    return found


def locust_argv(args: argparse.Namespace, target: str, results: Path, cluster_json: str | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile(args.scenario)),
        "--headless",
        "--only-summary",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{int(args.run_time)}s",
        "--host",
        target,
        "--csv",
        str(results / "stats"),
        "--html",
        str(results / "report.html"),
        "--results-dir",
        str(results),
        "--fault",
        args.fault or ("disconnect" if args.scenario == "reconnect" else "none"),
    ]
    if cluster_json:
        argv += ["--cluster-json", cluster_json]
    for flag, _, _ in KNOBS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    for flag, _ in OBJECTIVES:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv + shlex.split(args.locust_args or "")


def run_locust(args: argparse.Namespace, argv: list[str], results: Path, sampler: CpuSampler) -> int:
    """Run Locust (alone, or a master and --workers workers) to completion or to the deadline."""
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    if args.workers > 0:
        port = free_port()
        master = ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port)]
        procs.append(subprocess.Popen([*argv, *master, "--expect-workers", str(args.workers)]))
        sampler.watch("locust-master", procs[0].pid)
        worker_argv = [*argv[:5], "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
        for i in range(args.workers):
            log = open(results / f"worker-{i + 1}.log", "ab")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(worker_argv, stdout=log, stderr=subprocess.STDOUT))
            sampler.watch(f"locust-worker{i + 1}", procs[-1].pid)
    else:
        procs.append(subprocess.Popen(argv))
        sampler.watch("locust", procs[0].pid)
    sampler.start()
    deadline = time.monotonic() + args.run_time + args.users / args.spawn_rate + OVERRUN_SECONDS
    try:
        while procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if procs[0].poll() is None:
            print(f"testpulse loadtest: Locust overran its deadline by {OVERRUN_SECONDS:.0f}s; stopping it", flush=True)
            return_code = 3
        else:
            return_code = procs[0].returncode
    finally:
        for proc in procs:
            terminate(proc, grace=15.0 if proc is procs[0] else 5.0)
        for log in logs:
            log.close()
    return return_code


def soak_plan_of(args: argparse.Namespace) -> tuple[SoakPlan, str | None]:
    """The soak's schedule from its options, and what is wrong with them (None: nothing)."""
    wrong: str | None = None
    try:
        redis_restart_at = None if args.redis_restart_at in ("off", "none") else float(args.redis_restart_at)
    except ValueError:
        redis_restart_at, wrong = None, "--redis-restart-at must be a fraction of the run or off"
    plan = SoakPlan(
        run_time=args.run_time,
        restart_every=args.restart_every,
        redis_restart_at=redis_restart_at,
        sample_every=args.sample_every,
    )
    if args.target:
        wrong = "soak restarts nodes and Redis: it runs on its own local cluster, not --target"
    return plan, wrong or plan.validate()


def run(args: argparse.Namespace) -> int:
    if args.run_time is None:
        args.run_time = SOAK_RUN_TIME if args.scenario == "soak" else 30.0
    soak_plan: SoakPlan | None = None
    if args.scenario == "soak":
        soak_plan, problem = soak_plan_of(args)
        if problem:
            print(f"testpulse loadtest soak: {problem}", file=sys.stderr)
            return 2
    if args.users < 1 or args.spawn_rate <= 0 or args.run_time <= 0:
        print("testpulse loadtest: --users, --spawn-rate and --run-time must be positive", file=sys.stderr)
        return 2
    if importlib.util.find_spec("locust") is None:
        print(
            "testpulse loadtest: Locust is missing; install the extra: pip install 'testpulse[loadtest]'",
            file=sys.stderr,
        )
        return 2
    if args.fault == "kill-node" and args.target and not args.cluster_json:
        print("testpulse loadtest: --fault kill-node with --target needs --cluster-json (node pids)", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = Path(args.results or Path("results") / "loadtest" / f"{args.scenario}-{stamp}").resolve()
    results.mkdir(parents=True, exist_ok=True)
    interrupted = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Locust gets the same Ctrl-C and finishes its report; we wait for it, then stop the cluster.
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_signal)
    cluster: Cluster | None = None
    sampler = CpuSampler()
    try:
        target: str = args.target or ""
        cluster_json: str | None = args.cluster_json
        if not target:
            cluster = Cluster(
                nodes=args.nodes,
                port=free_port(),
                database_url=args.database_url or f"sqlite+aiosqlite:///{results / 'cluster' / 'testpulse.db'}",
                run_dir=results / "cluster",
                node_env=dict(args.node_env or []),
                redis_cluster=args.redis_cluster,
            )
            try:
                cluster.start()
            except ClusterError as exc:
                print(f"testpulse loadtest: cannot start the cluster: {exc}", file=sys.stderr)
                return 2
            target = cluster.proxy_url
            description = results / "cluster.json"
            description.write_text(json.dumps(cluster.describe(), indent=2) + "\n")
            cluster_json = str(description)
            for name, proc in cluster.processes.items():
                sampler.watch(name, proc.pid)
            nodes = ", ".join(f"{n['id']} (pid {n['pid']})" for n in cluster.describe()["nodes"])
            print(f"testpulse loadtest: cluster up at {target}: {nodes}", flush=True)
        conductor = None
        soak_problems: list[str] = []
        if soak_plan is not None and cluster is not None:
            conductor = Conductor(cluster, soak_plan, results, lambda line: print(line, flush=True))
            conductor.start()
        code = run_locust(args, locust_argv(args, target, results, cluster_json), results, sampler)
        if conductor is not None:
            summary_path = results / "summary.json"
            report = conductor.finish(json.loads(summary_path.read_text()) if summary_path.exists() else None)
            print((results / "soak.txt").read_text(), flush=True)
            soak_problems = report["verdict"]["problems"]
        resources = sampler.stop()
        (results / "resources.json").write_text(json.dumps(resources, indent=2) + "\n")
        print(f"testpulse loadtest: {describe_cpu(resources)}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        signal.signal(signal.SIGINT, previous)
    return verdict(args.scenario, results, code, interrupted, soak_problems)


def verdict(scenario: str, results: Path, code: int, interrupted: bool, problems: list[str] | None = None) -> int:
    summary_path = results / "summary.json"
    if not summary_path.exists():
        print(f"testpulse loadtest {scenario}: no summary (Locust exited with {code}); see {results}", flush=True)
        return code or 2
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    failed = [o for o in summary["objectives"] if not o["ok"]]
    if failed:
        names = "; ".join(f"{o['name']} = {o['value']} (limit {o['limit']}) {o['detail']}".strip() for o in failed)
        print(f"testpulse loadtest {scenario}: FAILED objective(s): {names}", flush=True)
    elif problems:
        print(f"testpulse loadtest {scenario}: FAILED: {'; '.join(problems)}", flush=True)
    elif interrupted:
        print(f"testpulse loadtest {scenario}: interrupted", flush=True)
    else:
        print(f"testpulse loadtest {scenario}: PASSED, every objective held", flush=True)
    print(f"testpulse loadtest: report {results / 'report.html'}, CSV {results / 'stats_*.csv'}", flush=True)
    if failed or problems or interrupted:
        return code or 1
    return code


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "loadtest",
        help="run a Locust scenario headless against a local cluster (or --target) and gate on its objectives",
        description="Exit status: 0 when every objective held, 1 when one failed, 2+ when the run itself failed. "
        "--locust-args passes further options to Locust unchanged.",
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--users", type=int, default=50, help="users in total (viewers + detectors + operators)")
    parser.add_argument("--spawn-rate", type=float, default=50.0, help="users started per second")
    parser.add_argument(
        "--run-time", type=parse_duration, default=None, help="ramp + main phase, e.g. 45s, 2m (default 30s; soak: 4h)"
    )
    soak = parser.add_argument_group("soak", "the soak scenario's schedule and report (soak.json, soak.txt)")
    soak.add_argument(
        "--restart-every", type=parse_duration, default=600.0, help="drain and restart a node this often (0: never)"
    )
    soak.add_argument(
        "--redis-restart-at", default="0.5", help="restart Redis once, at this fraction of the run (off: never)"
    )
    soak.add_argument("--sample-every", type=parse_duration, default=60.0, help="resource sampling interval")
    parser.add_argument("--target", default=None, help="proxy URL of a running cluster (default: start one)")
    parser.add_argument("--cluster-json", default=None, help="with --target: `testpulse cluster --json` output")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the local cluster")
    parser.add_argument(
        "--redis-cluster", type=int, default=None, metavar="N", help="local cluster on a Redis Cluster of N masters"
    )
    parser.add_argument("--database-url", default=None, help="local cluster database (default: SQLite in results)")
    parser.add_argument(
        "--node-env",
        type=_env_pair,
        action="append",
        metavar="TESTPULSE_X=V",
        help="setting for the local cluster's nodes (repeatable)",
    )
    parser.add_argument("--workers", type=int, default=0, help="distributed Locust: a master and this many workers")
    parser.add_argument("--results", default=None, help="results folder (default: results/loadtest/SCENARIO-TIME)")
    parser.add_argument(
        "--fault",
        choices=["none", "disconnect", "kill-node"],
        default=None,
        help="reconnect: drop every viewer (disconnect, default) or SIGKILL a node",
    )
    for flag, kind, text in KNOBS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    for flag, text in OBJECTIVES:
        parser.add_argument(flag, default=None, help=text)
    parser.add_argument(
        "--locust-args", default="", metavar="'ARGS'", help="more Locust options: --locust-args='--csv-full-history'"
    )
    parser.set_defaults(run=run)
