"""A group commit's per-session shares: which items are new, which seqs they take, what each request
is answered. Both implementations of the Database seam fill them the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from testpulse.domain.protocol import DetectionIn, ErrorCode, ProtocolError
from testpulse.domain.sessions import StoredDetection, first_occurrences
from testpulse.store.tables import detection_from_item


@dataclass(slots=True)
class Share:
    """One session's part of a group commit: its requests' items, in request order, and what the
    store said about them. Both implementations fill it the same way: `decide` once the stored
    ids are known (under the session's lock), then `settle` once the seq counter has moved."""

    session_id: str
    indexes: list[int]  # the requests of this session, by index
    items: list[DetectionIn]
    known: dict[str, StoredDetection] = dataclasses.field(default_factory=dict)
    fresh: list[bool] = dataclasses.field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return sorted({item.id for item in self.items if item.id is not None})

    @property
    def count(self) -> int:
        """How many seqs this share takes: its fresh items."""
        return self.fresh.count(True)

    def decide(self, known: dict[str, StoredDetection]) -> None:
        self.known = known
        self.fresh = first_occurrences([item.id for item in self.items], known)

    def fresh_items(self) -> list[DetectionIn]:
        return [item for item, new in zip(self.items, self.fresh, strict=True) if new]

    def settle(
        self,
        requests: Sequence[tuple[str, Sequence[DetectionIn]]],
        base: int | None,
        refusal: Callable[[], ProtocolError],
        now: datetime,
        outcomes: list[list[StoredDetection] | ProtocolError],
    ) -> list[StoredDetection]:
        """Fill this share's outcomes, its fresh items numbered from `base` + 1 (None: the
        session is not running, and `refusal()` says why); the stored detections to insert."""
        if base is None:
            error = refusal()
            for i in self.indexes:
                # A retry of detections already stored still learns their seqs.
                outcomes[i] = _only_known(requests[i][1], self.known) or error
            return []
        seq = base
        by_id = dict(self.known)
        answered: list[StoredDetection] = []
        inserted: list[StoredDetection] = []
        for item, new in zip(self.items, self.fresh, strict=True):
            if not new:
                assert item.id is not None
                answered.append(dataclasses.replace(by_id[item.id], duplicate=True))
                continue
            seq += 1
            stored = detection_from_item(self.session_id, seq, item, now)
            if item.id is not None:
                by_id[item.id] = stored
            answered.append(stored)
            inserted.append(stored)
        position = 0
        for i in self.indexes:
            size = len(requests[i][1])
            outcomes[i] = answered[position : position + size]
            position += size
        return inserted


def shares_of(requests: Sequence[tuple[str, Sequence[DetectionIn]]]) -> list[Share]:
    """The group's shares, in session id order: the order both implementations lock sessions in,
    so that two nodes committing overlapping groups cannot deadlock."""
    by_session: dict[str, list[int]] = {}
    for index, (session_id, _) in enumerate(requests):
        by_session.setdefault(session_id, []).append(index)
    return [
        Share(session_id, indexes, [item for i in indexes for item in requests[i][1]])
        for session_id, indexes in sorted(by_session.items())
    ]


def _only_known(items: Sequence[DetectionIn], known: dict[str, StoredDetection]) -> list[StoredDetection]:
    """The stored detections of `items` when every one of them is already stored, else []."""
    if not all(item.id is not None and item.id in known for item in items):
        return []
    return [dataclasses.replace(known[item.id], duplicate=True) for item in items if item.id is not None]


def not_running(session_id: str, status: str | None) -> ProtocolError:
    """Why an append to `session_id`, found with `status` (None: no such session), was refused."""
    if status is None:
        return ProtocolError(ErrorCode.NOT_FOUND, f"session '{session_id}' does not exist")
    return ProtocolError(ErrorCode.SESSION_NOT_RUNNING, f"session '{session_id}' is {status}, not running")
