"""The domain: session state machine, detections and their seq; no socket.io, Starlette or SQL here."""

from __future__ import annotations

import enum
import secrets
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from testpulse.domain.auth import Action, Principal
from testpulse.domain.protocol import (
    DetectionIn,
    ErrorCode,
    ProtocolError,
    PublishRequest,
    StartRequest,
)


class Status(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Verb(enum.StrEnum):
    """A control action; each moves a session along its own arrows only (resuming a created
    session or starting a paused one is an invalid transition, not a synonym)."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


MOVES: dict[Verb, tuple[frozenset[Status], Status]] = {
    Verb.START: (frozenset({Status.CREATED}), Status.RUNNING),
    Verb.PAUSE: (frozenset({Status.RUNNING}), Status.PAUSED),
    Verb.RESUME: (frozenset({Status.PAUSED}), Status.RUNNING),
    Verb.STOP: (frozenset({Status.RUNNING, Status.PAUSED}), Status.STOPPED),
}

# Derived views of MOVES: which statuses follow which, and the verb of each arrow (for the audit).
ALLOWED: dict[Status, frozenset[Status]] = {
    status: frozenset(target for sources, target in MOVES.values() if status in sources) for status in Status
}
ACTIONS: dict[tuple[Status, Status], str] = {
    (source, target): verb.value for verb, (sources, target) in MOVES.items() for source in sources
}


def iso(moment: datetime) -> str:
    if moment.tzinfo is not UTC:  # everything the node makes is already UTC; skip the conversion
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    name: str
    status: Status
    created_at: datetime
    updated_at: datetime
    last_seq: int
    config: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "last_seq": self.last_seq,
            "config": self.config,
        }


@dataclass(frozen=True, slots=True)
class StoredDetection:
    session_id: str
    seq: int
    label: str
    confidence: float
    bbox: list[float] | None
    frame: int | None
    ts: float | None
    attributes: dict[str, Any] | None
    received_at: datetime
    id: str | None = None
    # Set on what append() returns for an item whose id was already stored (before, or earlier in
    # the same request): the stored detection, which is not stored or emitted again.
    duplicate: bool = False

    def event(self) -> dict[str, Any]:
        """The `detection_event` payload."""
        return {
            "session_id": self.session_id,
            "seq": self.seq,
            "id": self.id,
            "label": self.label,
            "confidence": self.confidence,
            "bbox": self.bbox,
            "frame": self.frame,
            "ts": self.ts,
            "attributes": self.attributes,
            "received_at": iso(self.received_at),
        }


def publish_ack(stored: Sequence[StoredDetection]) -> dict[str, Any]:
    """The success ack of `publish_detection` (one item): `duplicate` only when it was stored before."""
    return {"seq": stored[0].seq, "duplicate": True} if stored[0].duplicate else {"seq": stored[0].seq}


def batch_ack(stored: Sequence[StoredDetection]) -> dict[str, Any]:
    """The success ack of `publish_detections`. With duplicates the seqs need not be consecutive
    nor ascending (an item may repeat an id stored long ago), hence min and max."""
    seqs = [item.seq for item in stored]
    return {
        "first_seq": min(seqs),
        "last_seq": max(seqs),
        "seqs": seqs,
        "duplicates": sum(item.duplicate for item in stored),
    }


@dataclass(frozen=True, slots=True)
class Transition:
    session: Session
    previous: Status
    actor: str

    def update(self) -> dict[str, Any]:
        """The `test_session_update` payload."""
        return {
            "session_id": self.session.id,
            "status": self.session.status.value,
            "previous_status": self.previous.value,
            "updated_at": iso(self.session.updated_at),
            "actor": self.actor,
        }


class SessionStore(Protocol):
    """Durable sessions and their audit trail.

    Every status change is a compare-and-set: it happens only if the stored status is still the
    one the caller saw, and its audit row commits in the same transaction. Of two nodes racing to
    change one session, exactly one wins.
    """

    async def create(self, session: Session, actor: str) -> None: ...

    async def get(self, session_id: str) -> Session | None: ...

    async def list_sessions(self, only: frozenset[str] | None, limit: int) -> list[Session]: ...

    async def change_status(
        self, session_id: str, expected: Status, target: Status, actor: str, reason: str | None
    ) -> Session | None:
        """The updated session, or None when the status was no longer `expected`."""
        ...


class EventLog(Protocol):
    """Durable, per-session ordered log of detections.

    append() assigns consecutive seq numbers atomically and only while the session is running:
    two nodes appending to the same session concurrently never get the same seq and never leave a
    gap, and nothing is appended after a stop commits. It raises ProtocolError(not_found |
    session_not_running | unavailable).

    Items with an `id` are idempotent: one whose id is already stored in the session (by any node,
    or earlier in the same call) comes back as the stored detection with `duplicate` set, and
    takes no seq. It returns one detection per item, in item order. A request made only of
    duplicates succeeds whatever the session's status: its detections are stored.
    """

    async def append(self, session_id: str, items: Sequence[DetectionIn]) -> list[StoredDetection]: ...

    async def since(self, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]: ...


class StatusHistory(Protocol):
    """Every status change of a session, as committed (the audit trail).

    transitions() lists them oldest first as `test_session_update` payloads; a change is listed
    once its status change has committed, on every node."""

    async def transitions(self, session_id: str) -> list[dict[str, Any]]: ...


class Broadcast(Protocol):
    """Delivers domain events to every member of a session's room on every node.

    detections() is called in seq order per session from one node; receivers reorder across nodes
    and fill gaps from the EventLog, so a lost call delays delivery but never loses a detection.
    Likewise a lost session_changed() is made good from the StatusHistory.
    """

    async def session_changed(self, transition: Transition) -> None: ...

    async def admit(self, session_id: str) -> None:
        """Return when the session's viewers can take more; raise ProtocolError(rate_limited) when
        they stay behind. Must not suspend when they keep up (publishers rely on their order)."""
        ...

    async def detections(self, session_id: str, items: list[StoredDetection]) -> None: ...


def first_occurrences(ids: Sequence[str | None], stored: Container[str]) -> list[bool]:
    """For each item of an append, whether it is new: it has no id, or an id that is neither
    stored nor carried by an earlier item. The others are duplicates and take no seq."""
    seen: set[str] = set()
    fresh: list[bool] = []
    for item_id in ids:
        if item_id is None:
            fresh.append(True)
        elif item_id in stored or item_id in seen:
            fresh.append(False)
        else:
            seen.add(item_id)
            fresh.append(True)
    return fresh


ROOM_PREFIX = "session:"  # Socket.IO room of a session's viewers: the prefix, then the session id


def session_room(session_id: str) -> str:
    return f"{ROOM_PREFIX}{session_id}"


def new_session_id() -> str:
    return secrets.token_hex(12)


class Hub:
    """Every use case of the contract, whichever transport asked."""

    def __init__(self, sessions: SessionStore, log: EventLog, broadcast: Broadcast) -> None:
        self._sessions = sessions
        self._log = log
        self._broadcast = broadcast

    async def get(self, who: Principal, session_id: str) -> Session:
        who.require(Action.WATCH, session_id)
        return await self._existing(session_id)

    async def list_sessions(self, who: Principal, limit: int = 1000) -> list[Session]:
        who.require(Action.WATCH)
        return await self._sessions.list_sessions(who.sessions, limit)

    async def events(self, who: Principal, session_id: str, after_seq: int, limit: int) -> list[StoredDetection]:
        await self.get(who, session_id)
        return await self._log.since(session_id, after_seq, limit)

    async def create(self, who: Principal, name: str | None, config: dict[str, Any] | None) -> Session:
        who.require(Action.CONTROL)
        if who.sessions is not None:
            # Ids are minted here, so a token limited to a list of sessions can never name a new one.
            raise ProtocolError(
                ErrorCode.FORBIDDEN, "token is limited to its listed sessions and may not create new ones"
            )
        now = utcnow()
        session = Session(new_session_id(), name or "", Status.CREATED, now, now, 0, config or {})
        await self._sessions.create(session, who.sub)
        return session

    async def start(self, who: Principal, req: StartRequest) -> Session:
        if req.session_id is None:
            created = await self.create(who, req.name, req.config)
            return await self.transition(who, created.id, Verb.START)
        return await self.transition(who, req.session_id, Verb.START)

    async def transition(self, who: Principal, session_id: str, verb: Verb, reason: str | None = None) -> Session:
        who.require(Action.CONTROL, session_id)
        sources, target = MOVES[verb]
        session = await self._existing(session_id)
        # A lost compare-and-set means another node moved the session meanwhile: judge again on fresh state.
        for _ in range(3):
            if session.status not in sources:
                raise ProtocolError(
                    ErrorCode.INVALID_TRANSITION,
                    f"session '{session_id}' is {session.status.value}; it cannot {verb} (become {target.value})",
                )
            changed = await self._sessions.change_status(session_id, session.status, target, who.sub, reason)
            if changed is not None:
                await self._broadcast.session_changed(Transition(changed, session.status, who.sub))
                return changed
            session = await self._existing(session_id)
        raise ProtocolError(ErrorCode.UNAVAILABLE, f"session '{session_id}' is changing too fast; retry")

    async def publish(self, who: Principal, req: PublishRequest) -> list[StoredDetection]:
        who.require(Action.PUBLISH, req.session_id)
        await self._broadcast.admit(req.session_id)
        stored = await self._log.append(req.session_id, req.detections)
        fresh = [item for item in stored if not item.duplicate]
        if fresh:
            await self._broadcast.detections(req.session_id, fresh)
        return stored

    async def _existing(self, session_id: str) -> Session:
        session = await self._sessions.get(session_id)
        if session is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"session '{session_id}' does not exist")
        return session
