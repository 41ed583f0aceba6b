"""Wire contract: error codes, the error handlers raise, and payload parsing that names the bad field."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

PROTOCOL_VERSION = 2  # every PROTOCOL.md 1.1 addition is in
SESSION_ID_MAX = 64
NAME_MAX = 200
LABEL_MAX = 128
REASON_MAX = 500
DETECTION_ID_MAX = 64
JSON_OBJECT_MAX_BYTES = 16 * 1024
# `config` and `attributes` nest at most this deep: stdlib json overflows the stack near a thousand
# levels (small enough for the 16 KiB limit) and orjson refuses to write past 254.
JSON_DEPTH_MAX = 64
BATCH_MAX = 1000
BATCH_WINDOW_MAX_MS = 1000
ISO_TIME_MAX = 64
TOKEN_MAX = 8192
PRESENCE_MEMBERS_MAX = 1000  # members listed by get_presence; `truncated` says there were more


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID_TRANSITION = "invalid_transition"
    SESSION_NOT_RUNNING = "session_not_running"
    RATE_LIMITED = "rate_limited"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # Extension: a viewer whose outgoing queue overflowed is disconnected with this reason.
    SLOW_CONSUMER = "slow_consumer"
    # 1.1: a client holds a position the store does not have (a join past the session's last seq).
    INSUFFICIENT_STATE = "insufficient_state"
    # 1.1 (refresh_token): the connect_error codes a refused refresh answers with.
    AUTH_INVALID = "auth_invalid"
    AUTH_EXPIRED = "auth_expired"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 403,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_TRANSITION: 409,
    ErrorCode.SESSION_NOT_RUNNING: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.SLOW_CONSUMER: 429,
    ErrorCode.INSUFFICIENT_STATE: 409,
    ErrorCode.AUTH_INVALID: 401,
    ErrorCode.AUTH_EXPIRED: 401,
}


class ProtocolError(Exception):
    """Anything a client did or met that the contract names; transports map it to acks, events or HTTP."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def bad(field: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{field}: {why}")


# ---- field parsers: each raises bad_request naming the field -------------------------------


def _object(payload: object, what: str = "payload") -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise bad(what, "must be a JSON object")
    return payload


INT64_MAX = 2**63 - 1


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer that fits the store's BIGINT columns."""
    return isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX <= value <= INT64_MAX


def _is_number(value: object) -> TypeGuard[int | float]:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def session_id_field(data: dict[str, Any], field: str = "session_id") -> str:
    value = data.get(field)
    if value is None:
        raise bad(field, "is required")
    return check_session_id(value, field)


def check_session_id(value: object, field: str = "session_id") -> str:
    if not isinstance(value, str):
        raise bad(field, "must be a string")
    if not 1 <= len(value) <= SESSION_ID_MAX:
        raise bad(field, f"must be 1 to {SESSION_ID_MAX} characters")
    return _storable(value, field)


def _storable(value: str, field: str) -> str:
    # PostgreSQL text cannot hold NUL and no database stores a lone surrogate: refuse them here
    # instead of failing a store transaction that other publishers' detections share.
    if "\x00" in value:
        raise bad(field, "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(field, "must be valid Unicode text (no lone surrogates)") from None
    return value


def _optional_str(data: dict[str, Any], field: str, max_len: int) -> str | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad(field, "must be a string")
    if len(value) > max_len:
        raise bad(field, f"must be at most {max_len} characters")
    return _storable(value, field)


def _json_object(data: dict[str, Any], field: str) -> dict[str, Any] | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(field, "must be a JSON object")
    if _deeper_than(value, JSON_DEPTH_MAX):
        raise bad(field, f"must be nested at most {JSON_DEPTH_MAX} levels deep")
    try:
        # Measured as UTF-8 JSON, the way clients send it; ASCII escapes would count "é" as 6 bytes.
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError):  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise bad(field, "must be plain JSON (no NaN, Infinity or lone surrogates)") from None
    if len(encoded) > JSON_OBJECT_MAX_BYTES:
        raise bad(field, f"must be at most {JSON_OBJECT_MAX_BYTES} bytes encoded")
    return value


def _deeper_than(value: object, limit: int) -> bool:
    """Whether objects and arrays nest in `value` more than `limit` levels (no recursion of its own)."""
    level: list[object] = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


# ---- requests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRef:
    session_id: str

    @classmethod
    def parse(cls, payload: object) -> SessionRef:
        return cls(session_id_field(_object(payload)))


