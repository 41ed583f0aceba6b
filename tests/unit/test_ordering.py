"""The feed's ordering decisions: what a node delivers, holds, drops, reads from the store and replays."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from testpulse.domain.ordering import EARLY_MAX, Filled, Ordering, Read, check_last_seq
from testpulse.domain.protocol import ErrorCode, ProtocolError

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class D:
    """A detection as far as ordering cares; `via` tells where a delivered copy came from."""

    seq: int
    via: str = "live"


def live(*seqs: int) -> list[D]:
    return [D(seq) for seq in seqs]


def stored(*seqs: int) -> list[D]:
    return [D(seq, "store") for seq in seqs]


def seqs(items: list[D]) -> list[int]:
    return [item.seq for item in items]


class Store:
    """Every acknowledged detection 1..last, read the way EventLog.since() reads."""

    def __init__(self, last: int, missing: frozenset[int] = frozenset()) -> None:
        self.last = last
        self.missing = missing

    def since(self, read: Read) -> list[D]:
        rows = [seq for seq in range(read.after_seq + 1, self.last + 1) if seq not in self.missing]
        return stored(*rows[: read.limit])


# ---- live delivery -----------------------------------------------------------------------------


def test_detections_in_order_are_delivered_at_once() -> None:
    order: Ordering[D] = Ordering(0)
    offered = order.offer(live(1, 2, 3))
    assert seqs(offered.deliver) == [1, 2, 3]
    assert not offered.gap
    assert order.cursor == 3


def test_a_feed_starts_after_the_seq_the_session_had() -> None:
    order: Ordering[D] = Ordering(41)
    assert seqs(order.offer(live(42)).deliver) == [42]


def test_an_early_detection_waits_for_the_ones_before_it() -> None:
    order: Ordering[D] = Ordering(0)
    first = order.offer(live(3))
    assert first.deliver == [] and first.gap
    second = order.offer(live(1))
    assert seqs(second.deliver) == [1] and second.gap
    third = order.offer(live(2))
    assert seqs(third.deliver) == [2, 3] and not third.gap


def test_a_batch_out_of_order_is_delivered_in_seq_order() -> None:
    order: Ordering[D] = Ordering(0)
    assert seqs(order.offer(live(2, 4, 3, 1)).deliver) == [1, 2, 3, 4]


def test_duplicates_are_delivered_once() -> None:
    order: Ordering[D] = Ordering(0)
    assert seqs(order.offer(live(1, 1, 2, 2)).deliver) == [1, 2]
    assert order.offer(live(2)).deliver == []


def test_an_early_detection_repeated_while_held_is_delivered_once() -> None:
    order: Ordering[D] = Ordering(0)
    order.offer(live(2, 2))
    order.offer(live(2))
    assert seqs(order.offer(live(1)).deliver) == [1, 2]
    assert order.held == 0


def test_stale_detections_are_dropped_and_not_held() -> None:
    order: Ordering[D] = Ordering(5)
    offered = order.offer(live(3, 5))
    assert offered.deliver == [] and not offered.gap
    assert order.held == 0


def test_release_delivers_what_a_late_message_unblocked_meanwhile() -> None:
    order: Ordering[D] = Ordering(0)
    order.offer(live(2, 3))
    order.offer(live(1))  # delivers 1..3 itself
    assert order.release() == []
    assert not order.gap


def test_the_early_buffer_is_bounded_and_the_store_fills_past_it() -> None:
    order: Ordering[D] = Ordering(0, early_max=3)
    offered = order.offer(live(2, 3, 4, 5, 6))
    assert offered.gap and order.held == 3  # 5 and 6 are left to the store
    assert seqs(order.offer(live(1)).deliver) == [1, 2, 3, 4]
    assert not order.gap  # nothing held: a later detection or the idle sweep finds 5 and 6
    assert order.offer(live(7)).gap
    read = order.gap_read(100)
    filled = order.fill(Store(7).since(read), read)
    assert seqs(filled.deliver) == [5, 6, 7]
    assert [item.via for item in filled.deliver] == ["store", "store", "store"]


def test_the_default_bound_holds_ten_thousand() -> None:
    order: Ordering[D] = Ordering(0)
    order.offer(live(*range(2, EARLY_MAX + 10)))
    assert order.held == EARLY_MAX == 10_000


# ---- gaps and the store ------------------------------------------------------------------------


def test_a_gap_asks_for_the_rows_after_the_cursor() -> None:
    order: Ordering[D] = Ordering(0)
    offered = order.offer(live(1, 3, 4))
    assert seqs(offered.deliver) == [1] and offered.gap
    assert order.gap_read(100) == Read(after_seq=1, limit=100)


def test_a_fill_delivers_the_missing_rows_then_the_held_ones_once() -> None:
    order: Ordering[D] = Ordering(0)
    order.offer(live(1, 3, 4))
    read = order.gap_read(100)
    filled = order.fill(stored(2), read)
    assert filled == Filled([D(2, "store"), D(3), D(4)], from_store=1, more=False)
    assert order.cursor == 4 and not order.gap


def test_rows_the_store_returns_for_held_detections_are_delivered_once() -> None:
    order: Ordering[D] = Ordering(0)
    order.offer(live(1, 3, 4))
    read = order.gap_read(100)
    filled = order.fill(Store(4).since(read), read)
    assert seqs(filled.deliver) == [2, 3, 4] and filled.from_store == 3
    assert order.held == 0


def test_a_page_with_a_hole_delivers_up_to_the_hole_and_asks_again() -> None:
    order: Ordering[D] = Ordering(2)
    order.offer(live(7))
    read = order.gap_read(10)
    filled = order.fill(stored(3, 4, 6), read)
    assert seqs(filled.deliver) == [3, 4]
    assert filled.more and order.gap  # 5 is still missing, and 6 is not delivered past it
    assert order.gap_read(10) == Read(4, 10)
    again = order.fill(stored(5, 6, 7), order.gap_read(10))
    assert seqs(again.deliver) == [5, 6, 7] and not again.more


def test_a_full_page_asks_for_the_next_one() -> None:
    order: Ordering[D] = Ordering(0)
    read = order.gap_read(2)
    filled = order.fill(Store(5).since(read), read)
    assert seqs(filled.deliver) == [1, 2] and filled.more
    read = order.gap_read(2)
    assert read == Read(2, 2)


def test_a_fill_read_before_the_cursor_moved_skips_what_was_delivered_meanwhile() -> None:
    order: Ordering[D] = Ordering(0)
    order.offer(live(1, 3))
    read = order.gap_read(100)
    order.offer(live(2))  # the late message arrives while the store is read
    filled = order.fill(Store(4).since(read), read)
    assert seqs(filled.deliver) == [4] and filled.from_store == 1


def test_the_store_ahead_of_the_feed_is_a_lag() -> None:
    order: Ordering[D] = Ordering(3)
    assert order.lags(4)
    assert not order.lags(3)


# ---- joining members ---------------------------------------------------------------------------


def test_a_replay_reads_page_by_page_up_to_the_cursor() -> None:
    order: Ordering[D] = Ordering(5)
    replay = order.replay(0)
    store = Store(8)  # the store has more than this node delivered: the replay stops at the cursor
    reads = []
    pages = []
    while (read := replay.next_read(2)) is not None:
        reads.append(read)
        pages.append(seqs(replay.take(store.since(read))))
    assert reads == [Read(0, 2), Read(2, 2), Read(4, 1)]
    assert pages == [[1, 2], [3, 4], [5]]
    assert replay.position == 5


def test_a_replay_follows_a_cursor_that_moves_between_pages() -> None:
    order: Ordering[D] = Ordering(3)
    replay = order.replay(0)
    store = Store(6)
    read = replay.next_read(100)
    assert read == Read(0, 3)
    assert seqs(replay.take(store.since(read))) == [1, 2, 3]
    order.offer(live(4, 5, 6))
    read = replay.next_read(100)
    assert read == Read(3, 3)
    assert seqs(replay.take(store.since(read))) == [4, 5, 6]
    assert replay.next_read(100) is None


def test_a_member_without_last_seq_replays_nothing() -> None:
    order: Ordering[D] = Ordering(9)
    replay = order.replay(None)
    assert replay.next_read(100) is None
    assert replay.position == 9


def test_a_replay_page_that_reads_no_rows_is_an_error_not_a_silent_gap() -> None:
    order: Ordering[D] = Ordering(5)
    replay = order.replay(2)
    read = replay.next_read(100)
    assert read is not None
    with pytest.raises(ProtocolError) as raised:
        replay.take([])
    assert raised.value.code is ErrorCode.UNAVAILABLE
    assert "seq 3" in raised.value.message
    assert replay.position == 2


def test_a_replay_page_that_starts_past_the_position_is_an_error() -> None:
    # The store lost seq 3 (a lagging replica): rows 4 and 5 must not be sent past the hole.
    order: Ordering[D] = Ordering(5)
    replay = order.replay(2)
    read = replay.next_read(100)
    assert read is not None
    with pytest.raises(ProtocolError) as raised:
        replay.take(Store(5, missing=frozenset({3})).since(read))
    assert raised.value.code is ErrorCode.UNAVAILABLE


def test_a_replay_page_with_a_hole_sends_up_to_it_and_rereads_from_there() -> None:
    order: Ordering[D] = Ordering(6)
    replay = order.replay(2)
    assert seqs(replay.take(stored(3, 5, 6))) == [3]
    assert replay.next_read(100) == Read(3, 3)


def test_a_member_that_joins_ahead_of_the_cursor_is_not_sent_what_it_holds() -> None:
    # The store has 5 while this node delivered up to 3: the member replays nothing, goes live
    # holding 5, and of what the catch-up then delivers gets only 6.
    order: Ordering[D] = Ordering(3)
    check_last_seq(5, 5)
    replay = order.replay(5)
    assert replay.next_read(100) is None
    order.joined("ahead", replay.position)
    order.joined("current", 3)
    read = order.gap_read(100)
    delivered = order.fill(Store(6).since(read), read).deliver
    sent_to_ahead = [item.seq for item in delivered if "ahead" not in order.holding(item.seq)]
    assert seqs(delivered) == [4, 5, 6]
    assert sent_to_ahead == [6]


def test_an_ahead_floor_is_forgotten_once_passed_and_with_the_member() -> None:
    order: Ordering[D] = Ordering(3)
    order.joined("a", 5)
    order.joined("b", 4)
    assert order.holding(4) == {"a", "b"}
    assert order.holding(5) == {"a"}  # b's floor passed: b gets everything from here on
    assert order.holding(6) == set()
    order.joined("c", 8)
    order.forget("c")
    assert order.holding(7) == set()


def test_a_member_at_or_behind_the_cursor_has_no_floor() -> None:
    order: Ordering[D] = Ordering(3)
    order.joined("a", 3)
    assert order.holding(3) == set()


def test_a_batch_member_holds_the_open_window_up_to_the_cursor() -> None:
    order: Ordering[D] = Ordering(4)
    assert order.replay(2).batch_floor() == 4  # replayed to 4 after its pages, or the window has it
    assert Ordering[D](4).replay(6).batch_floor() == 6


def test_a_last_seq_beyond_the_session_is_insufficient_state() -> None:
    check_last_seq(None, 0)
    check_last_seq(0, 0)
    check_last_seq(7, 7)
    with pytest.raises(ProtocolError) as raised:
        check_last_seq(8, 7)
    assert raised.value.code is ErrorCode.INSUFFICIENT_STATE
    assert "last_seq: 8" in raised.value.message


# ---- any interleaving --------------------------------------------------------------------------


def announcements(rng: random.Random, last: int) -> list[D]:
    """Pub/sub's view of seqs 1..last: some lost, some repeated, all shuffled within a window."""
    sent: list[D] = []
    for seq in range(1, last + 1):
        copies = rng.choices([0, 1, 2, 3], weights=[2, 6, 2, 1])[0]
        sent.extend(D(seq) for _ in range(copies))
    # A message may overtake those sent shortly before it, as across nodes and resubscribes.
    keyed = [(index + rng.uniform(0, rng.choice([1, 5, 40])), item) for index, item in enumerate(sent)]
    return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]


