"""The pure side of presence (server/domain/presence.py): merging nodes, the rounds' diffs, coalescing,
and what a node writes, fed by hand with an in-memory board and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from testpulse.domain.presence import Members, Presence, change, merge, view
from testpulse.domain.protocol import JoinRequest, ProtocolError, RefreshRequest

pytestmark = pytest.mark.unit


class Board:
    """An in-memory PresenceBoard: other nodes' entries set by the test, this node's writes recorded."""

    def __init__(self) -> None:
        self.others: dict[str, list[Members]] = {}
        self.writes: list[dict[str, Members]] = []
        self.kept = True

    async def write(self, entries: dict[str, Members]) -> None:
        self.writes.append(entries)

    async def read(self, session_ids: list[str]) -> dict[str, list[Members]]:
        return {s: self.others.get(s, []) for s in session_ids}

    async def heartbeat(self) -> bool:
        return self.kept

    async def withdraw(self, session_ids: list[str]) -> None:
        return None


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[list[str], str, dict[str, Any]]] = []

    def __call__(self, sids: list[str], event: str, data: dict[str, Any]) -> int:
        self.sent.append((sorted(sids), event, data))
        return len(sids)


def presence() -> tuple[Presence, Board, Outbox]:
    board, outbox = Board(), Outbox()
    return Presence(board, outbox), board, outbox


def test_merge_adds_connections_and_keeps_the_highest_role() -> None:
    merged = merge([{"a": ("viewer", 2), "b": ("operator", 1)}, {"a": ("admin", 1)}])
    assert merged == {"a": ("admin", 3), "b": ("operator", 1)}


def test_change_lists_joined_and_left_sorted_by_sub() -> None:
    joined, left = change({"b": "viewer", "z": "viewer"}, {"c": ("viewer", 1), "a": ("admin", 1), "b": ("viewer", 1)})
    assert joined == [{"sub": "a", "role": "admin"}, {"sub": "c", "role": "viewer"}]
    assert left == [{"sub": "z", "role": "viewer"}]


def test_view_truncates_at_the_limit_and_counts_everyone() -> None:
    members = {f"s{i:02d}": ("viewer", 1) for i in range(5)}
    shown = view("x", members, limit=3)
    assert shown["count"] == 5 and shown["truncated"] is True
    assert [m["sub"] for m in shown["members"]] == ["s00", "s01", "s02"]


async def test_a_burst_of_joins_is_one_write_and_one_round_with_the_net_change() -> None:
    tracker, board, outbox = presence()
    tracker.join("w", "s", "watcher", "viewer", True)
    await tracker.write_now()
    await tracker.announce_due(0.0)
    assert outbox.sent == [
        (
            ["w"],
            "presence_update",
            {"session_id": "s", "count": 1, "joined": [{"sub": "watcher", "role": "viewer"}], "left": []},
        )
    ]
    for i in range(100):
        tracker.join(f"c{i}", "s", f"sub{i % 10}", "viewer", False)
    tracker.leave("c0", "s")
    await tracker.write_now()
    assert len(board.writes) == 2 and board.writes[-1]["s"]["sub1"] == ("viewer", 10)
    await tracker.announce_due(0.5)
    assert len(outbox.sent) == 1, "within a second of the last round: held back"
    await tracker.announce_due(1.0)
    _, _, update = outbox.sent[-1]
    assert update["count"] == 11 and len(update["joined"]) == 10 and update["left"] == []


async def test_remote_members_count_and_a_sub_on_two_nodes_is_one_member() -> None:
    tracker, board, outbox = presence()
    tracker.join("w", "s", "shared", "viewer", True)
    board.others["s"] = [{"shared": ("operator", 2), "remote": ("viewer", 1)}]
    snapshot = await tracker.snapshot("s")
    assert snapshot["count"] == 2
    assert snapshot["members"][1] == {"sub": "shared", "role": "operator", "connections": 3}
    await tracker.announce_due(0.0)
    board.others["s"] = [{"shared": ("operator", 1)}]
    tracker.remote_changed("s")
    await tracker.announce_due(2.0)
    assert outbox.sent[-1][2]["left"] == [{"sub": "remote", "role": "viewer"}]


async def test_a_lost_board_is_written_whole_again() -> None:
    tracker, board, _ = presence()
    tracker.join("a", "s1", "x", "viewer", False)
    tracker.join("b", "s2", "y", "viewer", False)
    await tracker._heartbeat()
    await tracker.write_now()
    await tracker.write_now()
    assert len(board.writes) == 1
    board.kept = False
    await tracker._heartbeat()
    await tracker.write_now()
    assert set(board.writes[-1]) == {"s1", "s2"}


def test_join_request_presence_must_be_a_boolean() -> None:
    assert JoinRequest.parse({"session_id": "s", "presence": True}).presence is True
    assert JoinRequest.parse({"session_id": "s"}).presence is False
    for bad in ("true", 1, [], {}):
        with pytest.raises(ProtocolError, match="presence"):
            JoinRequest.parse({"session_id": "s", "presence": bad})


def test_refresh_request_needs_a_token_string() -> None:
    assert RefreshRequest.parse({"token": "a.b.c"}).token == "a.b.c"
    for bad in ({}, {"token": ""}, {"token": 5}, {"token": "x" * 9000}, "a.b.c"):
        with pytest.raises(ProtocolError):
            RefreshRequest.parse(bad)