@dataclass(frozen=True, slots=True)
class JoinRequest:
    session_id: str
    last_seq: int | None
    # Extension: 1..1000 asks for `detection_batch` events at most every batch_ms milliseconds.
    batch_ms: int = 0
    # Extension: the `updated_at` of the last status change the client saw; the node sends the
    # `test_session_update`s committed after it (the ones a client that was away missed).
    status_since: str | None = None
    # 1.1: opt this connection into `presence_update` events for the session.
    presence: bool = False

    @classmethod
    def parse(cls, payload: object) -> JoinRequest:
        data = _object(payload)
        last_seq = data.get("last_seq")
        if last_seq is not None and (not _is_int(last_seq) or last_seq < 0):
            raise bad("last_seq", "must be an integer >= 0")
        batch_ms = data.get("batch_ms", 0)
        if batch_ms is None:
            batch_ms = 0
        if not _is_int(batch_ms) or not 0 <= batch_ms <= BATCH_WINDOW_MAX_MS:
            raise bad("batch_ms", f"must be an integer from 0 to {BATCH_WINDOW_MAX_MS}")
        status_since = _optional_str(data, "status_since", ISO_TIME_MAX)
        if status_since is not None:
            try:
                datetime.fromisoformat(status_since.replace("Z", "+00:00"))
            except ValueError:
                raise bad("status_since", "must be an ISO 8601 time (a status update's updated_at)") from None
        presence = data.get("presence", False)
        if presence is None:
            presence = False
        if not isinstance(presence, bool):
            raise bad("presence", "must be a boolean")
        return cls(session_id_field(data), last_seq, batch_ms, status_since, presence)


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    token: str

    @classmethod
    def parse(cls, payload: object) -> RefreshRequest:
        data = _object(payload)
        token = data.get("token")
        if token is None or token == "":
            raise bad("token", "is required")
        if not isinstance(token, str):
            raise bad("token", "must be a string (a JWT)")
        if len(token) > TOKEN_MAX:
            raise bad("token", f"must be at most {TOKEN_MAX} characters")
        return cls(token)


@dataclass(frozen=True, slots=True)
class StartRequest:
    session_id: str | None
    name: str | None
    config: dict[str, Any] | None

    @classmethod
    def parse(cls, payload: object) -> StartRequest:
        data = {} if payload is None else _object(payload)
        raw_id = data.get("session_id")
        session_id = None if raw_id is None else check_session_id(raw_id)
        return cls(session_id, _optional_str(data, "name", NAME_MAX), _json_object(data, "config"))


@dataclass(frozen=True, slots=True)
class StopRequest:
    session_id: str
    reason: str | None

    @classmethod
    def parse(cls, payload: object) -> StopRequest:
        data = _object(payload)
        return cls(session_id_field(data), _optional_str(data, "reason", REASON_MAX))


@dataclass(frozen=True, slots=True)
class DetectionIn:
    """A detection as a publisher sent it, validated; `seq` and `received_at` come from the store.
    `id`, when given, makes the publish idempotent: the store keeps one detection per id and session."""

    label: str
    confidence: float
    bbox: list[float] | None
    frame: int | None
    ts: float | None
    attributes: dict[str, Any] | None
    id: str | None = None

    @classmethod
    def parse(cls, payload: object, prefix: str = "") -> DetectionIn:
        data = _object(payload, prefix.rstrip(".") or "payload")
        label = data.get("label")
        if not isinstance(label, str):
            raise bad(prefix + "label", "is required and must be a string")
        if not 1 <= len(label) <= LABEL_MAX:
            raise bad(prefix + "label", f"must be 1 to {LABEL_MAX} characters")
        _storable(label, prefix + "label")
        confidence = data.get("confidence")
        if not _is_number(confidence):
            raise bad(prefix + "confidence", "is required and must be a number")
        if not 0 <= confidence <= 1:
            raise bad(prefix + "confidence", "must be between 0 and 1")
        bbox = data.get("bbox")
        if bbox is not None:
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise bad(prefix + "bbox", "must be four numbers [x, y, width, height]")
            if bbox[2] < 0 or bbox[3] < 0:
                raise bad(prefix + "bbox", "width and height must be >= 0")
        frame = data.get("frame")
        if frame is not None and (not _is_int(frame) or frame < 0):
            raise bad(prefix + "frame", "must be an integer >= 0")
        ts = data.get("ts")
        if ts is not None and not _is_number(ts):
            raise bad(prefix + "ts", "must be a number (milliseconds since the epoch)")
        attributes = _json_object(data, "attributes") if prefix == "" else _prefixed_json(data, prefix)
        return cls(label, float(confidence), bbox, frame, ts, attributes, _detection_id(data, prefix + "id"))


def _detection_id(data: dict[str, Any], field: str) -> str | None:
    value = data.get("id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad(field, "must be a string")
    if not 1 <= len(value) <= DETECTION_ID_MAX:
        raise bad(field, f"must be 1 to {DETECTION_ID_MAX} characters")
    return _storable(value, field)


def _prefixed_json(data: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    try:
        return _json_object(data, "attributes")
    except ProtocolError as exc:
        raise ProtocolError(exc.code, prefix + exc.message) from None


@dataclass(frozen=True, slots=True)
class PublishRequest:
    session_id: str
    detections: list[DetectionIn]

    @classmethod
    def parse_one(cls, payload: object) -> PublishRequest:
        data = _object(payload)
        return cls(session_id_field(data), [DetectionIn.parse(data)])

    @classmethod
    def parse_batch(cls, payload: object) -> PublishRequest:
        data = _object(payload)
        session_id = session_id_field(data)
        return cls(session_id, parse_detection_list(data.get("detections")))


def parse_detection_list(items: object) -> list[DetectionIn]:
    if not isinstance(items, list):
        raise bad("detections", "is required and must be a list")
    if not 1 <= len(items) <= BATCH_MAX:
        raise bad("detections", f"must hold 1 to {BATCH_MAX} items")
    return [DetectionIn.parse(item, f"detections[{i}].") for i, item in enumerate(items)]


def parse_after_seq(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    # isascii: str.isdigit() also accepts digits like "²" that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or int(raw) > INT64_MAX:
        raise bad("after_seq", "must be an integer >= 0")
    return int(raw)


def parse_limit(raw: str | None, default: int = 100, maximum: int = 1000) -> int:
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise bad("limit", f"must be an integer from 1 to {maximum}")
    return int(raw)
