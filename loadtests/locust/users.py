"""What viewers, detectors and operators do; scenarios subclass these and set weights and counts.

Each user runs one long task that follows the run's phases (see control.py) instead of Locust's
pick-a-task loop: a viewer's job is to hold a connection and see every seq, not to fire requests.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import gevent
import gevent.pool
from gevent.event import AsyncResult
from locust import User, constant, task
from locust.contrib.socketio import SocketIOUser

from testpulse.devtools.scenarios import control as control_module
from testpulse.devtools.scenarios.client import (
    ACK_TIMEOUT,
    DELIVERY,
    RECOVER,
    SIO,
    AckError,
    AckTimeout,
    DeliveryError,
    Dropped,
    Refused,
    TestpulseClient,
)
from testpulse.devtools.scenarios.control import Plan, RunConfig
from testpulse.devtools.scenarios.delivery import SeqTracker

GOLDEN = 0.6180339887  # spreads consecutive user indexes evenly over [0, 1)
UPDATE_TIMEOUT = 5.0
FOREVER = 3600.0
Retryable = (Refused, AckError, AckTimeout, Dropped)


class TestpulseUser(SocketIOUser):
    """A user whose connections are TestpulseClients (one per connection: a dropped one is
    replaced, never revived). Reconnection is ours, not python-socketio's, so that it can rejoin
    with last_seq and be timed."""

    abstract = True
    role = "viewer"
    options: dict[str, Any] = {"reconnection": False, "request_timeout": 10, "handle_sigint": False}
    wait_time = constant(1)

    def __init__(self, environment: Any) -> None:
        # SocketIOUser.__init__ builds a single client for the user's whole life and starts its
        # wait loop; we open a client per connection instead, so skip straight to User.__init__.
        User.__init__(self, environment)
        self.control = control_module.current()
        self.rec = self.control.recorder
        self.sio: TestpulseClient | None = None  # type: ignore[assignment]
        self.index = self.control.next_index(self.role)
        self.parked = False

    # ---- plumbing shared by every role -------------------------------------------------------

    def plan(self) -> Plan | None:
        try:
            plan: Plan = self.control.plan.get(timeout=control_module.PLAN_TIMEOUT)
        except gevent.Timeout:
            self.rec.request(SIO, "plan", control_module.PLAN_TIMEOUT * 1000, RuntimeError("no session plan"))
            return None
        return plan

    @property
    def cfg(self) -> RunConfig:
        return self.control.plan.get().config  # type: ignore[no-any-return]

    def transports(self) -> list[str] | None:
        return ["websocket"]

    def new_client(self) -> TestpulseClient:
        return TestpulseClient(self.rec, **self.options)

    def connect(self, deadline: float) -> TestpulseClient | None:
        """Open a connection, retrying refusals with backoff until `deadline` (perf_counter)."""
        delay = 0.25
        while True:
            client = self.new_client()
            try:
                client.open(self.cfg.host, self.control.token(self.role), self.transports())
                return client
            except Refused:
                client.drop()
            if time.perf_counter() + delay > deadline:
                return None
            gevent.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)

    def park(self) -> None:
        """Nothing left to do in this run: wait to be stopped (a returning task would run again)."""
        self.parked = True
        while True:
            gevent.sleep(FOREVER)

    def on_stop(self) -> None:
        if self.sio is not None:
            self.sio.close()
            self.sio = None


class ViewerUser(TestpulseUser):
    """Watches one session: connect+join, then check every detection_event (seq order, latency)
    until the run's final seqs are known; reconnect and rejoin with last_seq after any drop."""

    abstract = True
    role = "viewer"

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.session_id = ""
        self.tracker = SeqTracker("")
        self.join_floor = 0
        self.joining = False
        self.gave_up = False
        self.verified = False
        self.joined_once = False
        self.next_churn = float("inf")
        spread = (self.index * GOLDEN) % 1.0
        self.spread = spread

    def transports(self) -> list[str] | None:
        cfg = self.cfg
        if self.spread < cfg.polling_share:
            return ["polling"]
        if self.spread < cfg.polling_share + cfg.upgrade_share:
            return None  # python-socketio's default: polling first, then upgrade to WebSocket
        return ["websocket"]

    def new_client(self) -> TestpulseClient:
        client = TestpulseClient(self.rec, **self.options)
        client.on_detection = lambda data: self.detection(client, data)
        return client

    def detection(self, client: TestpulseClient, data: dict[str, Any]) -> None:
        # Only the current connection counts: whatever a dropped one still hands over will be
        # replayed after the rejoin, and counting both would invent duplicates.
        if client is not self.sio or client.dropped.is_set() or data.get("session_id") != self.session_id:
            return
        seq = data.get("seq")
        if not isinstance(seq, int):
            self.rec.request(DELIVERY, "bad event", 0, DeliveryError(f"detection_event without seq: {data}"[:200]))
            return
        before, lost_before = self.tracker.last, self.tracker.lost
        verdict = self.tracker.see(seq)
        if verdict == "gap":
            self.rec.count("gaps")
            self.rec.count("lost", self.tracker.lost - lost_before)
            self.rec.request(DELIVERY, "gap", 0, DeliveryError(f"{self.session_id}: seq {seq} after {before}"))
        elif verdict == "duplicate":
            self.rec.count("duplicates")
            self.rec.request(DELIVERY, "duplicate", 0, DeliveryError(f"{self.session_id}: seq {seq} after {before}"))
        if self.joining:
            self.rec.count("replayed_events")
            return
        ts = data.get("ts")
        if isinstance(ts, int | float):
            self.rec.request(DELIVERY, "detection_event", max(0.0, time.time() * 1000.0 - ts))

    def join(self, client: TestpulseClient) -> None:
        payload: dict[str, Any] = {"session_id": self.session_id}
        if self.tracker.last is not None:
            payload["last_seq"] = self.tracker.last
        self.joining = True
        try:
            ack = client.call("join_session", payload)
        finally:
            self.joining = False
        self.joined_once = True
        self.rec.count("replayed", int(ack.get("replayed") or 0))
        if self.tracker.last is None:
            self.join_floor = int(ack.get("session", {}).get("last_seq") or 0)

    def attach(self, deadline: float) -> bool:
        """Connect and join (retrying refusals and failed joins until `deadline`)."""
        while True:
            client = self.connect(deadline)
            if client is None:
                return False
            self.sio = client
            try:
                self.join(client)
                return True
            except Retryable:
                self.sio = None
                client.drop()
            if time.perf_counter() + 0.5 > deadline:
                return False
            gevent.sleep(random.uniform(0.25, 0.75))

    def recover(self) -> None:
        """Reconnect after a drop and rejoin with last_seq; timed from the moment the drop was seen."""
        old = self.sio
        dropped_at = old.dropped_at if old is not None and old.dropped_at else time.perf_counter()
        self.sio = None
        if old is not None:
            old.drop()
        self.rec.count("drops")
        ok = self.attach(time.perf_counter() + self.cfg.recover_timeout)
        elapsed = (time.perf_counter() - dropped_at) * 1000.0
        if ok:
            self.rec.count("recovered")
            self.rec.request(RECOVER, "reconnect+rejoin", elapsed)
        else:
            self.gave_up = True
            self.rec.count("unrecovered")
            error = DeliveryError(f"not back within {self.cfg.recover_timeout:.0f}s")
            self.rec.request(RECOVER, "reconnect+rejoin", elapsed, error)

    def churn(self) -> None:
        """A page reload: leave politely, come back, rejoin with last_seq."""
        old, self.sio = self.sio, None
        if old is not None:
            old.close()
        self.rec.count("churns")
        if not self.attach(time.perf_counter() + self.cfg.recover_timeout):
            self.gave_up = True
            self.rec.request(SIO, "connect+join", 0, DeliveryError("reload: could not come back"))
        self.schedule_churn()

    def schedule_churn(self) -> None:
        every = self.cfg.churn_seconds
        self.next_churn = time.perf_counter() + every * random.uniform(0.5, 1.5) if every > 0 else float("inf")

    def verify(self) -> None:
        """The delivery check: every seq up to the session's final one, seen exactly once."""
        self.verified = True
        target = int(self.control.final.get().get(self.session_id, 0))
        started = time.perf_counter()
        deadline = started + self.cfg.drain_timeout
        while self.seen() < target and time.perf_counter() < deadline:
            if not self.gave_up and (self.sio is None or self.sio.dropped.is_set()):
                self.recover()
                continue
            gevent.sleep(0.1)
        elapsed = (time.perf_counter() - started) * 1000.0
        seen = self.seen()
        if seen >= target:
            self.rec.request(DELIVERY, "complete", elapsed)
        elif not self.joined_once:
            # Not a delivery gap: this viewer never got in, which connect+join already failed.
            self.rec.count("never_joined")
            self.rec.request(DELIVERY, "complete", elapsed, DeliveryError(f"{self.session_id}: never joined"))
        else:
            self.rec.count("gaps")
            self.rec.count("lost", target - seen)
            error = DeliveryError(f"{self.session_id}: saw up to seq {seen} of {target}")
            self.rec.request(DELIVERY, "complete", elapsed, error)
        self.rec.count("verified")

    def seen(self) -> int:
        return self.join_floor if self.tracker.last is None else self.tracker.last

    def leave(self) -> None:
        client, self.sio = self.sio, None
        if client is not None and not client.dropped.is_set():
            with contextlib.suppress(*Retryable):
                client.call("leave_session", {"session_id": self.session_id})
            client.close()
        self.rec.count("left")

    def apply_fault(self, fault: dict[str, Any]) -> None:
        if fault.get("kind") != "disconnect" or self.sio is None:
            return
        if random.random() < float(fault.get("share", 1.0)):
            self.sio.drop()

    @staticmethod
    def _wait(objects: list[Any], timeout: float | None) -> None:
        gevent.wait(objects, timeout=timeout, count=1)

    @task
    def watch(self) -> None:
        plan = self.plan()
        if plan is None:
            self.park()
            return
        cfg = plan.config
        self.session_id = plan.sessions[self.index % len(plan.sessions)]
        self.tracker = SeqTracker(self.session_id, last=0 if cfg.join == "start" else None)
        started = time.perf_counter()
        if self.attach(started + cfg.recover_timeout):
            self.rec.request(SIO, "connect+join", (time.perf_counter() - started) * 1000.0)
        else:
            self.gave_up = True
            error = DeliveryError(f"no connection within {cfg.recover_timeout:.0f}s")
            self.rec.request(SIO, "connect+join", (time.perf_counter() - started) * 1000.0, error)
        self.schedule_churn()
        control = self.control
        fault_seen = False
        while True:
            if control.final.ready() and not self.verified:
                self.verify()
                continue
            if control.reached["leave"].is_set():
                self.leave()
                self.park()
            if not self.gave_up and (self.sio is None or self.sio.dropped.is_set()):
                self.recover()
                continue
            if control.fault.ready() and not fault_seen:
                fault_seen = True
                self.apply_fault(control.fault.get())
                continue
            if time.perf_counter() >= self.next_churn and not control.reached["drain"].is_set():
                self.churn()
                continue
            waits: list[Any] = [control.reached["leave"]]
            if not self.verified:
                waits.append(control.final)
            if self.sio is not None and not self.gave_up:
                waits.append(self.sio.dropped)
            if not fault_seen:
                waits.append(control.fault)
            pause = self.next_churn - time.perf_counter()
            self._wait(waits, max(0.05, pause) if pause != float("inf") else None)


