"""One group commit of several sessions' requests, with and without ids, on real SQLite and PostgreSQL:
each request gets its own outcome, duplicates take no seq, a session that is not running fails alone."""

from __future__ import annotations

import pytest

from testpulse.domain.protocol import DetectionIn, ErrorCode, ProtocolError
from testpulse.domain.sessions import Status
from testpulse.store.repository import SqlStore

from .conftest import session_with

pytestmark = pytest.mark.store


def item(label: str, id_: str | None = None) -> DetectionIn:
    return DetectionIn(label, 0.5, [1.0, 2.0, 3.0, 4.0], 7, 1_700_000_000_000, {"k": [1, 2]}, id_)


async def test_a_group_of_several_sessions_numbers_each_session_in_request_order(store: SqlStore) -> None:
    a = await session_with(store, 2)
    b = await session_with(store, 0)

    outcomes = await store.append_many([(b, [item("b1")]), (a, [item("a3"), item("a4")]), (b, [item("b2")])])

    assert [[(d.session_id, d.seq, d.label) for d in o] for o in outcomes if not isinstance(o, ProtocolError)] == [
        [(b, 1, "b1")],
        [(a, 3, "a3"), (a, 4, "a4")],
        [(b, 2, "b2")],
    ]
    stored = await store.since(a, 2, 10)
    assert [(d.seq, d.label, d.bbox, d.frame, d.ts, d.attributes) for d in stored] == [
        (3, "a3", [1.0, 2.0, 3.0, 4.0], 7, 1_700_000_000_000, {"k": [1, 2]}),
        (4, "a4", [1.0, 2.0, 3.0, 4.0], 7, 1_700_000_000_000, {"k": [1, 2]}),
    ]
    assert isinstance(stored[0].ts, int)  # the publisher's number as sent


async def test_ids_already_stored_or_repeated_in_the_group_take_no_seq(store: SqlStore) -> None:
    a = await session_with(store, 0)
    b = await session_with(store, 0)
    first = await store.append(a, [item("x", "id-1")])

    outcomes = await store.append_many(
        [(a, [item("again", "id-1"), item("y", "id-2")]), (b, [item("x", "id-1")]), (a, [item("y2", "id-2")])]
    )

    again, new_in_b, repeated = outcomes
    assert not isinstance(again, ProtocolError) and not isinstance(new_in_b, ProtocolError)
    assert not isinstance(repeated, ProtocolError)
    assert [(d.seq, d.label, d.duplicate) for d in again] == [(first[0].seq, "x", True), (2, "y", False)]
    assert [(d.seq, d.duplicate) for d in new_in_b] == [(1, False)]  # ids are per session
    assert [(d.seq, d.label, d.duplicate) for d in repeated] == [(2, "y", True)]
    assert [d.seq for d in await store.since(a, 0, 10)] == [1, 2]


async def test_a_session_that_is_not_running_fails_alone_and_a_retry_of_stored_ids_still_learns_them(
    store: SqlStore,
) -> None:
    running = await session_with(store, 0)
    stopped = await session_with(store, 0)
    stored = await store.append(stopped, [item("x", "id-1")])
    assert await store.change_status(stopped, Status.RUNNING, Status.STOPPED, "test", None)

    outcomes = await store.append_many(
        [(stopped, [item("late")]), (running, [item("ok")]), (stopped, [item("x", "id-1")]), ("nope", [item("z")])]
    )

    late, ok, retried, missing = outcomes
    assert isinstance(late, ProtocolError) and late.code is ErrorCode.SESSION_NOT_RUNNING
    assert not isinstance(ok, ProtocolError) and [d.seq for d in ok] == [1]
    assert not isinstance(retried, ProtocolError)
    assert [(d.seq, d.duplicate) for d in retried] == [(stored[0].seq, True)]
    assert isinstance(missing, ProtocolError) and missing.code is ErrorCode.NOT_FOUND
    assert [d.seq for d in await store.since(stopped, 0, 10)] == [1]