def batches(rng: random.Random, items: list[D]) -> list[list[D]]:
    chunks: list[list[D]] = []
    while items:
        size = rng.randint(1, 6)
        chunks.append(items[:size])
        items = items[size:]
    return chunks


@pytest.mark.parametrize("seed", range(300))
def test_any_interleaving_with_fills_from_a_complete_store_delivers_every_seq_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    last = rng.randint(0, 80)
    store = Store(last)
    order: Ordering[D] = Ordering(0, early_max=rng.choice([1, 3, 10, EARLY_MAX]))
    delivered: list[D] = []
    pending_read: Read | None = None  # a store read in flight while live messages go on
    for batch in batches(rng, announcements(rng, last)):
        offered = order.offer(batch)
        delivered += offered.deliver
        action = rng.random()
        if action < 0.15:
            delivered += order.release()
        elif action < 0.35 and offered.gap:
            pending_read = order.gap_read(rng.randint(1, 10))
        elif action < 0.5 and pending_read is not None:
            delivered += order.fill(store.since(pending_read), pending_read).deliver
            pending_read = None
        assert seqs(delivered) == list(range(1, order.cursor + 1))
    if pending_read is not None:
        delivered += order.fill(store.since(pending_read), pending_read).deliver
    # What the idle sweep or a later catch-up does: read until a page says there is no more.
    page = rng.randint(1, 10)
    while True:
        read = order.gap_read(page)
        filled = order.fill(store.since(read), read)
        delivered += filled.deliver
        if not filled.more:
            break
    assert seqs(delivered) == list(range(1, last + 1))
    assert not order.gap