class DetectorUser(TestpulseUser):
    """Publishes into one session at --detections-per-second from the main phase until drain."""

    abstract = True
    role = "detector"
    fixed_count = 2

    def detections(self, count: int, frame: int) -> list[dict[str, Any]]:
        ts = time.time() * 1000.0
        return [
            {
                "label": random.choice(("person", "car", "bicycle", "dog")),
                "confidence": round(random.uniform(0.5, 1.0), 3),
                "bbox": [random.randint(0, 1800), random.randint(0, 1000), 64, 128],
                "frame": frame + i,
                "ts": ts,
                "attributes": {"detector": self.index},
            }
            for i in range(count)
        ]

    def publish_once(self, client: TestpulseClient, session_id: str, frame: int) -> None:
        batch = self.cfg.batch
        if batch > 1:
            client.call("publish_detections", {"session_id": session_id, "detections": self.detections(batch, frame)})
        else:
            client.call("publish_detection", {"session_id": session_id, **self.detections(1, frame)[0]})
        self.rec.count("published", batch)

    @task
    def publish(self) -> None:
        plan = self.plan()
        if plan is None:
            self.rec.count("publishers_stopped")
            self.park()
            return
        cfg = plan.config
        session_id = plan.sessions[self.index % len(plan.sessions)]
        drain = self.control.reached["drain"]
        self.sio = self.connect(time.perf_counter() + cfg.recover_timeout)
        self.control.reached["main"].wait()
        interval = cfg.batch / cfg.detections_per_second if cfg.detections_per_second > 0 else FOREVER
        # A window of unanswered publishes, so the rate is what was asked for, not 1 / ack latency.
        pool = gevent.pool.Pool(max(1, cfg.inflight))
        next_at = time.perf_counter()
        frame = 0
        while not drain.is_set():
            pause = next_at - time.perf_counter()
            if pause > 0:
                drain.wait(pause)
                continue
            if self.sio is None or self.sio.dropped.is_set():
                old, self.sio = self.sio, None
                if old is not None:
                    old.drop()
                self.sio = self.connect(time.perf_counter() + cfg.recover_timeout)
                if self.sio is None:
                    self.rec.request(SIO, "publisher reconnect", 0, DeliveryError("detector could not reconnect"))
                    break
                continue
            pool.spawn(self.publish_quietly, self.sio, session_id, frame)  # waits while `inflight` are unanswered
            frame += cfg.batch
            next_at += interval
            if next_at < time.perf_counter() - 1.0:
                next_at = time.perf_counter()  # fell behind (a stall): carry on, do not burst to catch up
        pool.join(timeout=ACK_TIMEOUT + 1)  # the final seqs are read once every publish is answered
        self.rec.count("publishers_stopped")
        self.park()

    def publish_quietly(self, client: TestpulseClient, session_id: str, frame: int) -> None:
        with contextlib.suppress(*Retryable):  # recorded by the client; a drop reconnects on the next turn
            self.publish_once(client, session_id, frame)


