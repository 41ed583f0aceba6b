"""Who is watching each session, on every node: local tracking, coalesced `presence_update`s, `get_presence`.

What counts: every connection that joined a session (join_session, or start_test_session's
caller), grouped by its token's `sub`; a `sub` counts once per session however many connections
it has, on however many nodes. A `sub`'s role is the highest of its connections' roles.

The shared state (PresenceBoard; server/bus/presence.py on Redis) is, per session, one entry per
node process holding that process's members `{sub: [role, connections]}`, plus one heartbeat per
process that expires by itself. Why this shape:

- one entry per node process, not per connection or per sub: a node only ever rewrites its own
  entry, so nodes never contend and need no transactions; a join storm of N clients on one node
  costs one write per session per write batch (every 500 ms), not N; one read gives a session.
- per process, not per node id: a node restarted under the same id after a SIGKILL must not
  bring its previous life's members back.
- a heartbeat per process instead of an expiry per entry: one write a second covers every session
  the node holds, and Redis expires it by its own clock (no clock skew between nodes). Readers
  ignore (and delete) the entries of a process whose heartbeat is gone, and every node re-reads
  its watched sessions every 5 s, so a SIGKILLed node's members leave within about 16 s.
- re-assertion: the heartbeat also tells whether it was still there. When it was not (Redis
  restarted or was flushed, or this node could not reach it for the heartbeat's lifetime), the
  node writes every entry it holds again, and holds its own updates a few seconds so that the
  other nodes re-assert first and viewers are not told that everyone left and came back.

Change notifications: after a batch write the board announces each changed session to the other
nodes (a message on the session's room channel, heard only by nodes with members there); those
nodes re-read the session at its next update round.

Coalescing: a node sends a session's `presence_update`s in rounds, at most one round a second:
the distinct subs now against those of the node's previous round, to every opted-in local member.
A connection that has just opted in gets at its first round the whole set as `joined` (its
baseline; it includes itself); later rounds carry the changes. So 2,000 clients joining within a
second cost each opted-in member one frame, not 2,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from testpulse import metrics
from testpulse.domain.protocol import PRESENCE_MEMBERS_MAX, ErrorCode, ProtocolError

log = logging.getLogger("testpulse.domain.presence")

Members = dict[str, tuple[str, int]]
"""One node's (or the merged) members of a session: sub -> (role, connections)."""

ROLE_RANK = {"viewer": 0, "detector": 1, "operator": 2, "admin": 3}
WRITE_INTERVAL_SECONDS = 0.5  # a node's writes (and its change announcements) are batched this often
UPDATE_INTERVAL_SECONDS = 1.0  # at most one presence_update round per session this often
HEARTBEAT_INTERVAL_SECONDS = 1.0
RECHECK_INTERVAL_SECONDS = 5.0  # watched sessions are re-read this often: how dead nodes are noticed
SETTLE_SECONDS = 3.0  # after re-asserting, how long a node waits for the others to re-assert


class PresenceBoard(Protocol):
    """Where the nodes of a cluster share their members.

    write() replaces this node's entry of each session given (an empty Members removes it) and
    then announces those sessions to the other nodes. read() returns, per session, the entries of
    the *other* nodes that are alive (the caller has its own, fresher). heartbeat() keeps this
    node's entries alive; it returns False when the board had lost them (every entry must then be
    written again). Each raises when the board cannot be reached; nothing is half applied that a
    later write would not repair."""

    async def write(self, entries: dict[str, Members]) -> None: ...

    async def read(self, session_ids: list[str]) -> dict[str, list[Members]]: ...

    async def heartbeat(self) -> bool: ...

    async def withdraw(self, session_ids: list[str]) -> None: ...


class LocalBoard:
    """A single node without Redis: there are no other nodes to share with."""

    async def write(self, entries: dict[str, Members]) -> None:
        return None

    async def read(self, session_ids: list[str]) -> dict[str, list[Members]]:
        return {session_id: [] for session_id in session_ids}

    async def heartbeat(self) -> bool:
        return True

    async def withdraw(self, session_ids: list[str]) -> None:
        return None


@dataclass(slots=True)
class Seat:
    """One connection's place in one session."""

    sub: str
    role: str
    wants_updates: bool


@dataclass(slots=True)
class Round:
    """A session's presence_update rounds on this node (exists while it has opted-in members here)."""

    watchers: set[str] = field(default_factory=set)  # opted-in sids
    fresh: set[str] = field(default_factory=set)  # opted in since the last round: they get the whole set
    announced: dict[str, str] = field(default_factory=dict)  # sub -> role, as of the last round
    next_at: float = 0.0


