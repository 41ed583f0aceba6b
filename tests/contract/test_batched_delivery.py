"""Extension: join_session with batch_ms delivers `detection_batch` frames, each carrying the
detections of a window, exactly once and in seq order, replay included."""

from __future__ import annotations

import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.contract


def batched_seqs(client: Client, session_id: str) -> list[int]:
    return [
        item["seq"]
        for batch in client.received("detection_batch")
        if batch["session_id"] == session_id
        for item in batch["items"]
    ]


async def test_batched_viewer_gets_replay_then_live_in_few_frames_exactly_once_in_order(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    admin = await connect(node, "admin")
    viewer = await connect(node, "viewer", transport=transport)
    session_id = str((await admin.start_session())["id"])
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(30)]})

    joined = await viewer.ok("join_session", {"session_id": session_id, "last_seq": 10, "batch_ms": 50})
    assert joined["replayed"] == 20
    for i in range(60):
        await admin.emit("publish_detection", {"session_id": session_id, **detection(i)})
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(10)]})

    await viewer.wait_for(lambda: len(batched_seqs(viewer, session_id)) >= 90, what="90 batched detections")
    assert batched_seqs(viewer, session_id) == list(range(11, 101))
    assert viewer.detections(session_id) == [], "a batched viewer gets no per-event frames"
    frames = [b for b in viewer.received("detection_batch") if b["session_id"] == session_id]
    assert len(frames) < 90 / 2, "windows carry many detections per frame"
    assert set(frames[-1]["items"][0]) >= {"seq", "label", "confidence", "ts", "received_at", "session_id"}


async def test_batched_and_per_event_viewers_of_one_session_see_the_same_sequence(
    node: NodeUnderTest, connect: Connect
) -> None:
    admin = await connect(node, "admin")
    batched = await connect(node, "viewer")
    single = await connect(node, "viewer")
    session_id = str((await admin.start_session())["id"])
    await batched.ok("join_session", {"session_id": session_id, "batch_ms": 20})
    await single.join(session_id)
    for i in range(40):
        await admin.emit("publish_detection", {"session_id": session_id, **detection(i)})
    await single.wait_for_seqs(session_id, 40)
    await batched.wait_for(lambda: len(batched_seqs(batched, session_id)) >= 40, what="40 batched detections")
    assert batched_seqs(batched, session_id) == single.seqs(session_id) == list(range(1, 41))


@pytest.mark.parametrize("batch_ms", [-1, 1001, 2.5, "50", True])
async def test_batch_ms_outside_0_to_1000_is_a_bad_request_naming_the_field(
    node: NodeUnderTest, connect: Connect, batch_ms: object
) -> None:
    admin = await connect(node, "admin")
    session_id = str((await admin.start_session())["id"])
    refused = await admin.refused("join_session", {"session_id": session_id, "batch_ms": batch_ms})
    assert refused["code"] == "bad_request"
    assert refused["message"].startswith("batch_ms")
