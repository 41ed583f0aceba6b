"""Properties of the inbound parsers (server/domain/protocol.py): whatever JSON a client sends, in
any shape or size, a parser either accepts it or refuses it with a ProtocolError carrying one of the
contract's codes; no other exception ever comes out. Accepted values obey the contract's field rules."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testpulse.domain.protocol import (
    BATCH_MAX,
    DETECTION_ID_MAX,
    JSON_DEPTH_MAX,
    JSON_OBJECT_MAX_BYTES,
    LABEL_MAX,
    NAME_MAX,
    REASON_MAX,
    SESSION_ID_MAX,
    TOKEN_MAX,
    DetectionIn,
    ErrorCode,
    JoinRequest,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    SessionRef,
    StartRequest,
    StopRequest,
    check_session_id,
    parse_after_seq,
    parse_detection_list,
    parse_limit,
)

pytestmark = pytest.mark.unit

# JSON as a decoder hands it over: stdlib json also yields NaN, Infinity, lone surrogates and
# integers of any length, so those are in too.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(alphabet=st.characters(codec=None), max_size=8)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
)

FIELDS = (
    "session_id",
    "last_seq",
    "batch_ms",
    "status_since",
    "presence",
    "token",
    "name",
    "config",
    "reason",
    "label",
    "confidence",
    "bbox",
    "frame",
    "ts",
    "attributes",
    "id",
    "detections",
)


def _sized_text(limit: int) -> st.SearchStrategy[str]:
    """Strings at and around a length limit."""
    return st.sampled_from([0, 1, limit - 1, limit, limit + 1]).flatmap(
        lambda n: st.text(st.characters(codec="utf-8"), min_size=max(n, 0), max_size=max(n, 0))
    )


def nested(depth: int) -> dict[str, Any]:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# A field's value: anything, or a value close to the field's limits.
field_values = (
    json_values
    | _sized_text(SESSION_ID_MAX)
    | _sized_text(LABEL_MAX)
    | _sized_text(NAME_MAX)
    | _sized_text(REASON_MAX)
    | _sized_text(DETECTION_ID_MAX)
    | st.text(max_size=3).map(lambda s: s + "x" * TOKEN_MAX)
    | st.sampled_from([-1, 0, 1, 2**63 - 1, 2**63, -(2**63), 1000, 1001, 0.5, 1.0000001, -0.0])
    | st.sampled_from(["2024-01-01T00:00:00Z", "2024-13-01", "Z", "\x00", "\ud800"])
    | st.integers(min_value=1, max_value=3 * JSON_DEPTH_MAX).map(nested)
    | st.sampled_from([nested(1000), {"a": "x" * JSON_OBJECT_MAX_BYTES}, [0.1, 0.2, 3, 4], [0, 0, -1, 1]])
)

payloads = (
    json_values
    | st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=len(FIELDS))
    | st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=len(FIELDS)).map(
        lambda d: {"session_id": "s1", "label": "car", "confidence": 0.5, **d}
    )
)
detection_lists = (
    json_values
    | st.lists(payloads, max_size=4)
    | st.sampled_from([0, 1, BATCH_MAX, BATCH_MAX + 1]).map(lambda n: [{"label": "car", "confidence": 0.5}] * n)
)

PARSERS: dict[str, Callable[[Any], Any]] = {
    "join_session": JoinRequest.parse,
    "leave_session/pause/resume/get_presence": SessionRef.parse,
    "start_test_session": StartRequest.parse,
    "stop_test_session": StopRequest.parse,
    "publish_detection": PublishRequest.parse_one,
    "publish_detections": PublishRequest.parse_batch,
    "refresh_token": RefreshRequest.parse,
    "detection (HTTP body)": DetectionIn.parse,
    "check_session_id": check_session_id,
}

CONTRACT_CODES = {code.value for code in ErrorCode}


def outcome(parse: Callable[[Any], Any], payload: Any) -> Any:
    """The parser's result, or its ProtocolError; anything else fails the test."""
    try:
        return parse(payload)
    except ProtocolError as exc:
        assert exc.code.value in CONTRACT_CODES
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.PAYLOAD_TOO_LARGE), exc.code
        assert exc.message  # names the field
        return exc


def plain_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("event", PARSERS)
@given(payload=payloads)
def test_every_parser_accepts_or_names_a_contract_error(event: str, payload: Any) -> None:
    outcome(PARSERS[event], payload)


@given(payload=st.dictionaries(st.just("session_id"), field_values, max_size=1) | payloads)
def test_an_accepted_detection_keeps_the_field_rules(payload: Any) -> None:
    result = outcome(PublishRequest.parse_one, payload)
    if isinstance(result, ProtocolError):
        return
    assert 1 <= len(result.session_id) <= SESSION_ID_MAX
    (detection,) = result.detections
    assert 1 <= len(detection.label) <= LABEL_MAX
    assert 0 <= detection.confidence <= 1
    if detection.attributes is not None:
        assert plain_json(detection.attributes)
        assert depth(detection.attributes) <= JSON_DEPTH_MAX
        assert len(json.dumps(detection.attributes, ensure_ascii=False, separators=(",", ":")).encode()) <= (
            JSON_OBJECT_MAX_BYTES
        )
    if detection.bbox is not None:
        assert len(detection.bbox) == 4 and detection.bbox[2] >= 0 and detection.bbox[3] >= 0


@given(items=detection_lists)
def test_a_batch_is_accepted_or_refused_with_bad_request(items: Any) -> None:
    result = outcome(parse_detection_list, items)
    if not isinstance(result, ProtocolError):
        assert 1 <= len(result) <= BATCH_MAX


@given(raw=st.none() | st.text() | st.integers().map(str) | st.sampled_from(["٣", "²", "1e3", "-0", " 1", "9" * 30]))
def test_query_numbers_are_ascii_integers_or_bad_request(raw: str | None) -> None:
    for parse in (parse_after_seq, parse_limit):
        result = outcome(parse, raw)
        if not isinstance(result, ProtocolError):
            assert isinstance(result, int) and result >= 0


@pytest.mark.parametrize("field", ["config", "attributes"])
@given(levels=st.integers(min_value=1, max_value=5 * JSON_DEPTH_MAX))
def test_nesting_past_the_depth_limit_is_bad_request(field: str, levels: int) -> None:
    # Deep values small enough for the 16 KiB limit: stdlib json (the size check, the store's
    # encoder) overflows the stack past about a thousand levels and orjson refuses 255, so a
    # stored value nested that deep could never be sent; the parser refuses them all up front.
    payload = {"session_id": "s1", "label": "car", "confidence": 0.5, field: nested(levels)}
    parse = StartRequest.parse if field == "config" else PublishRequest.parse_one
    result = outcome(parse, payload)
    if levels > JSON_DEPTH_MAX:
        assert isinstance(result, ProtocolError) and result.code is ErrorCode.BAD_REQUEST
        assert field in result.message
    else:
        assert not isinstance(result, ProtocolError)