def merge(entries: Iterable[Members]) -> Members:
    """Several nodes' members as one: connections add up, the highest role wins."""
    merged: Members = {}
    for members in entries:
        for sub, (role, connections) in members.items():
            held = merged.get(sub)
            if held is None:
                merged[sub] = (role, connections)
            else:
                best = role if ROLE_RANK.get(role, -1) > ROLE_RANK.get(held[0], -1) else held[0]
                merged[sub] = (best, held[1] + connections)
    return merged


def change(before: dict[str, str], now: Members) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(joined, left) between the subs of a previous round and now, each sorted by sub."""
    joined = [{"sub": sub, "role": now[sub][0]} for sub in sorted(now.keys() - before.keys())]
    left = [{"sub": sub, "role": before[sub]} for sub in sorted(before.keys() - now.keys())]
    return joined, left


def view(session_id: str, members: Members, limit: int = PRESENCE_MEMBERS_MAX) -> dict[str, Any]:
    """The contract's `presence` object: members sorted by sub, at most `limit` of them."""
    subs = sorted(members)
    return {
        "session_id": session_id,
        "count": len(subs),
        "members": [{"sub": s, "role": members[s][0], "connections": members[s][1]} for s in subs[:limit]],
        "truncated": len(subs) > limit,
    }


SendMany = Callable[[list[str], str, dict[str, Any]], int]


