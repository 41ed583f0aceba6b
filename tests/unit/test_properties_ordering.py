"""Properties of the ordering and status machines (server/domain/ordering.py, status_trail.py), driven
the way server/realtime/feeds.py drives them: any interleaving of appends, live announcements (lost,
repeated, reordered), store fills, joins with any last_seq, replays page by page and resubscribes
gives every viewer each seq once, in order; and status changes lost on the way are all delivered,
once each, in order, after a store read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testpulse.domain.ordering import Ordering, Replay, check_last_seq
from testpulse.domain.protocol import ProtocolError
from testpulse.domain.status_trail import StatusTrail, Verdict

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Row:
    seq: int


@dataclass
class Viewer:
    start: int  # the seq it held when it (last) joined
    got: list[int] = field(default_factory=list)
    replay: Replay[Row] | None = None

    @property
    def holds(self) -> int:
        return self.got[-1] if self.got else self.start


class Node:
    """One node's feed of one session, with the store and pub/sub around it."""

    def __init__(self, page: int) -> None:
        self.store: list[Row] = []
        self.order: Ordering[Row] = Ordering(0)
        self.inflight: list[Row] = []  # announced over pub/sub, not yet received
        self.viewers: dict[str, Viewer] = {}
        self.page = page

    def rows(self, after: int, limit: int) -> list[Row]:
        return self.store[after : after + limit]

    def deliver(self, items: list[Row]) -> None:
        for item in items:
            holding = self.order.holding(item.seq)
            for name, viewer in self.viewers.items():
                if viewer.replay is None and name not in holding:
                    viewer.got.append(item.seq)

    def join(self, name: str, last_seq: int | None) -> None:
        check_last_seq(last_seq, len(self.store))
        self.order.forget(name)
        start = self.order.cursor if last_seq is None else last_seq
        self.viewers[name] = Viewer(start, [], self.order.replay(last_seq))

    def replay_step(self, name: str) -> None:
        viewer = self.viewers[name]
        assert viewer.replay is not None
        read = viewer.replay.next_read(self.page)
        if read is None:
            self.order.joined(name, viewer.replay.position)
            viewer.replay = None
            return
        viewer.got.extend(row.seq for row in viewer.replay.take(self.rows(read.after_seq, read.limit)))

    def fill(self) -> None:
        read = self.order.gap_read(self.page)
        self.deliver(self.order.fill(self.rows(read.after_seq, read.limit), read).deliver)

    def settle(self) -> None:
        """Everything in flight arrives, the store fills what is left, every replay finishes."""
        self.deliver(self.order.offer(self.inflight).deliver)
        self.inflight.clear()
        while self.order.lags(len(self.store)):
            self.fill()
        for name, viewer in self.viewers.items():
            while viewer.replay is not None:
                self.replay_step(name)


ACTIONS = ["append", "announce", "repeat", "lose", "fill", "join", "resubscribe", "replay", "release"]


@given(page=st.integers(1, 4), steps=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 50)), max_size=80))
def test_every_viewer_gets_each_seq_once_in_order(page: int, steps: list[tuple[str, int]]) -> None:
    node = Node(page)
    names = ["a", "b", "c"]
    for action, pick in steps:
        name = names[pick % len(names)]
        if action == "append":
            row = Row(len(node.store) + 1)
            node.store.append(row)
            node.inflight.append(row)
        elif action in ("announce", "repeat", "lose") and node.inflight:
            item = node.inflight[pick % len(node.inflight)]
            if action != "repeat":
                node.inflight.remove(item)
            if action != "lose":
                node.deliver(node.order.offer([item]).deliver)
        elif action == "fill":
            node.fill()
        elif action == "release":
            node.deliver(node.order.release())
        elif action == "join":
            # A fresh viewer: from now on (None) or from any seq the session has.
            last_seq = None if pick % 5 == 0 else pick % (len(node.store) + 1)
            node.join(name, last_seq)
        elif action == "resubscribe" and name in node.viewers:
            node.join(name, node.viewers[name].holds)  # reconnects holding what it got
        elif action == "replay" and name in node.viewers and node.viewers[name].replay is not None:
            node.replay_step(name)
    node.settle()
    for viewer in node.viewers.values():
        assert viewer.got == list(range(viewer.start + 1, len(node.store) + 1)), (viewer.start, viewer.got)


def test_a_join_past_the_sessions_last_seq_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Node(1).join("a", 1)


# ---- status changes ---------------------------------------------------------------------------------

MOVES = {"created": ["running"], "running": ["paused", "stopped"], "paused": ["running", "stopped"], "stopped": []}


def history(choices: list[int]) -> list[dict[str, Any]]:
    """A session's transitions as `transitions()` lists them: the creation is not one."""
    status, trail = "created", []
    for n, choice in enumerate(choices, start=1):
        if not MOVES[status]:
            break
        nxt = MOVES[status][choice % len(MOVES[status])]
        trail.append(
            {"session_id": "s", "status": nxt, "previous_status": status, "updated_at": f"t{n}", "actor": "op"}
        )
        status = nxt
    return trail


@given(
    choices=st.lists(st.integers(0, 1), max_size=12),
    seen_from=st.integers(0, 12),
    fates=st.lists(st.sampled_from(["deliver", "lose", "repeat"]), max_size=12),
)
def test_every_status_change_reaches_the_trail_once_in_order(
    choices: list[int], seen_from: int, fates: list[str]
) -> None:
    changes = history(choices)
    # The feed was made when the session was in the state after `seen_from` changes (0: still created).
    seen_from = min(seen_from, len(changes))
    origin = ("created", "t0") if seen_from == 0 else (changes[seen_from - 1]["status"], f"t{seen_from}")
    trail = StatusTrail(*origin)
    delivered: list[dict[str, Any]] = []

    def check_store(upto: int) -> None:
        for update in trail.missed(changes[:upto]):
            delivered.append(update)
            trail.delivered(update)

    # A lost run that comes back to the status the trail holds (pause and resume both lost) cannot be
    # told from no loss by previous_status alone: the trail delivers the next change; the order holds.
    blind = False
    for index in range(seen_from, len(changes)):
        fate = fates[index % len(fates)] if fates else "deliver"
        if fate == "lose":
            continue
        for _ in range(2 if fate == "repeat" else 1):
            verdict = trail.judge(changes[index])
            if verdict is Verdict.DELIVER:
                expected = changes[len(delivered) + seen_from]
                blind = blind or changes[index] is not expected
                delivered.append(changes[index])
                trail.delivered(changes[index])
            elif verdict is Verdict.MISSED:
                check_store(index + 1)
    check_store(len(changes))
    positions = [changes.index(update) for update in delivered]
    assert positions == sorted(set(positions)), "a change delivered twice or out of order"
    assert delivered[-1:] == changes[seen_from:][-1:], "the current status never delivered"
    if not blind:
        assert delivered == changes[seen_from:]
