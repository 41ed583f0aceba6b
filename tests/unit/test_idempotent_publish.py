"""The pure parts of idempotent publish: which items are new, the acks, and the `id` on the wire."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from testpulse.bus.broker import detection_from_wire
from testpulse.domain.protocol import HTTP_STATUS, DetectionIn, ErrorCode, PublishRequest
from testpulse.domain.sessions import StoredDetection, batch_ack, first_occurrences, publish_ack

pytestmark = pytest.mark.unit

AT = datetime(2026, 11, 1, tzinfo=UTC)


def stored(seq: int, item_id: str | None = None, *, duplicate: bool = False) -> StoredDetection:
    return StoredDetection("s", seq, "car", 0.5, None, None, None, None, AT, item_id, duplicate)


def test_items_without_an_id_are_always_new() -> None:
    assert first_occurrences([None, None], {"a"}) == [True, True]


def test_an_id_already_stored_is_a_duplicate() -> None:
    assert first_occurrences(["a", "b"], {"a"}) == [False, True]


def test_only_the_first_of_an_id_repeated_in_one_append_is_new() -> None:
    assert first_occurrences(["x", None, "x", "y", "x"], set()) == [True, True, False, True, False]


def test_the_single_ack_says_duplicate_only_for_a_repeat() -> None:
    assert publish_ack([stored(3, "a")]) == {"seq": 3}
    assert publish_ack([stored(3, "a", duplicate=True)]) == {"seq": 3, "duplicate": True}


def test_the_batch_ack_spans_the_smallest_and_largest_seq_with_duplicates_out_of_order() -> None:
    items = [stored(7), stored(2, "old", duplicate=True), stored(8), stored(7, duplicate=True)]
    assert batch_ack(items) == {"first_seq": 2, "last_seq": 8, "seqs": [7, 2, 8, 7], "duplicates": 2}


def test_an_id_is_parsed_on_single_and_batch_items() -> None:
    assert DetectionIn.parse({"label": "a", "confidence": 1, "id": "k-1"}).id == "k-1"
    assert DetectionIn.parse({"label": "a", "confidence": 1}).id is None
    batch = PublishRequest.parse_batch({"session_id": "s", "detections": [{"label": "a", "confidence": 1, "id": "k"}]})
    assert batch.detections[0].id == "k"


def test_insufficient_state_is_http_409() -> None:
    assert ErrorCode("insufficient_state") is ErrorCode.INSUFFICIENT_STATE
    assert HTTP_STATUS[ErrorCode.INSUFFICIENT_STATE] == 409


def test_the_id_crosses_nodes_in_the_detection_event() -> None:
    original = stored(4, "k-4")
    assert detection_from_wire(original.event(), "s") == original
    assert detection_from_wire(stored(5).event(), "s") == stored(5)
    assert detection_from_wire({**original.event(), "id": 12}, "s") is None
    assert "duplicate" not in dataclasses.replace(original, duplicate=True).event()