class Presence:
    """This node's side of presence: whom it holds, what it wrote, whom it told what."""

    def __init__(
        self, board: PresenceBoard, send_many: SendMany, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._board = board
        self._send_many = send_many
        self._clock = clock
        self._seats: dict[str, dict[str, Seat]] = {}  # session id -> sid -> seat
        self._sessions_of: dict[str, set[str]] = {}  # sid -> session ids it is seated in
        self._unwritten: set[str] = set()  # sessions whose local members changed since the last write
        self._dirty: set[str] = set()  # sessions to re-read at their next round
        self._rounds: dict[str, Round] = {}
        self._beaten = False  # a heartbeat has succeeded once: a later loss means the board lost us
        self._hold_until = 0.0

    # ---- membership (synchronous: the join path pays a dict update, nothing more) -------------

    def join(self, sid: str, session_id: str, sub: str, role: str, wants_updates: bool) -> None:
        seats = self._seats.setdefault(session_id, {})
        old = seats.get(sid)
        seats[sid] = Seat(sub, role, wants_updates)
        self._sessions_of.setdefault(sid, set()).add(session_id)
        if old is None or old.sub != sub or old.role != role:
            self._changed(session_id)
        if wants_updates and (old is None or not old.wants_updates):
            self._rounds.setdefault(session_id, Round()).watchers.add(sid)
            self._rounds[session_id].fresh.add(sid)
            self._dirty.add(session_id)
        elif not wants_updates and old is not None and old.wants_updates:
            self._unwatch(sid, session_id)

    def leave(self, sid: str, session_id: str) -> None:
        seats = self._seats.get(session_id)
        if seats is None or seats.pop(sid, None) is None:
            return
        if not seats:
            del self._seats[session_id]
        sessions = self._sessions_of.get(sid)
        if sessions is not None:
            sessions.discard(session_id)
            if not sessions:
                del self._sessions_of[sid]
        self._unwatch(sid, session_id)
        self._changed(session_id)

    def detach(self, sid: str) -> None:
        for session_id in list(self._sessions_of.get(sid, ())):
            self.leave(sid, session_id)

    def change_role(self, sid: str, role: str) -> None:
        """A refreshed token's role applies to the sessions the connection stays in."""
        for session_id in self._sessions_of.get(sid, ()):
            seat = self._seats[session_id][sid]
            if seat.role != role:
                seat.role = role
                self._changed(session_id)

    def remote_changed(self, session_id: str) -> None:
        """Another node announced a change of `session_id`."""
        if session_id in self._rounds:
            self._dirty.add(session_id)

    def _changed(self, session_id: str) -> None:
        self._unwritten.add(session_id)
        if session_id in self._rounds:
            self._dirty.add(session_id)

    def _unwatch(self, sid: str, session_id: str) -> None:
        state = self._rounds.get(session_id)
        if state is None:
            return
        state.watchers.discard(sid)
        state.fresh.discard(sid)
        if not state.watchers:
            del self._rounds[session_id]
            self._dirty.discard(session_id)

    def local(self, session_id: str) -> Members:
        members: dict[str, tuple[str, int]] = {}
        for seat in self._seats.get(session_id, {}).values():
            held = members.get(seat.sub)
            if held is None:
                members[seat.sub] = (seat.role, 1)
            else:
                best = seat.role if ROLE_RANK.get(seat.role, -1) > ROLE_RANK.get(held[0], -1) else held[0]
                members[seat.sub] = (best, held[1] + 1)
        return members

    def member_count(self) -> int:
        """Distinct (session, sub) pairs this node holds: the per-node members gauge."""
        return sum(len({seat.sub for seat in seats.values()}) for seats in self._seats.values())

    # ---- reading -----------------------------------------------------------------------------

    async def snapshot(self, session_id: str) -> dict[str, Any]:
        """The contract's `presence` object, cluster-wide. Raises when the board cannot be read."""
        remote = await self._board.read([session_id])
        return view(session_id, merge([self.local(session_id), *remote.get(session_id, [])]))

    async def answer(self, session_id: str) -> dict[str, Any]:
        """get_presence's `presence`; `unavailable` while the board cannot be read."""
        try:
            return await self.snapshot(session_id)
        except Exception as exc:  # noqa: BLE001 - whatever the board raised, the client is told to retry
            log.warning("reading presence of %s failed: %s: %s", session_id, type(exc).__name__, exc)
            raise ProtocolError(ErrorCode.UNAVAILABLE, "presence cannot be read right now; retry later") from None

    # ---- the background work -----------------------------------------------------------------

    async def run_forever(self) -> None:
        """Heartbeat, batched writes and update rounds, each step on its own schedule; a failing
        board delays them and loses nothing (unwritten sessions stay unwritten until it answers)."""
        next_heartbeat = next_recheck = 0.0
        while True:
            await asyncio.sleep(WRITE_INTERVAL_SECONDS)
            now = self._clock()
            if now >= next_heartbeat:
                next_heartbeat = now + HEARTBEAT_INTERVAL_SECONDS
                await self._guarded("heartbeat", self._heartbeat())
            if now >= next_recheck:
                next_recheck = now + RECHECK_INTERVAL_SECONDS
                self._dirty |= self._rounds.keys()
            await self._guarded("write", self.write_now())
            await self._guarded("update round", self.announce_due(self._clock()))

    async def _guarded(self, what: str, step: Any) -> None:
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the board is away: try again at the next tick
            log.debug("presence %s failed: %s: %s", what, type(exc).__name__, exc)

    async def _heartbeat(self) -> None:
        kept = await self._board.heartbeat()
        if not kept:
            self._unwritten |= self._seats.keys()
            if self._beaten:
                log.warning("the presence board lost this node's entries (Redis restarted?); re-asserting them")
                self._hold_until = self._clock() + SETTLE_SECONDS
        self._beaten = True

    async def write_now(self) -> None:
        if not self._unwritten:
            return
        sessions, self._unwritten = self._unwritten, set()
        try:
            await self._board.write({session_id: self.local(session_id) for session_id in sessions})
        except BaseException:
            self._unwritten |= sessions
            raise

    async def announce_due(self, now: float) -> None:
        """One update round for every dirty session whose round is due."""
        if now < self._hold_until:
            return
        due = [s for s in self._dirty if s in self._rounds and now >= self._rounds[s].next_at]
        self._dirty &= self._rounds.keys()
        if not due:
            return
        remote = await self._board.read(due)
        self._dirty.difference_update(due)
        for session_id in due:
            state = self._rounds.get(session_id)
            if state is not None:  # its last watcher may have left during the read
                self._round(session_id, state, merge([self.local(session_id), *remote.get(session_id, [])]), now)

    def _round(self, session_id: str, state: Round, members: Members, now: float) -> None:
        sent = 0
        established = [sid for sid in state.watchers if sid not in state.fresh]
        joined, left = change(state.announced, members)
        if established and (joined or left):
            payload = {"session_id": session_id, "count": len(members), "joined": joined, "left": left}
            sent += self._send_many(established, "presence_update", payload)
        if state.fresh:
            everyone, _ = change({}, members)
            payload = {"session_id": session_id, "count": len(members), "joined": everyone, "left": []}
            sent += self._send_many(list(state.fresh), "presence_update", payload)
            state.fresh.clear()
        state.announced = {sub: role for sub, (role, _) in members.items()}
        if sent:
            metrics.PRESENCE_UPDATES.inc(sent)
            state.next_at = now + UPDATE_INTERVAL_SECONDS

    async def close(self) -> None:
        """Take this node's members off the board now, so the others need not wait for the heartbeat."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._board.withdraw(list(self._seats))
