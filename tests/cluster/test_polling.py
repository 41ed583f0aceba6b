"""Long-polling through nginx: every request of a session reaches the node that holds it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.client import Client, detection
from support.cluster import OpenClient, RunningCluster

pytestmark = pytest.mark.cluster


def count_requests(client: Client) -> list[tuple[str, int | None]]:
    """Record (method, HTTP status) of every Engine.IO request the client makes from now on."""
    seen: list[tuple[str, int | None]] = []
    eio = client.sio.eio
    original = eio._send_request

    async def send(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        response = await original(method, url, *args, **kwargs)
        seen.append((method, getattr(response, "status", None)))
        return response

    eio._send_request = send
    return seen


async def test_polling_session_through_the_proxy_survives_a_thousand_polls(
    cluster: RunningCluster, open_client: OpenClient
) -> None:
    count = 1000
    operator = await open_client(cluster.nodes[0].url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "thousand-polls"}))["session"]["id"]
    detector = await open_client(cluster.nodes[1].url, "detector")
    poller = Client("poller")
    requests = count_requests(poller)
    try:
        await poller.connect(cluster.proxy, token=cluster.token("viewer"), transport="polling")
        sid = poller.sio.eio.sid
        node = (await poller.wait_for_event("connection_status"))["node"]
        await poller.ok("join_session", {"session_id": session_id})
        started = time.monotonic()
        for i in range(1, count + 1):
            # One detection at a time, each awaited by the poller: every one arrives in a poll of its own.
            await detector.ok("publish_detection", {"session_id": session_id, **detection(i)})
            await poller.wait_for(lambda i=i: len(poller.seqs(session_id)) >= i, what=f"seq {i}")
        elapsed = time.monotonic() - started
        polls = [status for method, status in requests if method == "GET"]
        assert len(polls) >= count, f"only {len(polls)} polls for {count} detections"
        assert all(status == 200 for _, status in requests), [r for r in requests if r[1] != 200][:5]
        assert poller.seqs(session_id) == list(range(1, count + 1))
        assert poller.connected and poller.sio.eio.sid == sid and poller.sio.transport() == "polling"
        assert not poller.disconnects and not poller.errors(), poller.summary()
        assert poller.received("connection_status")[0]["node"] == node
        assert elapsed < 90, f"{count} poll round trips took {elapsed:.0f}s"
    finally:
        await poller.disconnect()
