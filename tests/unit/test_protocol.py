"""Payload parsing: every field rule of the contract's "Field types", each refusal naming its field."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from testpulse.domain.protocol import (
    BATCH_MAX,
    HTTP_STATUS,
    JSON_OBJECT_MAX_BYTES,
    DetectionIn,
    ErrorCode,
    JoinRequest,
    ProtocolError,
    PublishRequest,
    SessionRef,
    StartRequest,
    StopRequest,
    parse_after_seq,
    parse_limit,
)

pytestmark = pytest.mark.unit

HUGE = 10**400  # a JSON integer no database column holds
NAN = float("nan")


def short(value: Any) -> str:
    return repr(value)[:24]


INF = float("inf")


def refused(parse: Any, payload: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(payload)
    assert caught.value.code is ErrorCode.BAD_REQUEST
    return caught.value


def assert_names(parse: Any, payload: Any, field: str) -> None:
    error = refused(parse, payload)
    assert error.message.startswith(f"{field}:"), f"message {error.message!r} does not name {field!r}"


def det(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"session_id": "s1", "label": "car", "confidence": 0.5}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def json_object_of_size(size: int, char: str = "x") -> dict[str, str]:
    """A JSON object whose compact UTF-8 encoding is exactly `size` bytes."""
    overhead = len(b'{"k":""}')
    per_char = len(char.encode())
    assert (size - overhead) % per_char == 0
    obj = {"k": char * ((size - overhead) // per_char)}
    assert len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()) == size
    return obj


# ---- the payload itself ------------------------------------------------------------------------


PARSERS = {
    "join_session": JoinRequest.parse,
    "leave_session": SessionRef.parse,
    "pause_test_session": SessionRef.parse,
    "resume_test_session": SessionRef.parse,
    "stop_test_session": StopRequest.parse,
    "publish_detection": PublishRequest.parse_one,
    "publish_detections": PublishRequest.parse_batch,
}


@pytest.mark.parametrize("event", list(PARSERS))
@pytest.mark.parametrize("payload", [[], ["s1"], "s1", 42, 1.5, True, None, b"\x00"], ids=short)
def test_payload_that_is_not_an_object_is_refused_naming_payload(event: str, payload: Any) -> None:
    assert_names(PARSERS[event], payload, "payload")


@pytest.mark.parametrize("payload", [[], "x", 42, True], ids=short)
def test_start_payload_that_is_not_an_object_is_refused(payload: Any) -> None:
    assert_names(StartRequest.parse, payload, "payload")


def test_start_without_payload_means_create_and_start_a_new_session() -> None:
    assert StartRequest.parse(None) == StartRequest(None, None, None)
    assert StartRequest.parse({}) == StartRequest(None, None, None)


def test_unknown_extra_fields_are_ignored() -> None:
    assert SessionRef.parse({"session_id": "s1", "extra": [1, {"x": None}]}) == SessionRef("s1")
    parsed = PublishRequest.parse_one(det(colour="red"))
    assert parsed.detections[0].label == "car"


# ---- session_id --------------------------------------------------------------------------------


@pytest.mark.parametrize("parse", list(PARSERS.values()), ids=list(PARSERS))
def test_session_id_is_required(parse: Any) -> None:
    assert_names(parse, {}, "session_id")


@pytest.mark.parametrize("value", [1, 1.5, True, ["s1"], {"id": "s1"}], ids=short)
@pytest.mark.parametrize("parse", list(PARSERS.values()), ids=list(PARSERS))
def test_session_id_must_be_a_string(parse: Any, value: Any) -> None:
    assert_names(parse, {"session_id": value, "detections": [{"label": "a", "confidence": 0}]}, "session_id")


@pytest.mark.parametrize("value", ["", "x" * 65, "x" * 1000], ids=["empty", "65", "1000"])
def test_session_id_outside_1_to_64_characters_is_refused(value: str) -> None:
    assert_names(SessionRef.parse, {"session_id": value}, "session_id")
    assert_names(StartRequest.parse, {"session_id": value}, "session_id")


@pytest.mark.parametrize("value", ["a", "x" * 64, "é" * 64])
def test_session_id_of_1_to_64_characters_is_accepted(value: str) -> None:
    assert SessionRef.parse({"session_id": value}).session_id == value


@pytest.mark.parametrize("value", ["a\x00b", "\ud800"], ids=["nul", "lone-surrogate"])
def test_session_id_that_no_database_can_store_is_refused(value: str) -> None:
    assert_names(SessionRef.parse, {"session_id": value}, "session_id")


# ---- last_seq ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1])
def test_last_seq_accepts_integers_from_zero(value: int) -> None:
    assert JoinRequest.parse({"session_id": "s1", "last_seq": value}).last_seq == value


def test_last_seq_is_optional() -> None:
    assert JoinRequest.parse({"session_id": "s1"}).last_seq is None


@pytest.mark.parametrize("value", [-1, 1.5, 1.0, "3", True, False, [1], {"n": 1}, NAN, 2**63, HUGE], ids=short)
def test_last_seq_that_is_not_an_integer_from_zero_is_refused(value: Any) -> None:
    assert_names(JoinRequest.parse, {"session_id": "s1", "last_seq": value}, "last_seq")


# ---- name, reason ------------------------------------------------------------------------------


def test_name_of_up_to_200_characters_is_accepted() -> None:
    assert StartRequest.parse({"name": "n" * 200}).name == "n" * 200


@pytest.mark.parametrize("value", ["n" * 201, 5, True, ["n"], {"n": 1}, "a\x00"], ids=short)
def test_name_that_is_not_a_string_of_at_most_200_characters_is_refused(value: Any) -> None:
    assert_names(StartRequest.parse, {"name": value}, "name")


def test_reason_of_up_to_500_characters_is_accepted() -> None:
    assert StopRequest.parse({"session_id": "s1", "reason": "r" * 500}).reason == "r" * 500


@pytest.mark.parametrize("value", ["r" * 501, 5, False, ["r"], "\ud800"], ids=short)
def test_reason_that_is_not_a_string_of_at_most_500_characters_is_refused(value: Any) -> None:
    assert_names(StopRequest.parse, {"session_id": "s1", "reason": value}, "reason")


# ---- config, attributes: JSON objects of at most 16 KiB ----------------------------------------


def test_config_of_exactly_16_kib_is_accepted() -> None:
    config = json_object_of_size(JSON_OBJECT_MAX_BYTES)
    assert StartRequest.parse({"config": config}).config == config


def test_config_one_byte_over_16_kib_is_refused() -> None:
    assert_names(StartRequest.parse, {"config": json_object_of_size(JSON_OBJECT_MAX_BYTES + 1)}, "config")


def test_json_object_size_counts_utf8_bytes_not_ascii_escapes() -> None:
    # 16 KiB of UTF-8 "é" (2 bytes each) would be 3x larger as \\u00e9 escapes.
    attributes = json_object_of_size(JSON_OBJECT_MAX_BYTES, "é")
    assert PublishRequest.parse_one(det(attributes=attributes)).detections[0].attributes == attributes
    assert_names(
        PublishRequest.parse_one, det(attributes=json_object_of_size(JSON_OBJECT_MAX_BYTES + 2, "é")), "attributes"
    )


@pytest.mark.parametrize("value", [[], [1, 2], "{}", 1, True], ids=short)
def test_config_and_attributes_must_be_json_objects(value: Any) -> None:
    assert_names(StartRequest.parse, {"config": value}, "config")
    assert_names(PublishRequest.parse_one, det(attributes=value), "attributes")


@pytest.mark.parametrize("value", [{"x": NAN}, {"x": [INF]}, {"x": {"y": -INF}}, {"x": "\ud800"}], ids=short)
def test_json_objects_holding_nan_infinity_or_lone_surrogates_are_refused(value: Any) -> None:
    assert_names(StartRequest.parse, {"config": value}, "config")
    assert_names(PublishRequest.parse_one, det(attributes=value), "attributes")


def test_nested_json_objects_are_kept_as_sent() -> None:
    attributes = {"a": [1, 2.5, None, True, {"b": "c"}], "big": 2**70}
    assert PublishRequest.parse_one(det(attributes=attributes)).detections[0].attributes == attributes


# ---- label, confidence --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "l" * 128, "ünïcode"])
def test_label_of_1_to_128_characters_is_accepted(value: str) -> None:
    assert PublishRequest.parse_one(det(label=value)).detections[0].label == value


@pytest.mark.parametrize("value", [..., None, "", "l" * 129, 7, True, ["car"], "c\x00r", "\udfff"], ids=short)
def test_label_that_is_not_a_string_of_1_to_128_characters_is_refused(value: Any) -> None:
    assert_names(PublishRequest.parse_one, det(label=value), "label")


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.5, 5e-324])
def test_confidence_from_0_to_1_is_accepted(value: float) -> None:
    assert PublishRequest.parse_one(det(confidence=value)).detections[0].confidence == value


@pytest.mark.parametrize(
    "value", [..., None, -0.0001, 1.0001, 2, -1, "0.5", True, False, NAN, INF, -INF, HUGE, [0.5]], ids=short
)
def test_confidence_that_is_not_a_number_from_0_to_1_is_refused(value: Any) -> None:
    assert_names(PublishRequest.parse_one, det(confidence=value), "confidence")


# ---- bbox, frame, ts ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[0, 0, 0, 0], [-5, -5.5, 10, 20.25], [1e9, 1e9, 1e9, 1e9]], ids=short)
def test_bbox_of_four_numbers_with_non_negative_size_is_accepted(value: list[float]) -> None:
    assert PublishRequest.parse_one(det(bbox=value)).detections[0].bbox == value


@pytest.mark.parametrize(
    "value",
    [
        [1, 2, 3],
        [1, 2, 3, 4, 5],
        [],
        [1, 2, -3, 4],
        [1, 2, 3, -0.5],
        [1, "2", 3, 4],
        [True, 2, 3, 4],
        [1, 2, NAN, 4],
        [1, 2, 3, INF],
        [HUGE, 0, 0, 0],
        {"x": 1},
        "1,2,3,4",
        7,
    ],
    ids=short,
)
def test_bbox_that_is_not_four_numbers_with_non_negative_size_is_refused(value: Any) -> None:
    assert_names(PublishRequest.parse_one, det(bbox=value), "bbox")


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1])
def test_frame_integer_from_zero_is_accepted(value: int) -> None:
    assert PublishRequest.parse_one(det(frame=value)).detections[0].frame == value


@pytest.mark.parametrize("value", [-1, 1.5, 2.0, "3", True, NAN, 2**63, HUGE, [1]], ids=short)
def test_frame_that_is_not_an_integer_from_zero_is_refused(value: Any) -> None:
    assert_names(PublishRequest.parse_one, det(frame=value), "frame")


@pytest.mark.parametrize("value", [1_700_000_000_123, 1_700_000_000_123.456, 0, -5, 0.5])
def test_ts_is_kept_exactly_as_sent_int_stays_int(value: float) -> None:
    ts = PublishRequest.parse_one(det(ts=value)).detections[0].ts
    assert ts == value and type(ts) is type(value)


@pytest.mark.parametrize("value", ["1700000000000", True, NAN, INF, HUGE, [1], {"ms": 1}], ids=short)
def test_ts_that_is_not_a_finite_number_is_refused(value: Any) -> None:
    assert_names(PublishRequest.parse_one, det(ts=value), "ts")


def test_optional_detection_fields_may_be_absent_or_null() -> None:
    parsed = PublishRequest.parse_one(det(bbox=None, frame=None, ts=None, attributes=None)).detections[0]
    assert (parsed.bbox, parsed.frame, parsed.ts, parsed.attributes) == (None, None, None, None)


# ---- detections (batch) ------------------------------------------------------------------------


def batch(n: int) -> dict[str, Any]:
    return {"session_id": "s1", "detections": [{"label": f"l{i}", "confidence": 0.5} for i in range(n)]}


@pytest.mark.parametrize("n", [1, 2, BATCH_MAX])
def test_batch_of_1_to_1000_detections_is_accepted(n: int) -> None:
    assert [d.label for d in PublishRequest.parse_batch(batch(n)).detections] == [f"l{i}" for i in range(n)]


@pytest.mark.parametrize("n", [0, BATCH_MAX + 1])
def test_batch_outside_1_to_1000_detections_is_refused(n: int) -> None:
    assert_names(PublishRequest.parse_batch, batch(n), "detections")


@pytest.mark.parametrize("value", [..., None, {"label": "a"}, "a", 3], ids=short)
def test_batch_detections_must_be_a_list(value: Any) -> None:
    payload = {"session_id": "s1"} if value is ... else {"session_id": "s1", "detections": value}
    assert_names(PublishRequest.parse_batch, payload, "detections")


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("junk", "detections[2]"),
        ({"confidence": 0.5}, "detections[2].label"),
        ({"label": "a", "confidence": 7}, "detections[2].confidence"),
        ({"label": "a", "confidence": 0.1, "bbox": [1]}, "detections[2].bbox"),
        ({"label": "a", "confidence": 0.1, "frame": -1}, "detections[2].frame"),
        ({"label": "a", "confidence": 0.1, "ts": "x"}, "detections[2].ts"),
        ({"label": "a", "confidence": 0.1, "attributes": [1]}, "detections[2].attributes"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_batch_item_is_refused_naming_its_index_and_field(item: Any, field: str) -> None:
    payload = batch(4)
    payload["detections"][2] = item
    assert_names(PublishRequest.parse_batch, payload, field)


# ---- HTTP query parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [(None, 0), ("", 0), ("0", 0), ("17", 17), (str(2**63 - 1), 2**63 - 1)])
def test_after_seq_accepts_integers_from_zero(raw: str | None, value: int) -> None:
    assert parse_after_seq(raw) == value


@pytest.mark.parametrize("raw", ["-1", "1.5", "x", "²", "\u0661", " 1", str(2**63), "9" * 400])
def test_after_seq_that_is_not_an_integer_from_zero_is_refused(raw: str) -> None:
    assert_names(parse_after_seq, raw, "after_seq")


@pytest.mark.parametrize(("raw", "value"), [(None, 100), ("", 100), ("1", 1), ("1000", 1000)])
def test_limit_accepts_1_to_1000(raw: str | None, value: int) -> None:
    assert parse_limit(raw) == value


@pytest.mark.parametrize("raw", ["0", "1001", "-1", "x", "²", "9" * 400])
def test_limit_outside_1_to_1000_is_refused(raw: str) -> None:
    assert_names(parse_limit, raw, "limit")


# ---- error codes -------------------------------------------------------------------------------


def test_error_codes_are_the_contracts() -> None:
    contract = {
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "invalid_transition",
        "session_not_running",
        "rate_limited",
        "payload_too_large",
        "unavailable",
        "internal",
    }
    assert contract <= {c.value for c in ErrorCode}


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.BAD_REQUEST, 400),
        (ErrorCode.UNAUTHORIZED, 403),
        (ErrorCode.FORBIDDEN, 403),
        (ErrorCode.NOT_FOUND, 404),
        (ErrorCode.INVALID_TRANSITION, 409),
        (ErrorCode.SESSION_NOT_RUNNING, 409),
        (ErrorCode.RATE_LIMITED, 429),
        (ErrorCode.PAYLOAD_TOO_LARGE, 413),
        (ErrorCode.UNAVAILABLE, 503),
        (ErrorCode.INTERNAL, 500),
    ],
)
def test_every_error_code_has_a_fitting_http_status(code: ErrorCode, status: int) -> None:
    assert HTTP_STATUS[code] == status


def test_protocol_error_serialises_as_code_and_message() -> None:
    assert ProtocolError(ErrorCode.NOT_FOUND, "gone").as_dict() == {"code": "not_found", "message": "gone"}


def test_detection_confidence_is_a_float_even_when_sent_as_an_int() -> None:
    parsed = DetectionIn.parse({"label": "a", "confidence": 1})
    assert parsed.confidence == 1.0 and isinstance(parsed.confidence, float) and not math.isnan(parsed.confidence)