class OperatorUser(TestpulseUser):
    """Drives sessions of its own through start -> pause -> resume -> stop, and checks that each
    change comes back to it as test_session_update (it is in the session's room)."""

    abstract = True
    role = "operator"
    fixed_count = 0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.expecting: dict[tuple[str, str], AsyncResult] = {}

    def new_client(self) -> TestpulseClient:
        client = TestpulseClient(self.rec, **self.options)
        client.on_update = self.update
        return client

    def update(self, data: dict[str, Any]) -> None:
        waiting = self.expecting.get((str(data.get("session_id")), str(data.get("status"))))
        if waiting is not None and not waiting.ready():
            waiting.set(time.perf_counter())

    def step(self, event: str, session_id: str, status: str) -> None:
        assert self.sio is not None
        waiting = self.expecting[(session_id, status)] = AsyncResult()
        started = time.perf_counter()
        try:
            self.sio.call(event, {"session_id": session_id})
            arrived = waiting.get(timeout=UPDATE_TIMEOUT)
            self.rec.request(DELIVERY, "test_session_update", (arrived - started) * 1000.0)
        except gevent.Timeout:
            error = DeliveryError(f"no test_session_update {status} within {UPDATE_TIMEOUT:.0f}s")
            self.rec.request(DELIVERY, "test_session_update", UPDATE_TIMEOUT * 1000, error)
        finally:
            self.expecting.pop((session_id, status), None)

    def cycle(self) -> None:
        assert self.sio is not None
        ack = self.sio.call("start_test_session", {"name": f"loadtest operator {self.index}"})
        session_id = str(ack["session"]["id"])
        drain = self.control.reached["drain"]
        for event, status in (
            ("pause_test_session", "paused"),
            ("resume_test_session", "running"),
            ("stop_test_session", "stopped"),
        ):
            if not drain.is_set():
                drain.wait(random.uniform(1.0, 3.0))
            if drain.is_set() and event != "stop_test_session":
                continue  # finishing up: just stop it
            self.step(event, session_id, status)

    @task
    def operate(self) -> None:
        plan = self.plan()
        if plan is None:
            self.park()
            return
        cfg = plan.config
        self.sio = self.connect(time.perf_counter() + cfg.recover_timeout)
        drain = self.control.reached["drain"]
        self.control.reached["main"].wait()
        while not drain.is_set():
            if self.sio is None or self.sio.dropped.is_set():
                old, self.sio = self.sio, None
                if old is not None:
                    old.drop()
                self.sio = self.connect(time.perf_counter() + cfg.recover_timeout)
                if self.sio is None:
                    break
            try:
                self.cycle()
            except Retryable:
                drain.wait(1.0)  # recorded by the client; try a new session
        self.park()