@pytest.mark.parametrize("seed", range(200))
def test_a_member_joining_at_any_point_gets_every_seq_after_its_last_seq_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    last = rng.randint(1, 60)
    store = Store(last)
    order: Ordering[D] = Ordering(rng.randint(0, last))
    batch_member = rng.random() < 0.5
    last_seq = rng.randint(0, last)
    check_last_seq(last_seq, store.last)
    live_batches = batches(rng, announcements(rng, last))
    replay = order.replay(last_seq)
    received: list[D] = []
    page = rng.randint(1, 7)
    # The replay awaits the store between pages, so live messages advance the cursor meanwhile.
    while (read := replay.next_read(page)) is not None:
        received += replay.take(store.since(read))
        for _ in range(rng.randint(0, 2)):
            if live_batches:
                order.offer(live_batches.pop(0))
    floor = replay.batch_floor()
    if not batch_member:
        order.joined("m", replay.position)

    def send(items: list[D]) -> None:
        for item in items:
            if batch_member:
                if item.seq > floor:
                    received.append(item)
            elif "m" not in order.holding(item.seq):
                received.append(item)

    for batch in live_batches:
        send(order.offer(batch).deliver)
    while True:
        read = order.gap_read(page)
        filled = order.fill(store.since(read), read)
        send(filled.deliver)
        if not filled.more:
            break
    assert seqs(received) == list(range(last_seq + 1, last + 1))
