"""The status trail's decisions: which status updates a node delivers, drops or must read again."""

from __future__ import annotations

from typing import Any

import pytest

from testpulse.domain.status_trail import HISTORY_MAX, StatusTrail, Verdict, replay_for

pytestmark = pytest.mark.unit


def update(previous: str, status: str, at: str) -> dict[str, Any]:
    return {"session_id": "s", "status": status, "previous_status": previous, "updated_at": at, "actor": "op"}


START = update("created", "running", "t1")
PAUSE = update("running", "paused", "t2")
RESUME = update("paused", "running", "t3")
STOP = update("running", "stopped", "t4")


def trail_at(*delivered: dict[str, Any]) -> StatusTrail:
    trail = StatusTrail("created", "t0")
    for u in delivered:
        trail.delivered(u)
    return trail


def test_the_next_change_is_delivered() -> None:
    assert trail_at(START).judge(PAUSE) is Verdict.DELIVER


def test_a_change_seen_before_is_a_duplicate_even_when_it_would_follow_the_current_status() -> None:
    # paused -> running (t3) delivered; a late re-send of running -> paused (t2) must not pause again.
    trail = trail_at(START, PAUSE, RESUME)
    assert trail.judge(PAUSE) is Verdict.DUPLICATE
    assert trail.judge(RESUME) is Verdict.DUPLICATE
    assert trail.judge(START) is Verdict.DUPLICATE


def test_the_initial_state_is_known_so_its_re_announcement_is_a_duplicate() -> None:
    trail = StatusTrail("running", "t1")
    assert trail.judge(START) is Verdict.DUPLICATE


def test_an_update_after_a_missed_one_asks_for_the_store() -> None:
    # running -> paused was lost; paused -> running arrives while the trail still says running.
    assert trail_at(START).judge(RESUME) is Verdict.MISSED


def test_missed_lists_every_transition_after_the_last_delivered_in_order() -> None:
    trail = trail_at(START)
    assert trail.missed([START, PAUSE, RESUME, STOP]) == [PAUSE, RESUME, STOP]


def test_missed_is_empty_when_the_trail_is_current() -> None:
    trail = trail_at(START, PAUSE)
    assert trail.missed([START, PAUSE]) == []


def test_missed_without_the_last_delivered_change_names_the_current_status_once() -> None:
    # A store restored from a backup no longer holds the change this node delivered last.
    trail = StatusTrail("paused", "t9")
    assert trail.missed([START, PAUSE]) == [{**PAUSE, "previous_status": "paused"}]


def test_a_joining_member_gets_what_was_delivered_after_the_state_its_ack_named() -> None:
    trail = trail_at(START, PAUSE, RESUME)
    assert trail.since("running", "t1") == [PAUSE, RESUME]
    assert trail.since("running", "t3") == []


def test_a_member_that_joined_knowing_the_state_the_trail_started_from_gets_every_change_since() -> None:
    # The feed was made from the same session read as this member's join; a pause then reached the
    # node before the member went live. The member knows only the starting state, so it needs the pause.
    trail = StatusTrail("running", "t1")
    trail.delivered(PAUSE)
    assert trail.since("running", "t1") == [PAUSE]
    trail.delivered(RESUME)
    assert trail.since("running", "t1") == [PAUSE, RESUME]


def test_a_state_older_than_the_history_is_unknown() -> None:
    trail = StatusTrail("running", "t0")
    for i in range(HISTORY_MAX + 1):
        trail.delivered(update("running" if i % 2 == 0 else "paused", "paused" if i % 2 == 0 else "running", f"h{i}"))
    assert trail.since("running", "t0") is None


def test_a_state_the_node_never_delivered_is_unknown() -> None:
    assert trail_at(START).since("paused", "t2") is None


def test_a_rejoining_client_gets_the_changes_after_the_one_it_saw_up_to_what_its_join_read() -> None:
    trail = [START, PAUSE, RESUME, STOP]
    assert replay_for(trail, "t1", ("running", "t3")) == [PAUSE, RESUME]
    assert replay_for(trail, "t3", ("running", "t3")) == []


def test_a_time_the_node_never_sent_picks_the_changes_after_it() -> None:
    trail = [
        update("created", "running", "2026-01-01T00:00:01.000Z"),
        update("running", "paused", "2026-01-01T00:00:03.000Z"),
    ]
    assert replay_for(trail, "2026-01-01T00:00:02.000Z", ("paused", "2026-01-01T00:00:03.000Z")) == [trail[1]]
    assert replay_for(trail, "2026-01-01T00:00:05+00:00", ("paused", "2026-01-01T00:00:03.000Z")) == []


def test_missed_while_still_created_lists_every_transition() -> None:
    # Found by test_properties_ordering.py: watched while `created`, start and pause both lost.
    assert trail_at().missed([START, PAUSE]) == [START, PAUSE]
