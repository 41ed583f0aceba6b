"""Idempotent publish (PROTOCOL.md 1.1): a detection's `id` is stored once per session, and a repeat
is answered with the stored seq, over Socket.IO and HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from support.client import Client, detection
from support.nodes import Connect, NodeUnderTest

pytestmark = pytest.mark.contract


async def running_session(client: Client) -> str:
    return str((await client.start_session())["id"])


async def stored(http: httpx.AsyncClient, node: NodeUnderTest, session_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/api/sessions/{session_id}/events", headers=node.headers("viewer"))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def publish(session_id: str, i: int, item_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body = {"session_id": session_id, **detection(i, **fields)}
    if item_id is not None:
        body["id"] = item_id
    return body


async def test_a_repeated_id_is_acked_with_the_stored_seq_and_not_stored_or_emitted_again(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    admin = await connect(node, "admin")
    viewer = await connect(node, "viewer")
    session_id = await running_session(admin)
    await viewer.join(session_id)
    assert await admin.ok("publish_detection", publish(session_id, 0, "frame-0")) == {"ok": True, "seq": 1}
    repeat = await admin.ok("publish_detection", publish(session_id, 9, "frame-0", label="changed"))
    assert repeat == {"ok": True, "seq": 1, "duplicate": True}
    # The repeat took no seq: the next detection follows on without a gap.
    assert await admin.ok("publish_detection", publish(session_id, 1)) == {"ok": True, "seq": 2}
    assert await viewer.wait_for_seqs(session_id, 2) == [1, 2]
    events = await stored(http, node, session_id)
    assert [(e["seq"], e["id"], e["label"]) for e in events] == [(1, "frame-0", "object-0"), (2, None, "object-1")]
    await viewer.ok("leave_session", {"session_id": "unrelated"})  # a round trip after the last delivery
    assert viewer.seqs(session_id) == [1, 2], "a duplicate was emitted"
    assert (await viewer.join(session_id))["session"]["last_seq"] == 2


async def test_a_batch_repeating_stored_ids_gets_each_items_seq_and_the_duplicate_count(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    admin = await connect(node, "admin")
    viewer = await connect(node, "viewer")
    session_id = await running_session(admin)
    await viewer.join(session_id)
    await admin.ok("publish_detection", publish(session_id, 0, "a"))
    await admin.ok("publish_detection", publish(session_id, 1, "b"))
    items = [{**detection(i), "id": item_id} for i, item_id in enumerate(["c", "a", "d", "b"], start=2)]
    ack = await admin.ok("publish_detections", {"session_id": session_id, "detections": items})
    assert ack == {"ok": True, "first_seq": 1, "last_seq": 4, "seqs": [3, 1, 4, 2], "duplicates": 2}
    assert await viewer.wait_for_seqs(session_id, 4) == [1, 2, 3, 4]
    assert [e["id"] for e in await stored(http, node, session_id)] == ["a", "b", "c", "d"]
    again = await admin.ok("publish_detections", {"session_id": session_id, "detections": items})
    assert again == {"ok": True, "first_seq": 1, "last_seq": 4, "seqs": [3, 1, 4, 2], "duplicates": 4}
    assert await admin.ok("publish_detection", publish(session_id, 7)) == {"ok": True, "seq": 5}
    assert await viewer.wait_for_seqs(session_id, 5) == [1, 2, 3, 4, 5]


async def test_an_id_repeated_inside_one_batch_is_stored_once(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    items = [{**detection(0), "id": "x"}, {**detection(1), "id": "y"}, {**detection(2), "id": "x"}, detection(3)]
    ack = await admin.ok("publish_detections", {"session_id": session_id, "detections": items})
    assert ack == {"ok": True, "first_seq": 1, "last_seq": 3, "seqs": [1, 2, 1, 3], "duplicates": 1}
    events = await stored(http, node, session_id)
    assert [(e["seq"], e["id"], e["label"]) for e in events] == [
        (1, "x", "object-0"),
        (2, "y", "object-1"),
        (3, None, "object-3"),
    ]


async def test_concurrent_publishers_of_one_id_store_it_once_and_the_others_items_are_kept(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    """Publishers whose requests share one group commit: the duplicates in it fail nobody."""
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    detectors = await asyncio.gather(*(connect(node, "detector") for _ in range(8)))
    acks = await asyncio.gather(
        *(
            d.ok(
                "publish_detections",
                {"session_id": session_id, "detections": [{**detection(i), "id": "shared"}, detection(i)]},
            )
            for i, d in enumerate(detectors)
        )
    )
    shared = {ack["seqs"][0] for ack in acks}
    assert len(shared) == 1, acks
    assert sorted(ack["duplicates"] for ack in acks) == [0] + [1] * 7
    events = await stored(http, node, session_id)
    assert [e["seq"] for e in events] == list(range(1, 10)), "seqs are not gapless"
    assert [e["id"] for e in events].count("shared") == 1
    assert sorted(ack["seqs"][1] for ack in acks) == sorted(set(range(1, 10)) - shared)


async def test_a_repeat_of_stored_detections_is_acked_after_the_session_stopped(
    node: NodeUnderTest, connect: Connect
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    await admin.ok("publish_detection", publish(session_id, 0, "before-stop"))
    await admin.ok("stop_test_session", {"session_id": session_id})
    repeat = await admin.ok("publish_detection", publish(session_id, 0, "before-stop"))
    assert repeat == {"ok": True, "seq": 1, "duplicate": True}
    error = await admin.refused("publish_detection", publish(session_id, 1, "after-stop"))
    assert error["code"] == "session_not_running"
    mixed = [{**detection(0), "id": "before-stop"}, {**detection(1), "id": "after-stop"}]
    error = await admin.refused("publish_detections", {"session_id": session_id, "detections": mixed})
    assert error["code"] == "session_not_running"


async def test_ids_are_scoped_to_their_session(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    first, second = await running_session(admin), await running_session(admin)
    await admin.ok("publish_detection", publish(first, 0, "same"))
    await admin.ok("publish_detection", publish(first, 1))
    assert await admin.ok("publish_detection", publish(second, 0, "same")) == {"ok": True, "seq": 1}


BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param(7, id="number"),
    pytest.param(["a"], id="list"),
    pytest.param("a\x00b", id="nul"),
]


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_a_bad_id_is_bad_request_naming_the_field(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient, bad_id: Any
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    error = await admin.refused("publish_detection", {"session_id": session_id, **detection(0), "id": bad_id})
    assert error["code"] == "bad_request" and error["message"].startswith("id:"), error
    items = [detection(0), {**detection(1), "id": bad_id}]
    error = await admin.refused("publish_detections", {"session_id": session_id, "detections": items})
    assert error["code"] == "bad_request" and error["message"].startswith("detections[1].id:"), error
    response = await http.post(
        f"/api/sessions/{session_id}/detections", headers=node.headers("detector"), json={**detection(0), "id": bad_id}
    )
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("id:"), response.text
    assert (await admin.join(session_id))["session"]["last_seq"] == 0


async def test_an_id_of_64_characters_is_accepted(node: NodeUnderTest, connect: Connect) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    assert await admin.ok("publish_detection", publish(session_id, 0, "é" * 64)) == {"ok": True, "seq": 1}
    assert (await admin.ok("publish_detection", publish(session_id, 0, "é" * 64)))["duplicate"] is True


async def test_http_repeat_is_200_with_the_stored_seq_and_duplicate(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    url, headers = f"/api/sessions/{session_id}/detections", node.headers("detector")
    first = await http.post(url, headers=headers, json={**detection(0), "id": "http-0"})
    assert (first.status_code, first.json()) == (201, {"ok": True, "seq": 1})
    repeat = await http.post(url, headers=headers, json={**detection(0), "id": "http-0"})
    assert (repeat.status_code, repeat.json()) == (200, {"ok": True, "seq": 1, "duplicate": True})
    # Socket.IO and HTTP share the key.
    assert await admin.ok("publish_detection", publish(session_id, 0, "http-0")) == {
        "ok": True,
        "seq": 1,
        "duplicate": True,
    }
    batch = {"detections": [{**detection(1), "id": "http-1"}, {**detection(0), "id": "http-0"}]}
    mixed = await http.post(url, headers=headers, json=batch)
    assert mixed.status_code == 201
    assert mixed.json() == {"ok": True, "first_seq": 1, "last_seq": 2, "seqs": [2, 1], "duplicates": 1}
    only_repeats = await http.post(url, headers=headers, json=batch)
    assert only_repeats.status_code == 200 and only_repeats.json()["duplicates"] == 2


async def test_detection_events_carry_their_id_live_on_replay_and_over_http(
    node: NodeUnderTest, connect: Connect, http: httpx.AsyncClient
) -> None:
    admin = await connect(node, "admin")
    session_id = await running_session(admin)
    viewer = await connect(node, "viewer")
    await viewer.join(session_id)
    await admin.ok("publish_detection", publish(session_id, 0, "with-id"))
    await admin.ok("publish_detection", publish(session_id, 1))
    await viewer.wait_for_seqs(session_id, 2)
    assert [d["id"] for d in viewer.detections(session_id)] == ["with-id", None]
    late = await connect(node, "viewer")
    assert (await late.join(session_id, last_seq=0))["replayed"] == 2
    assert [d["id"] for d in late.detections(session_id)] == ["with-id", None]
    assert [e["id"] for e in await stored(http, node, session_id)] == ["with-id", None]
