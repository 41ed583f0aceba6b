"""Messages on the cluster's Redis channels that no node signed are ignored, and harm nobody."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re

import httpx
import pytest
from support.client import Client, detection
from support.cluster import CONTROL_CHANNEL, SECRET, OpenClient, RunningCluster, redis_client, room_channel

from testpulse.bus.broker import SIGNATURE_BYTES, cluster_key

pytestmark = pytest.mark.cluster


def forgeries(session_id: str, victim_sid: str) -> list[bytes]:
    """Junk, unsigned messages, messages with a wrong signature and authentic but malformed ones."""
    forged_detection = {
        "method": "detections",
        "session_id": session_id,
        "items": [
            {"seq": s, "label": "forged", "confidence": 1.0, "received_at": "2024-01-01T00:00:00Z"}
            for s in range(1, 40)
        ],
        "host_id": "intruder",
    }
    forged_update = {
        "method": "emit",
        "event": "test_session_update",
        "data": {"session_id": session_id, "status": "stopped", "previous_status": "running"},
        "namespace": "/",
        "room": f"session:{session_id}",
        "host_id": "intruder",
    }
    forged_disconnect = {"method": "disconnect", "sid": victim_sid, "namespace": "/", "host_id": "intruder"}
    forged_close = {"method": "close_room", "room": f"session:{session_id}", "namespace": "/", "host_id": "intruder"}
    wrong_key = hmac.new(b"not-the-cluster-key", b"x", hashlib.sha256).digest()
    genuine_key = cluster_key(SECRET)

    def signed(message: object, key: bytes) -> bytes:
        body = json.dumps(message).encode()
        return hmac.new(key, body, hashlib.sha256).digest()[:SIGNATURE_BYTES] + body

    messages: list[bytes] = [b"", b"x", b"\x00" * SIGNATURE_BYTES, b"\xff\xfe garbage \x00\x01", b"{" * 5000]
    messages += [bytes(range(256)) * 4096]  # 1 MiB of noise
    for message in (forged_detection, forged_update, forged_disconnect, forged_close):
        body = json.dumps(message).encode()
        messages += [body, b"\x00" * SIGNATURE_BYTES + body, signed(message, wrong_key)]
        messages += [signed(message, genuine_key)[:SIGNATURE_BYTES] + body.replace(b"intruder", b"intrudeR")]
    # Authentic (signed with the cluster key) but malformed: must not crash a node either.
    for message in (
        {"method": "detections", "session_id": session_id, "items": "not a list"},
        {"method": "detections", "session_id": session_id, "items": [None, 5, {"seq": "x"}, {"seq": -1}]},
        {"method": "detections", "session_id": 42, "items": []},
        {"method": "emit", "host_id": "intruder"},
        {"method": "disconnect", "host_id": "intruder"},
        {"method": "no-such-method", "host_id": "intruder"},
        [1, 2, 3],
        "just a string",
    ):
        messages.append(signed(message, genuine_key))
    messages.append(genuine_key[:SIGNATURE_BYTES] + b"not json")
    return messages


async def rejected_count(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{url}/metrics")).text
    match = re.search(r'^testpulse_redis_messages_received_total\{kind="rejected"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_garbage_and_forged_messages_on_redis_channels_are_ignored(
    cluster: RunningCluster, open_client: OpenClient
) -> None:
    operator = await open_client(cluster.nodes[0].url, "operator")
    session_id = (await operator.ok("start_test_session", {"name": "forgeries"}))["session"]["id"]
    members: list[Client] = list(
        await asyncio.gather(*(open_client(n.url, "viewer", name=f"viewer@{n.id}") for n in cluster.nodes))
    )
    for member in members:
        await member.ok("join_session", {"session_id": session_id})
    detector = await open_client(cluster.nodes[1].url, "detector")
    rejected_before = [await rejected_count(n.url) for n in cluster.nodes]

    labels: list[str] = []

    async def publish(count: int) -> None:
        for _ in range(count):
            labels.append(f"real-{len(labels) + 1}")
            await detector.ok(
                "publish_detection", {"session_id": session_id, **detection(len(labels), label=labels[-1])}
            )

    await publish(3)
    messages = forgeries(session_id, members[2].sio.get_sid("/"))
    async with redis_client(cluster.redis_url) as redis:
        for i, message in enumerate(messages):
            for channel in (CONTROL_CHANNEL, room_channel(session_id)):
                receivers = await redis.publish(channel, message)
                assert receivers >= 1, f"nobody listens on {channel}"
            if i % 4 == 0:
                await publish(1)  # real traffic interleaved with the forgeries
    await publish(3)
    await operator.ok("pause_test_session", {"session_id": session_id})

    for member in members:
        await member.wait_for(lambda m=member: m.updates(session_id), what="the real pause update")
    total = len(labels)
    for member in members:
        assert member.seqs(session_id) == list(range(1, total + 1)), member.name
        assert [d["label"] for d in member.detections(session_id)] == labels, member.name
        assert [u["status"] for u in member.updates(session_id)] == ["paused"], member.name
        assert member.connected and not member.disconnects and not member.errors(), member.summary()
    for node, before in zip(cluster.nodes, rejected_before, strict=True):
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{node.url}/ready")).status_code == 200, node.id
        # The forgeries did reach every node (they are subscribed to both channels) and were refused there.
        assert await rejected_count(node.url) - before >= len(messages), node.id
