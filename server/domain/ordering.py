"""The order in which one node delivers a session's detections: seq by seq, each exactly once.

A feed's cursor is the last seq delivered to its live members. A live detection (announced over
pub/sub, which may lose, repeat or reorder it) is delivered only when it is next after the cursor;
an early one is held, and a hole that does not close by itself is filled from the store, which
holds every acknowledged detection. A joining member replays from the seq it holds up to the
cursor, page by page, and then goes live; one that holds seqs beyond the cursor is not sent them
again.

This module is pure: no I/O, no clock, no tasks. server/realtime/feeds.py reads the store, waits and
writes to sockets around it, so every ordering decision here is unit-tested by feeding it events.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

from testpulse.domain.protocol import ErrorCode, ProtocolError

EARLY_MAX = 10_000  # out-of-order detections held per feed before relying on the store alone


class Sequenced(Protocol):
    @property
    def seq(self) -> int: ...


T = TypeVar("T", bound=Sequenced)

_NOBODY: frozenset[str] = frozenset()


class Read(NamedTuple):
    """A store read to make: the rows after `after_seq`, at most `limit` of them, in seq order."""

    after_seq: int
    limit: int


@dataclass(frozen=True, slots=True)
class Offered(Generic[T]):
    deliver: list[T]  # next after the cursor, in seq order; the cursor is already past them
    gap: bool  # detections wait beyond a hole: fill it from the store unless it closes soon


@dataclass(frozen=True, slots=True)
class Filled(Generic[T]):
    deliver: list[T]  # in seq order: the store's rows that were next, then held ones they unblocked
    from_store: int  # how many of `deliver` the store supplied
    more: bool  # the page was full, or a hole remains: read again


def check_last_seq(last_seq: int | None, session_last_seq: int) -> None:
    """A member cannot hold a seq the session never had (its store was restored from a backup,
    or it joined another deployment): it must discard what it holds and start over."""
    if last_seq is not None and last_seq > session_last_seq:
        raise ProtocolError(
            ErrorCode.INSUFFICIENT_STATE,
            f"last_seq: {last_seq} is beyond the session's last seq {session_last_seq};"
            " discard what you hold and rejoin with last_seq 0",
        )


class Ordering(Generic[T]):
    """The cursor, the early buffer and the members that joined ahead of the cursor, for one
    session on one node. Guarantee: what offer(), release() and fill() return, concatenated,
    is cursor+1, cursor+2, ... with no seq missing or repeated, whatever they are fed."""

    __slots__ = ("_ahead", "_early", "_early_max", "cursor")

    def __init__(self, cursor: int, early_max: int = EARLY_MAX) -> None:
        self.cursor = cursor
        self._early: dict[int, T] = {}
        self._early_max = early_max
        self._ahead: dict[str, int] = {}  # member -> seq it already holds, beyond the cursor when it joined

    # ---- live detections -----------------------------------------------------------------------

    @property
    def gap(self) -> bool:
        """Detections are held behind a hole that only the store (or a late message) can fill."""
        return bool(self._early)

    @property
    def held(self) -> int:
        return len(self._early)

    def offer(self, items: Iterable[T]) -> Offered[T]:
        """Take live detections in any order, repeated or not; stale and repeated ones are dropped,
        and early ones are held while the buffer has room (past that, the store alone fills in)."""
        deliver: list[T] = []
        for item in items:
            if item.seq == self.cursor + 1:
                self.cursor = item.seq
                deliver.append(item)
            elif item.seq > self.cursor and len(self._early) < self._early_max:
                self._early[item.seq] = item
        self._release_into(deliver)
        return Offered(deliver, self.gap)

    def release(self) -> list[T]:
        """Held detections that now follow the cursor (a late message may have closed the hole)."""
        deliver: list[T] = []
        self._release_into(deliver)
        return deliver

    def _release_into(self, deliver: list[T]) -> None:
        early = self._early
        while early:
            item = early.pop(self.cursor + 1, None)
            if item is None:
                for seq in [seq for seq in early if seq <= self.cursor]:
                    del early[seq]
                return
            self.cursor = item.seq
            deliver.append(item)

    # ---- filling from the store ----------------------------------------------------------------

    def lags(self, store_last_seq: int) -> bool:
        """The store holds detections this node was never told of."""
        return store_last_seq > self.cursor

    def gap_read(self, page: int) -> Read:
        return Read(self.cursor, page)

    def fill(self, rows: Sequence[T], read: Read) -> Filled[T]:
        """Apply a page the store returned for `read`. Only rows that follow the cursor without a
        hole count: the cursor may have moved on while the store was read, and a store that lacks
        a row (a lagging replica) must not make this node skip it."""
        deliver: list[T] = []
        for row in rows:
            if row.seq == self.cursor + 1:
                self.cursor = row.seq
                deliver.append(row)
        from_store = len(deliver)
        self._release_into(deliver)
        return Filled(deliver, from_store, len(rows) >= read.limit or self.gap)

    # ---- joining members -----------------------------------------------------------------------

    def replay(self, last_seq: int | None) -> Replay[T]:
        """The replay of a member that holds everything up to `last_seq` (None: it wants only what
        comes from now on)."""
        return Replay(self, self.cursor if last_seq is None else last_seq)

    def joined(self, member: str, holds: int) -> None:
        """`member` goes live holding every seq up to `holds`; any beyond the cursor it must not get twice."""
        if holds > self.cursor:
            self._ahead[member] = holds

    def holding(self, seq: int) -> frozenset[str] | set[str]:
        """The live members not to send `seq` to: they held it when they joined. A member whose
        floor `seq` passes gets everything from here on."""
        if not self._ahead:
            return _NOBODY
        holding: set[str] = set()
        for member, floor in list(self._ahead.items()):
            if seq <= floor:
                holding.add(member)
            else:
                del self._ahead[member]
        return holding

    def forget(self, member: str) -> None:
        self._ahead.pop(member, None)


class Replay(Generic[T]):
    """One joining member's way from the seq it holds to the feed's cursor, which may move on
    while the pages are read. The member goes live at `position` once next_read() is None."""

    __slots__ = ("_order", "position")

    def __init__(self, order: Ordering[T], position: int) -> None:
        self._order = order
        self.position = position

    def next_read(self, page: int) -> Read | None:
        """The next page to read from the store; None when the member has caught up with the cursor."""
        cursor = self._order.cursor
        if self.position >= cursor:
            return None
        return Read(self.position, min(page, cursor - self.position))

    def take(self, rows: Sequence[T]) -> list[T]:
        """The rows to send the member: those that follow its position without a hole. A page
        that does not advance means the store lacks what this node delivered (a lagging replica,
        a restore): going live then would leave the member a gap it never hears of."""
        page: list[T] = []
        for row in rows:
            if row.seq == self.position + 1:
                page.append(row)
                self.position = row.seq
        if not page:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, f"replay could not read seq {self.position + 1} from the store; retry"
            )
        return page

    def batch_floor(self) -> int:
        """For a member that gets batches: the seq it holds once live, counting the open window,
        which holds detections up to the cursor."""
        return max(self.position, self._order.cursor)
