"""What the Redis manager makes of the messages on its channels: its own echoes, other nodes', forgeries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from testpulse.bus.broker import SIGNATURE_BYTES, ClusterManager

pytestmark = pytest.mark.unit

KEY = b"k" * 32
CHANNEL = "testpulse:room:session:s1"


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[ClusterManager, ClusterManager]]:
    # No Redis is reached: the clients connect lazily, and these drive only signing and dispatch.
    here, there = ClusterManager("redis://127.0.0.1:9/0", key=KEY), ClusterManager("redis://127.0.0.1:9/0", key=KEY)
    yield here, there
    for manager in (here, there):
        await manager.redis.aclose()


def queued(manager: ClusterManager) -> list[bytes]:
    return [entry.message[1] for entry in manager._outbox._queue]


def presence_calls(manager: ClusterManager) -> list[str]:
    calls: list[str] = []
    manager.on_presence = calls.append
    return calls


async def test_a_nodes_own_echo_is_verified_and_dropped_and_another_nodes_message_is_handled(
    nodes: tuple[ClusterManager, ClusterManager],
) -> None:
    here, there = nodes
    here.publish_presence("s1")
    (raw,) = queued(here)
    seen_here, seen_there = presence_calls(here), presence_calls(there)
    assert await here._dispatch(CHANNEL, raw) is True, "an echo still proves the link hears"
    assert seen_here == []
    assert await there._dispatch(CHANNEL, raw) is True
    assert seen_there == ["s1"]


async def test_a_forged_or_damaged_message_is_rejected_even_when_it_looks_like_an_echo(
    nodes: tuple[ClusterManager, ClusterManager],
) -> None:
    here, there = nodes
    here.publish_presence("s1")
    (raw,) = queued(here)
    signature, body = raw[:SIGNATURE_BYTES], raw[SIGNATURE_BYTES:]
    tampered = signature + body.replace(b'"s1"', b'"s2"')
    other_cluster = ClusterManager("redis://127.0.0.1:9/0", key=b"x" * 32)
    try:
        signed_elsewhere = other_cluster._sign({"from": here.host_id, "n": 1, "method": "presence", "session_id": "s1"})
    finally:
        await other_cluster.redis.aclose()
    assert signed_elsewhere[SIGNATURE_BYTES:].startswith(body[: len(body) // 2].split(b',"n"')[0])
    for forged in (tampered, signed_elsewhere, b"\0" * SIGNATURE_BYTES + body, body, b"", "text"):
        assert await here._dispatch(CHANNEL, forged) is False
        assert await there._dispatch(CHANNEL, forged) is False


async def test_a_callback_to_this_node_is_not_mistaken_for_an_echo(
    nodes: tuple[ClusterManager, ClusterManager],
) -> None:
    here, _there = nodes
    handled: list[dict[str, Any]] = []

    async def handle_callback(message: dict[str, Any]) -> None:
        handled.append(message)

    here._handle_callback = handle_callback  # type: ignore[method-assign]
    here._enqueue(CHANNEL, {"method": "callback", "host_id": here.host_id, "sid": "a", "id": 1, "args": []})
    (raw,) = queued(here)
    assert await here._dispatch(CHANNEL, raw) is True
    assert [m["method"] for m in handled] == ["callback"]


async def test_messages_keep_non_ascii_text_and_integers_past_64_bits(
    nodes: tuple[ClusterManager, ClusterManager],
) -> None:
    here, there = nodes
    updates: list[dict[str, Any]] = []
    there.on_status = updates.append
    update = {"session_id": "s1", "status": "running", "note": "Überprüfung 検出 \u2028", "big": 2**70}
    here.publish_status(update)
    (raw,) = queued(here)
    assert await there._dispatch(CHANNEL, raw) is True
    assert updates == [update]
