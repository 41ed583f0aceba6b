"""The session state machine: every pair of statuses is allowed or invalid exactly as the contract draws it."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from testpulse.domain.sessions import ACTIONS, ALLOWED, MOVES, Session, Status, StoredDetection, Transition, Verb

pytestmark = pytest.mark.unit

# The contract: created -> running <-> paused -> stopped; stopped is final, reached from running or paused.
CONTRACT_ARROWS = {
    (Status.CREATED, Status.RUNNING),
    (Status.RUNNING, Status.PAUSED),
    (Status.PAUSED, Status.RUNNING),
    (Status.RUNNING, Status.STOPPED),
    (Status.PAUSED, Status.STOPPED),
}

# Which control verb moves along which arrow.
CONTRACT_VERBS = {
    (Status.CREATED, Status.RUNNING): "start",
    (Status.RUNNING, Status.PAUSED): "pause",
    (Status.PAUSED, Status.RUNNING): "resume",
    (Status.RUNNING, Status.STOPPED): "stop",
    (Status.PAUSED, Status.STOPPED): "stop",
}


def test_statuses_are_the_contracts() -> None:
    assert {s.value for s in Status} == {"created", "running", "paused", "stopped"}


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(Status, Status)), ids=lambda s: str(getattr(s, "value", s))
)
def test_every_pair_of_statuses_is_allowed_only_along_the_contracts_arrows(source: Status, target: Status) -> None:
    assert (target in ALLOWED[source]) == ((source, target) in CONTRACT_ARROWS)


def test_stopped_is_final() -> None:
    assert ALLOWED[Status.STOPPED] == frozenset()


def test_every_allowed_arrow_has_the_verb_that_takes_it() -> None:
    assert ACTIONS == CONTRACT_VERBS


def test_each_verb_moves_only_from_its_own_sources() -> None:
    # resume must not start a created session, and start must not resume a paused one.
    assert MOVES[Verb.RESUME][0] == {Status.PAUSED}
    assert MOVES[Verb.START][0] == {Status.CREATED}
    assert {verb.value for verb in Verb} == {"start", "pause", "resume", "stop"}


MOMENT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def test_session_view_has_exactly_the_contracts_fields() -> None:
    session = Session("s1", "night run", Status.PAUSED, MOMENT, MOMENT, 42, {"fps": 30})
    assert session.view() == {
        "id": "s1",
        "name": "night run",
        "status": "paused",
        "created_at": "2024-05-06T07:08:09.123Z",
        "updated_at": "2024-05-06T07:08:09.123Z",
        "last_seq": 42,
        "config": {"fps": 30},
    }


def test_session_update_payload_has_exactly_the_contracts_fields() -> None:
    session = Session("s1", "", Status.STOPPED, MOMENT, MOMENT, 0)
    assert Transition(session, Status.RUNNING, "op-1").update() == {
        "session_id": "s1",
        "status": "stopped",
        "previous_status": "running",
        "updated_at": "2024-05-06T07:08:09.123Z",
        "actor": "op-1",
    }


def test_detection_event_payload_has_exactly_the_contracts_fields() -> None:
    stored = StoredDetection("s1", 7, "car", 0.25, [1, 2, 3, 4], 9, 1_700_000_000_000, {"k": "v"}, MOMENT)
    assert stored.event() == {
        "session_id": "s1",
        "seq": 7,
        "id": None,
        "label": "car",
        "confidence": 0.25,
        "bbox": [1, 2, 3, 4],
        "frame": 9,
        "ts": 1_700_000_000_000,
        "attributes": {"k": "v"},
        "received_at": "2024-05-06T07:08:09.123Z",
    }
