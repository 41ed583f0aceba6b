"""The tables, as SQLModel declares them for migrations and the SQL paths, and the one mapping between
a row and the domain's Session and StoredDetection: the detection's columns, from which every SQL path
and conversion of a detection is derived."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Float, Index, Integer, String, TypeDecorator
from sqlmodel import Field, SQLModel

from testpulse.domain.protocol import DetectionIn
from testpulse.domain.sessions import Session, Status, StoredDetection


class SessionRow(SQLModel, table=True):
    __tablename__ = "test_sessions"
    # Counts by status, and retention's walk over stopped sessions by age (migration 0003).
    __table_args__ = (Index("ix_test_sessions_status_updated_at", "status", "updated_at"),)

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(default="", max_length=200)
    status: str = Field(max_length=16)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The session row is the seq counter: appends bump it in the transaction that inserts the rows.
    last_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class DetectionRow(SQLModel, table=True):
    __tablename__ = "detections"
    # NULLs are distinct in a unique index (SQLite and PostgreSQL): only detections given an id are
    # held to one per session. Appends find stored ids first, under the session's lock; the index
    # is the backstop that makes a second copy impossible whatever a writer does.
    __table_args__ = (Index("uq_detections_session_id_id", "session_id", "id", unique=True),)

    session_id: str = Field(primary_key=True, foreign_key="test_sessions.id", max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    label: str = Field(max_length=128)
    confidence: float = Field(sa_column=Column(Float, nullable=False))
    bbox: list[float] | None = Field(default=None, sa_column=Column(JSON))
    frame: int | None = Field(default=None, sa_column=Column(BigInteger))
    # JSON keeps the publisher's number exactly as sent (int stays int), so `ts` echoes unchanged.
    ts: float | None = Field(default=None, sa_column=Column(JSON))
    attributes: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # The publisher's idempotency key (PROTOCOL.md 1.1); added by migration 0002.
    id: str | None = Field(default=None, max_length=64)


class AuditRow(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(index=True, max_length=64)
    action: str = Field(max_length=16)
    actor: str = Field(max_length=256)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str = Field(max_length=16)
    reason: str | None = Field(default=None, max_length=500)
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class SchemaVersionRow(SQLModel, table=True):
    __tablename__ = "schema_version"

    version: int = Field(primary_key=True)
    applied_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


sessions_t = SessionRow.__table__  # type: ignore[attr-defined]
detections_t = DetectionRow.__table__  # type: ignore[attr-defined]
audit_t = AuditRow.__table__  # type: ignore[attr-defined]


def aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; everything is stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def session_from_row(row: Any) -> Session:
    return Session(
        id=row.id,
        name=row.name,
        status=Status(row.status),
        created_at=aware(row.created_at),
        updated_at=aware(row.updated_at),
        last_seq=row.last_seq,
        config=row.config or {},
    )


# ---- The detection's columns, once --------------------------------------------------------------
# DetectionRow above is the one declaration of a detection's columns. Every path that writes or
# reads them (the engine's, sqlite3's on the writer thread, asyncpg's, a group commit's shares, a
# detection from another node) derives its SQL and its conversion from DETECTION_COLUMNS, at import:
# the SQL text is built once and each conversion is one function compiled once, so a hot path does
# per row exactly what a hand-written one would. What a column is made of comes from its SQL type;
# only where the store itself assigns a value is said here.

ASSIGNED = {"session_id": "session", "seq": "seq", "received_at": "clock"}  # the rest: the publisher's item


@dataclass(frozen=True, slots=True)
class DetectionColumn:
    name: str  # the column, the StoredDetection field and the detection_event key
    source: str  # "session", "seq", "clock" (the store's now) or "item" (DetectionIn's field of that name)
    kind: str  # "text", "int", "float", "json" or "moment": how each driver and the wire carry it
    nullable: bool
    pg_type: str  # asyncpg's element type for an array of its values (JSON travels as text, cast ::json)


def _kind(column: Any) -> str:
    sql_type = column.type.impl_instance if isinstance(column.type, TypeDecorator) else column.type
    if isinstance(sql_type, JSON):
        return "json"
    if isinstance(sql_type, DateTime):
        return "moment"
    if isinstance(sql_type, Float):
        return "float"
    if isinstance(sql_type, Integer):
        return "int"
    if isinstance(sql_type, String):
        return "text"
    raise TypeError(f"detections.{column.name}: no mapping for {column.type!r}")


PG_TYPES = {"text": "varchar", "int": "bigint", "float": "float8", "json": "text", "moment": "timestamptz"}

DETECTION_COLUMNS: tuple[DetectionColumn, ...] = tuple(
    DetectionColumn(c.name, ASSIGNED.get(c.name, "item"), _kind(c), bool(c.nullable), PG_TYPES[_kind(c)])
    for c in detections_t.columns
)
DETECTION_NAMES = tuple(c.name for c in DETECTION_COLUMNS)
ITEM_COLUMNS = tuple(c for c in DETECTION_COLUMNS if c.source == "item")


def _check_against_domain() -> None:
    """The table, the domain's StoredDetection (positional, in column order) and a publisher's
    DetectionIn must agree, or nothing derived here is right: fail at import, not on a row."""
    stored = tuple(f.name for f in dataclasses.fields(StoredDetection) if f.name != "duplicate")
    if stored != DETECTION_NAMES:
        raise RuntimeError(f"detections columns {DETECTION_NAMES} != StoredDetection fields {stored}")
    given = tuple(f.name for f in dataclasses.fields(DetectionIn))
    if given != tuple(c.name for c in ITEM_COLUMNS):
        raise RuntimeError(f"detections item columns {[c.name for c in ITEM_COLUMNS]} != DetectionIn fields {given}")


_check_against_domain()


def derive(name: str, params: str, body: str | list[str], namespace: dict[str, Any]) -> Callable[..., Any]:
    """A function compiled once from the column list, as dataclasses and namedtuple build theirs:
    `body` is its one expression (or its statements) over `params`, with `namespace` in scope."""
    lines = [f"return {body}"] if isinstance(body, str) else body
    scope = {"StoredDetection": StoredDetection, **namespace}
    exec("\n    ".join([f"def {name}({params}):", *lines]) + "\n", scope)
    function: Callable[..., Any] = scope[name]
    return function


def tuple_of(expressions: Iterable[str]) -> str:
    return "(" + "".join(f"{e}, " for e in expressions) + ")"


def detection_of(expressions: Iterable[str]) -> str:
    return "StoredDetection(" + ", ".join(expressions) + ")"


def columns_sql(prefix: str = "", columns: Iterable[DetectionColumn] = DETECTION_COLUMNS) -> str:
    return ", ".join(prefix + c.name for c in columns)


def _from_item(c: DetectionColumn) -> str:
    return {"session": "session_id", "seq": "seq", "clock": "now"}.get(c.source, f"item.{c.name}")


# A fresh item of a group commit as the stored detection it becomes (store/shares.py).
detection_from_item: Callable[[str, int, DetectionIn, datetime], StoredDetection] = derive(
    "detection_from_item", "session_id, seq, item, now", detection_of(map(_from_item, DETECTION_COLUMNS)), {}
)

# A row the engine read (SQLite hands timestamps back without a zone), and a detection as the
# engine's insert() takes it.
detection_from_row: Callable[[Any], StoredDetection] = derive(
    "detection_from_row",
    "row",
    detection_of(f"aware(row.{c.name})" if c.kind == "moment" else f"row.{c.name}" for c in DETECTION_COLUMNS),
    {"aware": aware},
)
detection_row: Callable[[StoredDetection], dict[str, Any]] = derive(
    "detection_row", "d", "{" + ", ".join(f"{n!r}: d.{n}" for n in DETECTION_NAMES) + "}", {}
)


def _wire_moment(value: Any) -> datetime:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _wire_lines(c: DetectionColumn) -> list[str]:
    """How a column's value is read from a detection_event, from what the column holds: the
    store's own columns and the non-null ones are required, and a value must be of the column's
    type (a JSON column's any JSON; seq from 1)."""
    if c.source == "session":
        return []
    required = c.source != "item" or not c.nullable
    value = f"data[{c.name!r}]" if required else f"data.get({c.name!r})"
    if c.kind == "moment":
        return [f"v_{c.name} = wire_moment({value})"]
    check = {"int": "isinstance(v, int)", "float": "isinstance(v, int | float)", "text": "isinstance(v, str)"}.get(
        c.kind
    )
    lines = [f"v_{c.name} = {value}"]
    if check is not None:
        check = check.replace("v", f"v_{c.name}", 1) + (f" and v_{c.name} >= 1" if c.source == "seq" else "")
        lines.append(f"if not ({check}):" if required else f"if v_{c.name} is not None and not ({check}):")
        lines.append("    return None")
    return lines


def _wire_field(c: DetectionColumn) -> str:
    if c.source == "session":
        return "session_id"
    return f"float(v_{c.name})" if c.kind == "float" else f"v_{c.name}"


# A detection from another node (bus/broker.py), or None when the message is malformed: the
# inverse of StoredDetection.event().
detection_from_wire: Callable[[object, str], StoredDetection | None] = derive(
    "detection_from_wire",
    "data, session_id",
    [
        "if not isinstance(data, dict):",
        "    return None",
        "try:",
        *(f"    {line}" for c in DETECTION_COLUMNS for line in _wire_lines(c)),
        f"    return {detection_of(map(_wire_field, DETECTION_COLUMNS))}",
        "except (KeyError, ValueError, TypeError):",
        "    return None",
    ],
    {"wire_moment": _wire_moment},
)
