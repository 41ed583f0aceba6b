"""The tables, as SQLModel declares them for migrations and the SQL paths, and the one mapping between
a row and the domain's Session and StoredDetection."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Float, Index
from sqlmodel import Field, SQLModel

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


def detection_from_row(row: Any) -> StoredDetection:
    return StoredDetection(
        session_id=row.session_id,
        seq=row.seq,
        label=row.label,
        confidence=row.confidence,
        bbox=row.bbox,
        frame=row.frame,
        ts=row.ts,
        attributes=row.attributes,
        received_at=aware(row.received_at),
        id=row.id,
    )


def detection_row(d: StoredDetection) -> dict[str, Any]:
    return {
        "session_id": d.session_id,
        "seq": d.seq,
        "label": d.label,
        "confidence": d.confidence,
        "bbox": d.bbox,
        "frame": d.frame,
        "ts": d.ts,
        "attributes": d.attributes,
        "received_at": d.received_at,
        "id": d.id,
    }
