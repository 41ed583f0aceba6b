"""Run control shared by every scenario: options, the session plan, phases, counters, the load shape, the verdict.

A run goes through phases, decided in one place (the shape, on the master or the single local
process) and broadcast to every worker as Locust custom messages:

    ramp   users are started at --spawn-rate; viewers connect and join their session
    main   detectors publish, operators drive sessions; a fault (mass disconnect, killed node) fires here
    drain  detectors stop; once they have, the master reads every session's last seq from the API and
           sends it out; each viewer waits until it has seen every seq up to it (its delivery check)
    leave  viewers leave their session and disconnect
    done   workers send their final counters; the objectives are evaluated; the shape ends the run

--run-time covers ramp and main; drain, leave and done add a few seconds (bounded by --drain-timeout).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import requests
from gevent.event import AsyncResult, Event
from locust import LoadTestShape, events
from locust.env import Environment
from locust.runners import WORKER_REPORT_INTERVAL, LocalRunner, MasterRunner, WorkerRunner

from testpulse.devtools.scenarios import slo
from testpulse.devtools.scenarios.client import DELIVERY, RECOVER, SIO, Recorder

log = logging.getLogger("testpulse.devtools.loadtest")

PHASES = ("ramp", "main", "drain", "leave", "done")
TOKEN_TTL_SECONDS = 3600  # beyond the run time
PLAN_TIMEOUT = 60.0  # a user gives up waiting for the plan (sessions created by the master) after this
STEP_TIMEOUT = 20.0  # longest wait for detectors to stop, viewers to leave, workers to report


@dataclass(frozen=True)
class Scenario:
    """A scenario's defaults; every field can be overridden by the option of the same name."""

    name: str
    sessions: int = 2
    detectors: int = 2
    operators: int = 0
    detections_per_second: float = 10.0  # per detector
    batch: int = 1  # detections per publish; > 1 uses publish_detections
    inflight: int = 4  # publishes a detector may have unanswered at once
    polling_share: float = 0.1  # viewers on long-polling only
    upgrade_share: float = 0.0  # viewers that start on polling and upgrade to WebSocket
    join: str = "start"  # start: join with last_seq=0, every seq from 1 is checked; live: no last_seq
    churn_seconds: float = 0.0  # viewers reload (reconnect, rejoin with last_seq) about this often; 0: never
    fault: str = "none"  # none, disconnect (every viewer drops at once), kill-node (SIGKILL one node)
    fault_at: float = 0.4  # when the fault fires, as a fraction of the main phase
    disconnect_share: float = 1.0  # share of viewers that drop in a `disconnect` fault
    settle_seconds: float = 2.0  # after the ramp, before main
    run_time: float = 30.0  # when neither --run-time nor the web UI gives one
    drain_timeout: float = 20.0
    recover_timeout: float = 30.0


