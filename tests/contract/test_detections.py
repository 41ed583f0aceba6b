"""Detections over Socket.IO: acks, the event payload, seq (gapless, unique, ordered), replay and delivery."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest
from support.processes import wait_until

pytestmark = pytest.mark.contract

EVENT_FIELDS = {"session_id", "seq", "id", "label", "confidence", "bbox", "frame", "ts", "attributes", "received_at"}


async def running_session(client: Client) -> str:
    return str((await client.start_session())["id"])


# ---- publishing and the event payload ----------------------------------------------------------


async def test_publish_detection_acks_its_seq(node: NodeUnderTest, connect: Connect) -> None:
    detector = await connect(node, "detector")
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    ack = await detector.ok("publish_detection", {"session_id": session_id, **detection(0)})
    assert ack == {"ok": True, "seq": 1}
    assert (await detector.ok("publish_detection", {"session_id": session_id, **detection(1)}))["seq"] == 2


async def test_detection_event_reaches_room_members_with_the_contracts_payload(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    admin = await connect(node, "admin", transport=transport)
    viewer = await connect(node, "viewer", transport=transport)
    detector = await connect(node, "detector", transport=transport)
    session_id = await running_session(admin)
    await viewer.join(session_id)
    sent = detection(7, label="pedestrian", confidence=0.875, bbox=[-3, 4.5, 10, 0], attributes={"lane": 2})
    before = datetime.now(UTC)
    seq = await detector.publish(session_id, **sent)
    for member in (viewer, admin):
        event = await member.wait_for_event("detection_event", lambda d: d["session_id"] == session_id)
        assert set(event) == EVENT_FIELDS
        assert event["seq"] == seq
        for field in ("label", "confidence", "bbox", "frame", "ts", "attributes"):
            assert event[field] == sent[field], field
        received_at = datetime.fromisoformat(event["received_at"].replace("Z", "+00:00"))
        assert before - timedelta(seconds=5) <= received_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert detector.detections(session_id) == [], "the publisher did not join the room"


async def test_optional_fields_arrive_as_null(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.ok("publish_detection", {"session_id": session_id, "label": "bare", "confidence": 1})
    event = await admin.wait_for_event("detection_event", lambda d: d["session_id"] == session_id)
    assert {k: event[k] for k in ("bbox", "frame", "ts", "attributes")} == dict.fromkeys(
        ("bbox", "frame", "ts", "attributes")
    )
    assert event["confidence"] == 1


@pytest.mark.parametrize(
    "ts", [1_700_000_000_123, 1_700_000_000_123.25, 0, 2**53 + 1], ids=["int", "float", "zero", "2^53+1"]
)
async def test_ts_is_echoed_unchanged_live_on_replay_and_over_http(
    node: NodeUnderTest, connect: Connect, ts: float
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    seq = await admin.publish(session_id, ts=ts)
    live = await admin.wait_for_event("detection_event", lambda d: d["session_id"] == session_id)
    late = await connect(node, "viewer")
    await late.join(session_id, last_seq=0)
    replayed = await late.wait_for_event("detection_event", lambda d: d["session_id"] == session_id)
    async with httpx.AsyncClient(base_url=node.url) as http:
        stored = (await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))).json()
    for echoed in (live["ts"], replayed["ts"], stored["events"][0]["ts"]):
        assert echoed == ts and type(echoed) is type(ts), (echoed, ts)
    assert replayed["seq"] == live["seq"] == seq


async def test_batch_publish_acks_first_and_last_seq(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.publish(session_id)
    ack = await admin.ok(
        "publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(5)]}
    )
    assert ack == {"ok": True, "first_seq": 2, "last_seq": 6, "seqs": [2, 3, 4, 5, 6], "duplicates": 0}
    single = await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(9)]})
    assert (single["first_seq"], single["last_seq"]) == (7, 7)
    await admin.wait_for_seqs(session_id, 7)
    assert admin.seqs(session_id) == list(range(1, 8))
    assert [d["label"] for d in admin.detections(session_id)[1:6]] == [f"object-{i}" for i in range(5)]


async def test_batch_of_1000_detections_is_accepted_and_delivered_in_order(
    node: NodeUnderTest, connect: Connect
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    items = [{"label": f"b{i}", "confidence": 0.5, "frame": i} for i in range(1000)]
    ack = await admin.ok("publish_detections", {"session_id": session_id, "detections": items})
    assert (ack["first_seq"], ack["last_seq"]) == (1, 1000)
    assert await admin.wait_for_seqs(session_id, 1000) == list(range(1, 1001))
    assert [d["frame"] for d in admin.detections(session_id)] == list(range(1000))


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["created", "paused", "stopped"])
@pytest.mark.parametrize("event", ["publish_detection", "publish_detections"])
async def test_detections_are_refused_unless_the_session_is_running(
    node: NodeUnderTest, connect: Connect, status: str, event: str
) -> None:
    admin = await connect(node, "admin")
    if status == "created":
        async with httpx.AsyncClient(base_url=node.url) as http:
            response = await http.post("/api/sessions", headers=node.headers("operator"))
        session_id = response.json()["session"]["id"]
    else:
        session_id = await running_session(admin)
        await admin.publish(session_id)
        await admin.ok("pause_test_session", {"session_id": session_id})
        if status == "stopped":
            await admin.ok("stop_test_session", {"session_id": session_id})
    payload = {"session_id": session_id, **detection(1), "detections": [detection(1)]}
    error = await admin.refused(event, payload)
    assert error["code"] == "session_not_running"
    assert (await admin.ok("join_session", {"session_id": session_id}))["session"]["last_seq"] == (
        0 if status == "created" else 1
    )


async def test_detections_are_accepted_again_after_resume_with_the_next_seq(
    node: NodeUnderTest, connect: Connect
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    assert await admin.publish(session_id) == 1
    await admin.ok("pause_test_session", {"session_id": session_id})
    assert (await admin.refused("publish_detection", {"session_id": session_id, **detection()}))["code"] == (
        "session_not_running"
    )
    await admin.ok("resume_test_session", {"session_id": session_id})
    assert await admin.publish(session_id) == 2


@pytest.mark.parametrize("event", ["publish_detection", "publish_detections"])
async def test_unknown_session_is_not_found_for_publishers(node: NodeUnderTest, connect: Connect, event: str) -> None:
    detector = await connect(node, "detector")
    error = await detector.refused(event, {"session_id": "nope", **detection(), "detections": [detection()]})
    assert error["code"] == "not_found"


@pytest.mark.parametrize("role", ["viewer", "operator"])
@pytest.mark.parametrize("event", ["publish_detection", "publish_detections"])
async def test_roles_without_publish_get_unauthorized(
    node: NodeUnderTest, connect: Connect, role: str, event: str
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    client = await connect(node, role)
    error = await client.refused(event, {"session_id": session_id, **detection(), "detections": [detection()]})
    assert error["code"] == "unauthorized"
    assert (await admin.ok("join_session", {"session_id": session_id}))["session"]["last_seq"] == 0


@pytest.mark.parametrize(
    ("event", "change", "field"),
    [
        ("publish_detection", {"label": ""}, "label"),
        ("publish_detection", {"label": None}, "label"),
        ("publish_detection", {"confidence": 1.5}, "confidence"),
        ("publish_detection", {"confidence": True}, "confidence"),
        ("publish_detection", {"bbox": [1, 2, -3, 4]}, "bbox"),
        ("publish_detection", {"frame": -1}, "frame"),
        ("publish_detection", {"frame": 2**64}, "frame"),
        ("publish_detection", {"ts": "yesterday"}, "ts"),
        ("publish_detection", {"attributes": {"blob": "x" * 16400}}, "attributes"),
        ("publish_detections", {"detections": []}, "detections"),
        ("publish_detections", {"detections": [detection()] * 1001}, "detections"),
        (
            "publish_detections",
            {"detections": [detection(), {"label": "x", "confidence": 2}]},
            "detections[1].confidence",
        ),
    ],
)
async def test_bad_detection_gets_bad_request_naming_the_field_and_stores_nothing(
    node: NodeUnderTest, connect: Connect, event: str, change: dict[str, Any], field: str
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    payload = {"session_id": session_id, **detection(), **change}
    if event == "publish_detections" and "detections" not in change:
        payload["detections"] = [detection()]
    error = await admin.refused(event, payload)
    assert error["code"] == "bad_request"
    assert error["message"].startswith(f"{field}:"), error
    assert await admin.publish(session_id) == 1, "a refused publish consumed a seq"


# ---- seq under concurrency ---------------------------------------------------------------------


async def test_seq_is_gapless_and_unique_under_concurrent_publishers(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    viewer = await connect(node, "viewer")
    await viewer.join(session_id)
    publishers = [await connect(node, "detector", name=f"detector-{p}") for p in range(4)]
    sent: dict[int, str] = {}  # seq -> label, from the acks

    async def publish_all(p: int, client: Client) -> None:
        rng = random.Random(p)
        i = 0
        pending: list[asyncio.Future[Any]] = []
        while i < 250:
            size = rng.choice([1, 1, 1, 3, 10])
            size = min(size, 250 - i)
            labels = [f"p{p}-{j}" for j in range(i, i + size)]
            if size == 1 and rng.random() < 0.8:
                call = client.ok("publish_detection", {"session_id": session_id, "label": labels[0], "confidence": 0.1})
            else:
                items = [{"label": label, "confidence": 0.1} for label in labels]
                call = client.ok("publish_detections", {"session_id": session_id, "detections": items})
            pending.append(asyncio.ensure_future(_record(call, labels)))
            i += size
            if len(pending) >= 8:  # a few in flight per publisher, so commits interleave
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    async def _record(call: Any, labels: list[str]) -> None:
        ack = await call
        first = ack["seq"] if "seq" in ack else ack["first_seq"]
        last = ack["seq"] if "seq" in ack else ack["last_seq"]
        assert last - first + 1 == len(labels), ack
        for seq, label in zip(range(first, last + 1), labels, strict=True):
            assert seq not in sent, f"seq {seq} was given twice"
            sent[seq] = label

    await asyncio.gather(*(publish_all(p, c) for p, c in enumerate(publishers)))
    assert sorted(sent) == list(range(1, 1001))

    stored: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await http.get(
            f"/api/sessions/{session_id}/events",
            params={"after_seq": after, "limit": 300},
            headers=node.headers("viewer"),
        )
        assert response.status_code == 200, response.text
        page = response.json()["events"]
        if not page:
            break
        stored.extend(page)
        after = page[-1]["seq"]
    assert [e["seq"] for e in stored] == list(range(1, 1001))
    assert {e["seq"]: e["label"] for e in stored} == sent

    assert await viewer.wait_for_seqs(session_id, 1000, deadline=30) == list(range(1, 1001))
    assert {d["seq"]: d["label"] for d in viewer.detections(session_id)} == sent
    session = (await viewer.join(session_id))["session"]
    assert session["last_seq"] == 1000


# ---- joining, replay, leaving ------------------------------------------------------------------


async def test_join_without_last_seq_gets_only_live_detections(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    for i in range(3):
        await admin.publish(session_id, i)
    viewer = await connect(node, "viewer")
    ack = await viewer.join(session_id)
    assert set(ack) == {"ok", "session", "replayed"}
    assert ack["replayed"] == 0 and ack["session"]["last_seq"] == 3 and ack["session"]["id"] == session_id
    await admin.publish(session_id, 3)
    assert await viewer.wait_for_seqs(session_id, 1) == [4]


async def test_join_with_last_seq_replays_the_rest_in_order_before_live_ones(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(10)]})
    viewer = await connect(node, "viewer", transport=transport)
    ack = await viewer.join(session_id, last_seq=4)
    assert ack["replayed"] == 6
    await admin.publish(session_id, 10)
    assert await viewer.wait_for_seqs(session_id, 7) == list(range(5, 12))
    replayed = viewer.detections(session_id)[0]
    assert set(replayed) == EVENT_FIELDS and replayed["label"] == "object-4" and replayed["attributes"] == {"i": 4}


async def test_join_with_last_seq_zero_replays_everything(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(3)]})
    viewer = await connect(node, "viewer")
    assert (await viewer.join(session_id, last_seq=0))["replayed"] == 3
    assert await viewer.wait_for_seqs(session_id, 3) == [1, 2, 3]


async def test_join_with_last_seq_equal_to_the_sessions_replays_nothing(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.publish(session_id)
    viewer = await connect(node, "viewer")
    assert (await viewer.join(session_id, last_seq=1))["replayed"] == 0
    await admin.publish(session_id, 1)
    assert await viewer.wait_for_seqs(session_id, 1) == [2]


async def test_join_with_last_seq_beyond_the_session_is_insufficient_state(
    node: NodeUnderTest, connect: Connect
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.publish(session_id)
    viewer = await connect(node, "viewer")
    error = await viewer.refused("join_session", {"session_id": session_id, "last_seq": 2})
    assert error["code"] == "insufficient_state" and error["message"].startswith("last_seq:")
    await admin.publish(session_id, 1)
    await admin.ok("pause_test_session", {"session_id": session_id})
    await admin.wait_for_seqs(session_id, 2)
    await admin.wait_for(lambda: admin.updates(session_id), what="the pause update")
    await viewer.ok("leave_session", {"session_id": "unrelated"})  # one more round trip
    assert viewer.detections(session_id) == [] and viewer.updates(session_id) == [], "a refused join subscribed"


async def test_stopped_session_can_still_be_joined_and_replayed(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(4)]})
    await admin.ok("stop_test_session", {"session_id": session_id})
    viewer = await connect(node, "viewer")
    ack = await viewer.join(session_id, last_seq=1)
    assert ack["session"]["status"] == "stopped" and ack["replayed"] == 3
    assert await viewer.wait_for_seqs(session_id, 3) == [2, 3, 4]


async def test_rejoining_with_a_new_last_seq_restarts_the_replay(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.ok("publish_detections", {"session_id": session_id, "detections": [detection(i) for i in range(5)]})
    viewer = await connect(node, "viewer")
    await viewer.join(session_id, last_seq=3)
    await viewer.wait_for_seqs(session_id, 2)
    assert (await viewer.join(session_id, last_seq=0))["replayed"] == 5
    assert await viewer.wait_for_seqs(session_id, 7) == [4, 5, 1, 2, 3, 4, 5]


async def test_reconnecting_viewer_sees_each_seq_exactly_once(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    first = await connect(node, "viewer", transport=transport)
    await first.join(session_id)
    for i in range(5):
        await admin.publish(session_id, i)
    seen = await first.wait_for_seqs(session_id, 5)
    await first.disconnect()
    for i in range(5, 10):
        await admin.publish(session_id, i)
    second = await connect(node, "viewer", transport=transport)
    await second.join(session_id, last_seq=seen[-1])
    for i in range(10, 12):
        await admin.publish(session_id, i)
    assert seen + await second.wait_for_seqs(session_id, 7) == list(range(1, 13))


async def test_replay_racing_a_continuous_publisher_delivers_every_seq_once_in_order(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    publisher = await connect(node, "detector")
    acked = 0
    stop = asyncio.Event()

    # Paced below the node's 1000 events/s limit (CONTRACT_ENV): on a quiet machine an unpaced loop of
    # acked publishes outruns it and meets rate_limited, which is the limiter working, not this race.
    events_per_second = 400
    loop = asyncio.get_running_loop()
    next_publish_at = loop.time()

    async def publish_continuously() -> None:
        nonlocal acked, next_publish_at
        for i in itertools.count():
            if stop.is_set():
                return
            next_publish_at += (3 if i % 5 == 4 else 1) / events_per_second
            await asyncio.sleep(max(0.0, next_publish_at - loop.time()))
            if i % 5 == 4:
                ack = await publisher.ok(
                    "publish_detections", {"session_id": session_id, "detections": [detection(i)] * 3}
                )
                acked = ack["last_seq"]
            else:
                acked = await publisher.publish(session_id, i)

    task = asyncio.create_task(publish_continuously())
    try:
        await admin.wait_for(lambda: acked >= 50, deadline=15, what="50 detections published")
        rng = random.Random(7)
        for attempt in range(5):
            last_seq = rng.randint(max(0, acked - 40), acked)
            viewer = await connect(node, "viewer", transport=transport, name=f"racer-{attempt}")
            acked_before_join = acked
            ack = await viewer.join(session_id, last_seq=last_seq)
            target = acked + 30  # well past the join: replay and live both had to play a part
            await viewer.wait_for(
                lambda v=viewer, t=target: v.seqs(session_id) and v.seqs(session_id)[-1] >= t,
                deadline=20,
                what=f"seq {target}",
            )
            seqs = viewer.seqs(session_id)
            assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs))), (
                f"attempt {attempt}: after last_seq={last_seq} got gaps/duplicates/reordering: {seqs[:20]}..."
            )
            # Everything acknowledged before the join was stored before it, so it was replayed.
            assert ack["replayed"] >= acked_before_join - last_seq
            await viewer.disconnect()
    finally:
        stop.set()
        await task


async def test_leave_session_stops_delivery_to_that_client_only(
    node: NodeUnderTest, connect: Connect, transport: str
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    leaver = await connect(node, "viewer", transport=transport)
    stayer = await connect(node, "viewer", transport=transport)
    await leaver.join(session_id)
    await stayer.join(session_id)
    await admin.publish(session_id, 0)
    await leaver.wait_for_seqs(session_id, 1)
    assert await leaver.ok("leave_session", {"session_id": session_id}) == {"ok": True}
    await admin.publish(session_id, 1)
    await admin.ok("pause_test_session", {"session_id": session_id})
    assert await stayer.wait_for_seqs(session_id, 2) == [1, 2]
    await stayer.wait_for(lambda: stayer.updates(session_id), what="the pause update")
    await leaver.ok("leave_session", {"session_id": session_id})  # a round trip after both went out
    assert leaver.seqs(session_id) == [1]
    assert leaver.updates(session_id) == []


async def test_leaving_a_session_not_joined_is_harmless(node: NodeUnderTest, connect: Connect) -> None:
    viewer = await connect(node, "viewer")
    assert await viewer.ok("leave_session", {"session_id": "never-joined"}) == {"ok": True}


async def test_one_client_may_watch_several_sessions(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    a, b = await running_session(admin), await running_session(admin)
    viewer = await connect(node, "viewer")
    await viewer.join(a)
    await viewer.join(b)
    await admin.publish(a, 0)
    await admin.publish(b, 0)
    await admin.publish(a, 1)
    assert await viewer.wait_for_seqs(a, 2) == [1, 2]
    assert await viewer.wait_for_seqs(b, 1) == [1]


# ---- rate limiting -----------------------------------------------------------------------------


async def test_flood_beyond_the_burst_is_rate_limited_and_recovers(node: NodeUnderTest, connect: Connect) -> None:
    flooder = await connect(node, "viewer")
    calm = await connect(node, "viewer")
    started = time.monotonic()
    acks = await asyncio.gather(*(flooder.call("leave_session", {"session_id": "s"}) for _ in range(2000)))
    elapsed = time.monotonic() - started
    codes = [a["error"]["code"] if not a["ok"] else "ok" for a in acks]
    assert set(codes) == {"ok", "rate_limited"}, set(codes)
    burst, rate = node.settings.rate_limit_burst, node.settings.rate_limit_per_second
    assert burst <= codes.count("ok") <= burst + rate * elapsed + 1
    assert await calm.ok("leave_session", {"session_id": "s"}) == {"ok": True}

    async def accepted_again() -> bool:
        return bool((await flooder.call("leave_session", {"session_id": "s"}))["ok"])

    await wait_until(accepted_again, deadline=5, what="the flooder accepted again")


VARIED = [
    detection(0),
    detection(1, bbox=[0, 0.125, 1e-9, 12345.678], confidence=1.0, frame=0, ts=0),
    detection(2, bbox=None, frame=None, ts=None, attributes=None),
    detection(3, label="fußgänger 🚶", confidence=0, attributes={"nested": {"a": [1, 2.5, None, "x"]}, "big": 2**53}),
    detection(4, attributes={"list": [[0, 1], [2, 3]], "empty": {}, "flag": False}),
]


@pytest.mark.parametrize("publish", ["one_by_one", "batch"])
async def test_replay_and_http_return_exactly_what_live_delivery_carried(
    node: NodeUnderTest, connect: Connect, publish: str
) -> None:
    """Every field survives the store: the replayed and the HTTP-read events equal the live ones,
    whatever the shape of bbox and attributes (nested lists, nulls, unicode, large integers)."""
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    if publish == "batch":
        await admin.ok("publish_detections", {"session_id": session_id, "detections": VARIED})
    else:
        for item in VARIED:
            await admin.ok("publish_detection", {"session_id": session_id, **item})
    await admin.wait_for_seqs(session_id, len(VARIED))
    live = admin.detections(session_id)
    late = await connect(node, "viewer")
    await late.join(session_id, last_seq=0)
    await late.wait_for_seqs(session_id, len(VARIED))
    async with httpx.AsyncClient(base_url=node.url) as http:
        answer = await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))
    assert late.detections(session_id) == live
    assert answer.json()["events"] == live
    for sent, got in zip(VARIED, live, strict=True):
        for field_name in ("label", "confidence", "bbox", "frame", "ts", "attributes"):
            assert got[field_name] == sent[field_name], (field_name, sent, got)
