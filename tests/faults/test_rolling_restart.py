"""A rolling restart of every node under load (SIGHUP to `testpulse cluster`): each node drains,
its clients come back on the others, and no acknowledged detection is lost or delivered twice."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest
import socketio
from support.client import TRANSPORTS, detection
from support.cluster import RunningCluster, Viewer, Watch, http_status, pid_alive, stored_events
from support.processes import wait_until

pytestmark = pytest.mark.faults


class ReconnectingPublisher:
    """Publishes through the proxy one detection at a time, reconnecting whenever its node goes
    away; records every acknowledged seq. A publish whose ack never came may or may not be stored:
    only acknowledged ones are promised."""

    def __init__(self, url: str, token: str, session_id: str) -> None:
        self.url, self.token, self.session_id = url, token, session_id
        self.acked: list[int] = []
        self.connections = 0  # more than one: its node went away at least once
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ReconnectingPublisher:
        self._task = asyncio.create_task(self._run(), name="reconnecting publisher")
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
            self.connections += 1
            try:
                await sio.connect(
                    self.url, auth={"token": self.token}, transports=TRANSPORTS["websocket"], wait_timeout=5
                )
                while sio.connected and not self._stop.is_set():
                    i += 1
                    payload = {"session_id": self.session_id, **detection(i)}
                    ack = await sio.call("publish_detection", payload, timeout=5)
                    if isinstance(ack, dict) and ack.get("ok"):
                        self.acked.append(int(ack["seq"]))
                    await asyncio.sleep(0.01)
            except (socketio.exceptions.SocketIOError, OSError, ValueError):
                await asyncio.sleep(0.05)
            finally:
                with contextlib.suppress(Exception):
                    await sio.disconnect()
                with contextlib.suppress(Exception):
                    await sio.shutdown()

    async def stop(self) -> list[int]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.acked


async def test_rolling_restart_of_every_node_under_load_loses_no_acknowledged_detection(
    cluster: RunningCluster, viewers: Watch
) -> None:
    async with _operator(cluster) as operator:
        session_id = (await operator.call("start_test_session", {"name": "rolling"}, timeout=10))["session"]["id"]
    watching: list[Viewer] = await viewers(session_id, [cluster.proxy] * 6)
    publisher = ReconnectingPublisher(cluster.proxy, cluster.token("detector"), session_id).start()
    await wait_until(_count_at_least(publisher, 20), deadline=20, what="publishing under way")

    old_pids = {n.id: n.pid for n in cluster.nodes}
    cluster.process.proc.send_signal(signal.SIGHUP)
    # Every node is replaced in turn (a new process on the same port), each drained first.
    await wait_until(_all_gone(list(old_pids.values())), deadline=120, what="every original node process to exit")
    for node in cluster.nodes:
        await wait_until(_ready(node.url), deadline=60, what=f"{node.id} ready again")
    settled_at = len(publisher.acked)
    await wait_until(_count_at_least(publisher, settled_at + 20), deadline=30, what="publishing after the restart")
    acked = await publisher.stop()

    # From a node: the proxy may still be skipping the node drained last (see nginx.conf fail_timeout).
    stored = [e["seq"] for e in await stored_events(cluster.nodes[0].url, cluster.headers("admin"), session_id)]
    assert stored == list(range(1, len(stored) + 1)), "stored seqs are gapless"
    assert set(acked) <= set(stored), f"acknowledged but not stored: {sorted(set(acked) - set(stored))[:10]}"
    last = stored[-1]
    for viewer in watching:
        await viewer.wait_for_seq(last, deadline=30)
        assert viewer.problems(last) == "", f"{viewer.name}: {viewer.problems(last)}; {viewer.summary()}"
    assert any(len(v.joins) > 1 for v in watching), "no viewer had to move: the restart was not exercised"
    assert publisher.connections > 1, "the publisher's node was never restarted under it"
    log = (cluster.run_dir / "cluster.out").read_text()
    assert all(f"rolling restart of {node_id}" in log for node_id in old_pids), log[-2000:]


@contextlib.asynccontextmanager
async def _operator(cluster: RunningCluster):  # type: ignore[no-untyped-def]
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    await sio.connect(cluster.proxy, auth={"token": cluster.token("operator")}, transports=["websocket"])
    try:
        yield sio
    finally:
        await sio.disconnect()


def _count_at_least(publisher: ReconnectingPublisher, count: int):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        return len(publisher.acked) >= count

    return probe


def _all_gone(pids: list[int]):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        return not any(pid_alive(pid) for pid in pids)

    return probe


def _ready(url: str):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        return await http_status(f"{url}/ready") == 200

    return probe
