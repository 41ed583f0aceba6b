"""What a node has told its viewers of one session's status, and what it must tell them next.

Status changes travel like detections: pub/sub is the fast path, the store is the truth. A live
`test_session_update` is delivered only when it follows the status this node last delivered (its
`previous_status` is that status); an update already delivered (a re-sent message, one that came
both live and from the store) is dropped; anything else means a change was missed on the way (a
Redis subscription that was being re-established, an outbox that overflowed), and the node reads
the session's audit log and delivers every transition after the last one it delivered, in order.

Skipped transitions are delivered one by one from the audit log, not folded into one update
naming the current status: a dashboard that counts pauses, or shows who paused and when, sees the
same history as one that never lost its link.

This module is pure: no I/O and no clock, so its decisions are unit-tested without a cluster.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

CREATED = "created"  # the status a session starts in, never the target of a transition
HISTORY_MAX = 32  # delivered updates remembered per session, to recognise late or re-sent ones


class Verdict(enum.Enum):
    DELIVER = "deliver"  # the next change: deliver it
    DUPLICATE = "duplicate"  # delivered already: drop it
    MISSED = "missed"  # something came before it that this node never delivered: read the store


def _key(update: Mapping[str, Any]) -> tuple[str, str]:
    return str(update.get("status")), str(update.get("updated_at"))


class StatusTrail:
    """The last status delivered for one session (with the time of that change), and the last
    few updates delivered, as `test_session_update` payloads."""

    __slots__ = ("_delivered", "_keys", "_origin", "status", "updated_at")

    def __init__(self, status: str, updated_at: str) -> None:
        self.status = status
        self.updated_at = updated_at
        # The state the trail started from, while every update delivered since is still remembered:
        # a member whose join read that same state needs all of them.
        self._origin: tuple[str, str] | None = (status, updated_at)
        self._delivered: deque[dict[str, Any]] = deque(maxlen=HISTORY_MAX)
        self._keys: deque[tuple[str, str]] = deque([(status, updated_at)], maxlen=HISTORY_MAX + 1)

    def judge(self, update: Mapping[str, Any]) -> Verdict:
        if _key(update) in self._keys:
            return Verdict.DUPLICATE
        if update.get("previous_status") == self.status:
            return Verdict.DELIVER
        return Verdict.MISSED

    def delivered(self, update: Mapping[str, Any]) -> None:
        """Record that `update` went out to the session's members."""
        self.status, self.updated_at = _key(update)
        if len(self._delivered) == HISTORY_MAX:
            self._origin = None
        self._delivered.append(dict(update))
        self._keys.append((self.status, self.updated_at))

    def knows(self, status: str, updated_at: str) -> bool:
        return (status, updated_at) == (self.status, self.updated_at)

    def since(self, status: str, updated_at: str) -> list[dict[str, Any]] | None:
        """The updates delivered after the change (status, updated_at), for a member that joined
        knowing that state; None when it is older than what this trail remembers."""
        if self.knows(status, updated_at):
            return []
        if (status, updated_at) == self._origin:
            return list(self._delivered)
        for index, update in enumerate(self._delivered):
            if _key(update) == (status, updated_at):
                return list(self._delivered)[index + 1 :]
        return None

    def missed(self, transitions: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """From a session's whole audit trail (as `test_session_update` payloads, oldest first),
        the updates this node has not delivered: those after the last one it did. When the trail
        does not contain that one (a session restored from a backup), only the current status."""
        trail = list(transitions)
        for index in range(len(trail) - 1, -1, -1):
            if _key(trail[index]) == (self.status, self.updated_at):
                return [dict(u) for u in trail[index + 1 :]]
        if self.status == CREATED:
            # The creation is no transition (the audit trail's first is `created -> running`): a
            # node that delivered nothing since `created` missed every one of them.
            return [dict(u) for u in trail]
        if trail and _key(trail[-1]) != (self.status, self.updated_at):
            last = dict(trail[-1])
            last["previous_status"] = self.status
            return [last]
        return []


def replay_for(transitions: Iterable[Mapping[str, Any]], since: str, current: tuple[str, str]) -> list[dict[str, Any]]:
    """What a client that last saw the change at `since` (its `updated_at`) missed, from a session's
    audit trail (oldest first), up to and including the change `current` (status, updated_at) that
    its join read; what came later reaches it live. `since` is normally a time this node sent; any
    other time picks the changes after it."""
    trail = list(transitions)
    start = next((i + 1 for i in range(len(trail) - 1, -1, -1) if trail[i].get("updated_at") == since), None)
    if start is None:
        moment = _time(since)
        start = next((i for i, u in enumerate(trail) if _time(str(u.get("updated_at"))) > moment), len(trail))
    end = next((i + 1 for i in range(len(trail) - 1, -1, -1) if _key(trail[i]) == current), len(trail))
    return [dict(u) for u in trail[start:end]]


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