@dataclass(frozen=True)
class RunConfig:
    scenario: str
    host: str
    users: int
    spawn_rate: float
    run_time: float
    sessions: int
    detectors: int
    operators: int
    detections_per_second: float
    batch: int
    inflight: int
    polling_share: float
    upgrade_share: float
    join: str
    churn_seconds: float
    fault: str
    fault_at: float
    disconnect_share: float
    settle_seconds: float
    drain_timeout: float
    recover_timeout: float
    kill_node: str | None
    cluster_json: str | None
    results_dir: str | None
    thresholds: slo.Thresholds

    @classmethod
    def resolve(cls, scenario: Scenario, environment: Environment) -> RunConfig:
        opts = environment.parsed_options
        given = vars(opts) if opts is not None else {}
        values: dict[str, Any] = {}
        for f in fields(Scenario):
            if f.name != "name":
                chosen = given.get(f.name)
                values[f.name] = getattr(scenario, f.name) if chosen is None else chosen
        default_run_time = values.pop("run_time")
        run_time = given.get("run_time") or default_run_time
        csv_prefix = given.get("csv_prefix")
        results_dir = given.get("results_dir") or (str(Path(csv_prefix).parent) if csv_prefix else None)
        defaults = slo.Thresholds()
        thresholds = slo.Thresholds(
            **{f.name: _limit(given.get(f"slo_{f.name}"), getattr(defaults, f.name)) for f in fields(slo.Thresholds)}
        )
        return cls(
            scenario=scenario.name,
            host=(environment.host or given.get("host") or "").rstrip("/"),
            users=int(given.get("num_users") or 1),
            spawn_rate=float(given.get("spawn_rate") or 1),
            run_time=float(run_time),
            kill_node=given.get("kill_node"),
            cluster_json=given.get("cluster_json"),
            results_dir=results_dir,
            thresholds=thresholds,
            **values,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return cls(**{**data, "thresholds": slo.Thresholds(**data["thresholds"])})


def _limit(raw: Any, default: float | None) -> float | None:
    if raw is None:
        return default
    return slo.parse_limit(str(raw))


def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("testpulse", "scenario knobs (default: the scenario's own) and objectives")
    group.add_argument("--sessions", type=int, default=None, help="sessions created for the run")
    group.add_argument("--detectors", type=int, default=None, help="detector users (included in --users)")
    group.add_argument("--operators", type=int, default=None, help="operator users (included in --users)")
    group.add_argument("--detections-per-second", type=float, default=None, help="publish rate of each detector")
    group.add_argument("--batch", type=int, default=None, help="detections per publish (>1: publish_detections)")
    group.add_argument("--inflight", type=int, default=None, help="unanswered publishes per detector")
    group.add_argument("--polling-share", type=float, default=None, help="share of viewers on long-polling")
    group.add_argument("--upgrade-share", type=float, default=None, help="share of viewers polling then upgrading")
    group.add_argument("--join", choices=["start", "live"], default=None, help="viewers join with last_seq=0 or live")
    group.add_argument("--churn-seconds", type=float, default=None, help="viewers reload about this often (0: never)")
    group.add_argument("--fault", choices=["none", "disconnect", "kill-node"], default=None, help="fault during main")
    group.add_argument("--fault-at", type=float, default=None, help="fault time as a fraction of the main phase")
    group.add_argument("--disconnect-share", type=float, default=None, help="share of viewers a disconnect drops")
    group.add_argument("--settle-seconds", type=float, default=None, help="pause between ramp and main")
    group.add_argument("--drain-timeout", type=float, default=None, help="longest wait for viewers to catch up")
    group.add_argument("--recover-timeout", type=float, default=None, help="longest reconnect+rejoin per viewer")
    group.add_argument("--kill-node", default=None, help="node id to kill (default: the one holding most clients)")
    group.add_argument("--cluster-json", default=None, help="`testpulse cluster --json` output (file or JSON text)")
    group.add_argument("--results-dir", default=None, help="where summary.json goes (default: next to --csv)")
    group.add_argument("--slo-connect-p99-ms", default=None, help="objective: connect p99 (ms, or off); 2000")
    group.add_argument("--slo-delivery-p99-ms", default=None, help="objective: delivery p99 (ms, or off); 1000")
    group.add_argument("--slo-failure-ratio", default=None, help="objective: failed/all requests (or off); 0.01")
    group.add_argument("--slo-max-gaps", default=None, help="objective: seq gaps seen by viewers (or off); 0")
    group.add_argument("--slo-max-duplicates", default=None, help="objective: duplicate seqs (or off); 0")


class Counters:
    """Run-wide counts (gaps, refusals by code, connections by node...). Workers ship what they
    counted since their last report with every stats report and once more when asked to flush;
    the master (or the single local process) holds the totals."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()

    def add(self, key: str, amount: int = 1) -> None:
        self.totals[key] += amount
        self._pending[key] += amount

    def take(self) -> dict[str, int]:
        pending = dict(self._pending)
        self._pending.clear()
        return pending

    def merge(self, values: Mapping[str, int]) -> None:
        for key, amount in values.items():
            self.totals[key] += int(amount)

    def reset(self) -> None:
        self.totals.clear()
        self._pending.clear()

    def get(self, key: str) -> int:
        return int(self.totals.get(key, 0))

    def by_prefix(self, prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: int(v) for k, v in sorted(self.totals.items()) if k.startswith(prefix)}


@dataclass(frozen=True)
class Plan:
    sessions: list[str]
    config: RunConfig


def tokens(run_time: Callable[[], float]) -> Callable[[str], str]:
    """Tokens signed the way the cluster verifies them (TESTPULSE_JWT_SECRET etc. from the
    environment), valid for the whole run plus a margin, so a soak never meets auth_expired."""
    from testpulse.domain.auth import issue_token
    from testpulse.settings import Settings

    settings = Settings.from_env()
    cache: dict[str, str] = {}

    def token(role: str) -> str:
        if role not in cache:
            ttl = TOKEN_TTL_SECONDS + run_time()
            cache[role] = issue_token(settings, role=role, sub=f"loadtest-{role}", ttl_seconds=ttl)
        return cache[role]

    return token


class Control:
    """One per process. Users read the plan and wait on phases; the master side decides them."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.environment: Environment | None = None
        self.counters = Counters()
        self._config: RunConfig | None = None
        self.reset()

    def _run_time(self) -> float:
        if self.plan.ready():
            return float(self.plan.get().config.run_time)
        return self._config.run_time if self._config else 0.0

    def reset(self) -> None:
        self.plan: AsyncResult = AsyncResult()
        self.reached: dict[str, Event] = {p: Event() for p in PHASES}
        self.phase = "ramp"
        self.fault: AsyncResult = AsyncResult()
        self.final: AsyncResult = AsyncResult()
        self.counters.reset()
        self.token = tokens(self._run_time)  # a new run may be longer than the last one
        self._indexes: dict[str, itertools.count[int]] = {}
        self._worker_finals: set[str] = set()
        self._marks: dict[str, float] = {}
        self._open_at_drain: dict[str, int] = {}
        self.outcome: dict[str, Any] | None = None

    # ---- for users ---------------------------------------------------------------------------

    @property
    def recorder(self) -> Recorder:
        assert self.environment is not None
        return Recorder(self.environment.events.request, self.counters, lambda: self.fault.ready())

    def next_index(self, role: str) -> int:
        """Spread users of a role over sessions and transports evenly, also across workers."""
        counter = self._indexes.setdefault(role, itertools.count())
        runner = self.environment.runner if self.environment else None
        offset = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        return next(counter) + offset

    # ---- messages ----------------------------------------------------------------------------

    @property
    def is_master(self) -> bool:
        return self.environment is not None and isinstance(self.environment.runner, MasterRunner)

    @property
    def decides(self) -> bool:
        """The master, or the single process of a local run: it runs the shape and owns the totals."""
        runner = self.environment.runner if self.environment else None
        return isinstance(runner, MasterRunner | LocalRunner)

    def _broadcast(self, kind: str, data: Any) -> None:
        assert self.environment is not None and self.environment.runner is not None
        if self.is_master:
            self.environment.runner.send_message(f"testpulse:{kind}", data)
        getattr(self, f"_apply_{kind}")(data)

    def _apply_plan(self, data: Mapping[str, Any]) -> None:
        self.reset()
        self.plan.set(Plan(list(data["sessions"]), RunConfig.from_dict(data["config"])))

    def _apply_phase(self, name: str) -> None:
        self.phase = name
        for phase in PHASES[: PHASES.index(name) + 1]:
            self.reached[phase].set()

    def _apply_fault(self, data: Mapping[str, Any]) -> None:
        if not self.fault.ready():
            self.fault.set(dict(data))

    def _apply_final(self, data: Mapping[str, int]) -> None:
        if not self.final.ready():
            self.final.set(dict(data))

    def register(self, environment: Environment) -> None:
        self.environment = environment
        runner = environment.runner
        if runner is None:
            return
        if isinstance(runner, WorkerRunner):
            for kind in ("plan", "phase", "fault", "final"):
                runner.register_message(f"testpulse:{kind}", self._on_message(kind))
            runner.register_message("testpulse:flush", self._on_flush)
        if isinstance(runner, MasterRunner):
            runner.register_message("testpulse:counters", self._on_counters)

    def _on_message(self, kind: str) -> Any:
        def listener(environment: Environment, msg: Any, **_: Any) -> None:
            getattr(self, f"_apply_{kind}")(msg.data)

        return listener

    def _on_flush(self, environment: Environment, msg: Any, **_: Any) -> None:
        assert environment.runner is not None
        environment.runner.send_message("testpulse:counters", {"final": True, "values": self.counters.take()})

    def _on_counters(self, environment: Environment, msg: Any, **_: Any) -> None:
        self.counters.merge(msg.data.get("values", {}))
        if msg.data.get("final"):
            self._worker_finals.add(msg.node_id)

    def report_to_master(self, client_id: str, data: dict[str, Any]) -> None:
        data["testpulse"] = self.counters.take()

    def worker_report(self, client_id: str, data: dict[str, Any]) -> None:
        self.counters.merge(data.get("testpulse", {}))

    # ---- the deciding side -------------------------------------------------------------------

    @property
    def config(self) -> RunConfig:
        if self._config is None:
            assert self.environment is not None
            self._config = RunConfig.resolve(self.scenario, self.environment)
        return self._config

    def _http(self, method: str, path: str, body: Any = None) -> Any:
        response = requests.request(
            method,
            f"{self.config.host}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token('admin')}"},
            timeout=15,
        )
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return response.json()

    def start_run(self, environment: Environment) -> None:
        """test_start on the deciding side: create and start the sessions, send the plan out."""
        if not self.decides:
            return
        self._config = RunConfig.resolve(self.scenario, environment)
        cfg = self._config
        if not cfg.host:
            log.error("no target: give --host (or run `testpulse loadtest`)")
            return
        sessions = []
        for i in range(max(1, cfg.sessions)):
            created = self._http("POST", "/api/sessions", {"name": f"loadtest {cfg.scenario} {i + 1}"})
            session_id = created["session"]["id"]
            self._http("POST", f"/api/sessions/{session_id}/start")
            sessions.append(session_id)
        log.info("testpulse: %d sessions ready: %s", len(sessions), ", ".join(sessions))
        self._broadcast("plan", {"sessions": sessions, "config": cfg.as_dict()})
        self._marks = {"plan": time.monotonic()}

    def user_counts(self) -> dict[str, int]:
        """Users running now, by class (on a master: as the workers last reported them)."""
        runner = self.environment.runner if self.environment else None
        if runner is None:
            return {}
        counts = runner.reported_user_classes_count if isinstance(runner, MasterRunner) else runner.user_classes_count
        if not any(counts.values()):
            counts = getattr(runner, "final_user_classes_count", None) or counts
        return dict(counts)

    def expected(self, role: str) -> int:
        assert self.environment is not None
        by_name = {cls.__name__: cls for cls in self.environment.user_classes}
        counts = self.user_counts()
        return sum(n for name, n in counts.items() if getattr(by_name.get(name), "role", None) == role)

    def _enter(self, phase: str, now: float) -> None:
        log.info("testpulse: phase %s at %.1fs", phase, now)
        self._marks[phase] = now
        self._broadcast("phase", phase)

    def _since(self, mark: str, now: float) -> float:
        return now - self._marks.get(mark, now)

    def tick(self, now: float) -> tuple[int, float] | None:
        """One shape tick (about once a second): the users wanted, or None to end the run."""
        cfg = self.config
        wanted = (cfg.users, cfg.spawn_rate)
        if not self.plan.ready():
            if now > PLAN_TIMEOUT or self.counters.get("problem:sessions_not_created"):
                log.error("testpulse: no session plan after %.0fs; giving up", now)
                return self._finish()
            return wanted
        runner = self.environment.runner if self.environment else None
        if self.phase == "ramp":
            ramp_done = now >= cfg.users / cfg.spawn_rate + cfg.settle_seconds
            spawned = runner is not None and runner.user_count >= cfg.users
            if ramp_done and (spawned or now >= cfg.run_time):
                self._enter("main", now)
        elif self.phase == "main":
            main_end = max(cfg.run_time, self._marks["main"] + 3.0)
            fault_at = self._marks["main"] + cfg.fault_at * (main_end - self._marks["main"])
            if cfg.fault != "none" and not self.fault.ready() and now >= fault_at:
                self._inject_fault()
            if now >= main_end:
                self._open_at_drain = self.counters.by_prefix("node_open:")
                self._enter("drain", now)
        elif self.phase == "drain":
            if not self.final.ready():
                stopped = self.counters.get("publishers_stopped") >= self.expected("detector")
                if stopped or self._since("drain", now) > STEP_TIMEOUT:
                    self._send_final(now)
            else:
                checked = self.counters.get("verified") >= self.expected("viewer")
                if checked or self._since("final", now) > cfg.drain_timeout + 5:
                    self._enter("leave", now)
        elif self.phase == "leave":
            if self.counters.get("left") >= self.expected("viewer") or self._since("leave", now) > STEP_TIMEOUT:
                self._enter("done", now)
                if self.is_master and runner is not None:
                    runner.send_message("testpulse:flush", None)
        elif self.phase == "done":
            workers = len(runner.clients.all) if isinstance(runner, MasterRunner) else 0
            flushed = len(self._worker_finals) >= workers
            if "flushed" not in self._marks and (flushed or self._since("done", now) > STEP_TIMEOUT):
                self._marks["flushed"] = now
            # Request stats travel with the workers' periodic reports: wait for one more.
            settle = WORKER_REPORT_INTERVAL + 0.5 if workers else 0.0
            if "flushed" in self._marks and self._since("flushed", now) >= settle:
                return self._finish()
        return wanted

    def _send_final(self, now: float) -> None:
        plan = self.plan.get()
        final = {}
        for session_id in plan.sessions:
            try:
                final[session_id] = int(self._http("GET", f"/api/sessions/{session_id}")["session"]["last_seq"])
            except Exception as exc:  # noqa: BLE001 - reported as a problem of the run, not raised
                log.error("testpulse: cannot read session %s: %s", session_id, exc)
                self.counters.add("problem:final_seq_unreadable")
        log.info("testpulse: final seqs %s", final)
        self._marks["final"] = now
        self._broadcast("final", final)

    def _inject_fault(self) -> None:
        cfg = self.config
        if cfg.fault == "disconnect":
            log.warning("testpulse: fault: %.0f%% of viewers drop their connection now", cfg.disconnect_share * 100)
            self._broadcast("fault", {"kind": "disconnect", "share": cfg.disconnect_share, "at": time.time()})
            return
        node = self._kill_node()
        self._broadcast("fault", {"kind": "kill-node", "node": node, "at": time.time()})

    def _kill_node(self) -> str | None:
        cfg = self.config
        if not cfg.cluster_json:
            log.error("testpulse: --fault kill-node needs --cluster-json (node pids)")
            self.counters.add("problem:kill_without_cluster_json")
            return None
        text = cfg.cluster_json
        description = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
        nodes = {n["id"]: int(n["pid"]) for n in description["nodes"]}
        victim = cfg.kill_node
        if victim is None:
            open_by_node = self.counters.by_prefix("node_open:")
            victim = max(nodes, key=lambda n: (open_by_node.get(n, 0), n))
        if victim not in nodes:
            log.error("testpulse: no node %r in the cluster description", victim)
            self.counters.add("problem:kill_unknown_node")
            return None
        log.warning("testpulse: fault: killing %s (pid %d) with SIGKILL", victim, nodes[victim])
        try:
            os.kill(nodes[victim], signal.SIGKILL)
            self.counters.add(f"killed:{victim}")
        except ProcessLookupError:
            self.counters.add("problem:kill_target_gone")
        return victim

    # ---- the verdict -------------------------------------------------------------------------

    def _finish(self) -> None:
        self.evaluate(complete=True)
        return None

    def evaluate(self, complete: bool) -> dict[str, Any]:
        if self.outcome is not None:
            return self.outcome
        assert self.environment is not None and self.environment.runner is not None
        env = self.environment
        runner = env.runner
        cfg = self.config
        stats = env.stats
        entries = {(e.method, e.name): e for e in stats.entries.values()}

        def p99(kind: str, name: str) -> float | None:
            entry = entries.get((kind, name))
            return float(entry.get_response_time_percentile(0.99)) if entry and entry.num_requests else None

        problems = [k.removeprefix("problem:") for k in self.counters.totals if k.startswith("problem:")]
        if not complete:
            problems.append("run did not complete (stopped before the delivery check)")
        if runner.exceptions:
            problems.append(f"{sum(e['count'] for e in runner.exceptions.values())} unhandled exception(s) in users")
        viewers = self.expected("viewer") if complete else 0
        if complete and self.counters.get("verified") < viewers:
            problems.append(f"{viewers - self.counters.get('verified')} viewer(s) never finished the delivery check")
        if isinstance(runner, MasterRunner) and len(self._worker_finals) < len(runner.clients.all):
            problems.append("some workers never sent their final counters")
        measured = slo.Measured(
            connect_p99_ms=p99(SIO, "connect"),
            delivery_p99_ms=p99(DELIVERY, "detection_event"),
            requests=stats.total.num_requests,
            failures=stats.total.num_failures,
            gaps=self.counters.get("gaps"),
            duplicates=self.counters.get("duplicates"),
            problems=problems,
        )
        results = slo.evaluate(cfg.thresholds, measured)
        connect = entries.get((SIO, "connect"))
        per_second = connect.num_reqs_per_sec if connect else {}
        span = max(per_second) - min(per_second) + 1 if per_second else 0
        cpu_warning = bool(getattr(runner, "cpu_warning_emitted", False)) or bool(
            getattr(runner, "worker_cpu_warning_emitted", False)
        )
        self.outcome = {
            "scenario": cfg.scenario,
            "passed": not slo.failed(results),
            "failed": [r.name for r in slo.failed(results)],
            "objectives": slo.as_json(results),
            "config": cfg.as_dict(),
            "sessions": self.plan.get().sessions if self.plan.ready() else [],
            "final_seqs": self.final.get() if self.final.ready() else {},
            "users": self.user_counts(),
            "nodes": {
                "connections": self.counters.by_prefix("node_connects:"),
                "open_at_drain": self._open_at_drain,
                "killed": list(self.counters.by_prefix("killed:")),
            },
            "connects_per_second": {
                "peak": max(per_second.values(), default=0),
                "mean": round(connect.num_requests / span, 1) if connect and span > 0 else None,
            },
            "recovery": {
                "recovered": self.counters.get("recovered"),
                "unrecovered": self.counters.get("unrecovered"),
                "replayed": self.counters.get("replayed"),
                "interrupted_calls": self.counters.get("interrupted"),
            },
            "delivery": {
                "gaps": self.counters.get("gaps"),
                "lost": self.counters.get("lost"),
                "duplicates": self.counters.get("duplicates"),
                "published": self.counters.get("published"),
                "verified_viewers": self.counters.get("verified"),
                "never_joined": self.counters.get("never_joined"),
            },
            "rates": self._rates(entries),
            "refusals": self.counters.by_prefix("refused:"),
            "transports": self.counters.by_prefix("transport:"),
            "counters": dict(sorted(self.counters.totals.items())),
            "requests": [_entry(e) for e in sorted(stats.entries.values(), key=lambda e: (e.method, e.name))],
            "generator_cpu_warning": cpu_warning,
        }
        text = self.describe(results)
        print(text, flush=True)
        if cfg.results_dir:
            folder = Path(cfg.results_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "summary.json").write_text(json.dumps(self.outcome, indent=2, default=str) + "\n")
            (folder / "slo.txt").write_text(text + "\n")
        return self.outcome

    def _rates(self, entries: Mapping[tuple[str, str], Any]) -> dict[str, float | None]:
        """Per second over the main phase: detections asked for, acked, and delivered to viewers."""
        cfg = self.config
        main = self._marks.get("drain", 0.0) - self._marks.get("main", 0.0)
        delivered = entries.get((DELIVERY, "detection_event"))
        detectors = self.expected("detector")
        return {
            "main_seconds": round(main, 1),
            "publish_target_per_s": round(detectors * cfg.detections_per_second, 1),
            "published_per_s": round(self.counters.get("published") / main, 1) if main > 0 else None,
            "delivered_per_s": round(delivered.num_requests / main, 1) if delivered and main > 0 else None,
        }

    def describe(self, results: list[slo.Result]) -> str:
        out = self.outcome or {}
        lines = [f"\ntestpulse loadtest {out.get('scenario')}: {sum(out.get('users', {}).values())} users"]
        nodes = out.get("nodes", {})
        lines.append(f"  connections per node: {_pairs(nodes.get('connections', {}))}")
        lines.append(f"  open at drain:        {_pairs(nodes.get('open_at_drain', {}))}")
        if nodes.get("killed"):
            lines.append(f"  killed:               {', '.join(nodes['killed'])}")
        rate = out.get("connects_per_second", {})
        lines.append(f"  connects/s:           peak {rate.get('peak')}, mean {rate.get('mean')}")
        for (kind, name), label in (
            ((SIO, "connect"), "connect"),
            ((SIO, "connect+join"), "connect+join"),
            ((DELIVERY, "detection_event"), "delivery"),
            ((RECOVER, "reconnect+rejoin"), "time to recover"),
        ):
            row = next((r for r in out.get("requests", []) if (r["type"], r["name"]) == (kind, name)), None)
            if row:
                lines.append(
                    f"  {label + ' ms:':<22}n={row['count']} p50={row['p50']} p95={row['p95']} p99={row['p99']}"
                    f" max={row['max']}"
                )
        lines.append(f"  delivery:             {_pairs(out.get('delivery', {}))}")
        lines.append(f"  rates (main phase):   {_pairs(out.get('rates', {}))}")
        if out.get("recovery", {}).get("recovered") or out.get("recovery", {}).get("unrecovered"):
            lines.append(f"  recovery:             {_pairs(out['recovery'])}")
        if out.get("refusals"):
            lines.append(f"  refusals:             {_pairs(out['refusals'])}")
        lines.append(f"  transports:           {_pairs(out.get('transports', {}))}")
        if out.get("generator_cpu_warning"):
            lines.append("  load generator CPU went above 90%: timings include client-side queueing")
        lines.append(slo.report(results))
        return "\n".join(lines)


