"""Deadlines: which keys' time has come, from a heap instead of a visit to every key.

A periodic pass over a node's connections (the token expiry check) costs in proportion to the
connections held, every second, idle or not. Here it costs in proportion to what falls due.
A key holds at most one deadline: setting it again replaces the old one, which stays in the heap
and is skipped when popped. The heap is rebuilt when skipped entries outnumber the live ones, so
keys that come and go (clients reconnecting with day-long tokens) cost nothing after they leave.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_SLACK = 64  # stale entries always allowed before a rebuild: a small heap is not worth rebuilding


class Deadlines(Generic[K]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        self._serial = 0  # orders equal times and tells a key's live entry from its replaced ones

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def set(self, key: K, when: float) -> None:
        self._serial += 1
        self._live[key] = (when, self._serial)
        heapq.heappush(self._heap, (when, self._serial, key))
        self._compact_if_stale()

    def forget(self, key: K) -> None:
        if self._live.pop(key, None) is not None:
            self._compact_if_stale()

    def pop_due(self, now: float) -> list[K]:
        """The keys whose deadline is at or before `now`, earliest first; they hold none after."""
        heap, live, due = self._heap, self._live, []
        while heap and heap[0][0] <= now:
            when, serial, key = heapq.heappop(heap)
            if live.get(key) == (when, serial):
                del live[key]
                due.append(key)
        return due

    def _compact_if_stale(self) -> None:
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._heap = [(when, serial, key) for key, (when, serial) in self._live.items()]
            heapq.heapify(self._heap)