def _pairs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def _entry(e: Any) -> dict[str, Any]:
    def pct(q: float) -> float:
        return round(float(e.get_response_time_percentile(q)), 1) if e.num_requests else 0.0

    return {
        "type": e.method,
        "name": e.name,
        "count": e.num_requests,
        "failures": e.num_failures,
        "p50": pct(0.5),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "max": round(float(e.max_response_time or 0), 1),
        "rps": round(float(e.total_rps), 1),
    }


_control: Control | None = None


def current() -> Control:
    assert _control is not None, "a locustfile must call control.install() first"
    return _control


class ScenarioShape(LoadTestShape):
    """The phases above as a Locust shape. --users, --spawn-rate and --run-time still apply."""

    abstract = True
    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        return current().tick(self.get_run_time())


def install(scenario: Scenario) -> Control:
    """Wire a scenario into Locust's events; call once at the top of a locustfile."""
    global _control
    if _control is not None:
        return _control
    control = _control = Control(scenario)

    @events.init_command_line_parser.add_listener
    def _(parser: Any, **_: Any) -> None:
        add_arguments(parser)

    @events.init.add_listener
    def _(environment: Environment, **_: Any) -> None:
        control.register(environment)
        opts = environment.parsed_options
        if opts is not None:
            for cls in environment.user_classes:
                role = getattr(cls, "role", None)
                count = {"detector": "detectors", "operator": "operators"}.get(str(role))
                if count:
                    given = getattr(opts, count, None)
                    cls.fixed_count = int(getattr(scenario, count) if given is None else given)
                    if cls.fixed_count == 0:
                        cls.weight = 0  # a fixed_count of 0 means "by weight" to Locust: drop the class instead
            # Locust's own filter (it runs once before this listener): in place, the runner shares the list.
            environment._remove_user_classes_with_weight_zero()

    @events.test_start.add_listener
    def _(environment: Environment, **_: Any) -> None:
        try:
            control.start_run(environment)
        except Exception as exc:  # noqa: BLE001 - a run without sessions is reported, then ended
            log.error("testpulse: cannot create the sessions: %s", exc)
            control.counters.add("problem:sessions_not_created")

    @events.report_to_master.add_listener
    def _(client_id: str, data: dict[str, Any], **_: Any) -> None:
        control.report_to_master(client_id, data)

    @events.worker_report.add_listener
    def _(client_id: str, data: dict[str, Any], **_: Any) -> None:
        control.worker_report(client_id, data)

    @events.quitting.add_listener
    def _(environment: Environment, **_: Any) -> None:
        if not control.decides:
            return
        outcome = control.evaluate(complete=False)
        environment.process_exit_code = 0 if outcome["passed"] else 1

    return control
