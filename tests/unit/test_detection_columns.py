"""The detection's columns are declared once (store/tables.py's DetectionRow): every SQL statement and
conversion derived from them names exactly the table's columns, and the domain agrees with the table."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime

import pytest

from testpulse.bus.broker import detection_from_wire
from testpulse.domain.protocol import DetectionIn
from testpulse.domain.sessions import StoredDetection
from testpulse.store import postgres, sqlite, tables

pytestmark = pytest.mark.unit

TABLE_COLUMNS = [column.name for column in tables.DetectionRow.__table__.columns]  # type: ignore[attr-defined]
AT = datetime(2026, 11, 1, 12, 30, 15, 123000, tzinfo=UTC)
FULL = StoredDetection("s", 7, "car", 0.25, [1.0, 2.0, 3.0, 4.0], 9, 1_700_000_000_000, {"k": [1, "v"]}, AT, "d-1")


def names(listing: str) -> list[str]:
    """The column names of a SQL list such as `d.session_id, b.base + d.k, d.bbox::json, $13`."""
    return [part.strip().removeprefix("d.") for part in listing.split(",")]


def insert_columns(sql: str) -> list[str]:
    found = re.search(r"INSERT INTO detections \(([^)]*)\)", sql)
    assert found is not None, sql
    return names(found.group(1))


def select_columns(sql: str) -> list[str]:
    found = re.search(r"SELECT (.*?) FROM detections", sql, re.S)
    assert found is not None, sql
    return names(found.group(1))


def test_the_derived_column_list_is_the_tables_in_its_order() -> None:
    assert list(tables.DETECTION_NAMES) == TABLE_COLUMNS
    assert tables.detections_t.name == "detections"


def test_every_sqlite3_statement_names_every_column_of_the_table() -> None:
    assert insert_columns(sqlite.INSERT_DETECTION_SQL) == TABLE_COLUMNS
    assert sqlite.INSERT_DETECTION_SQL.count("?") == len(TABLE_COLUMNS)
    assert select_columns(sqlite.STORED_WITH_IDS_SQL) == TABLE_COLUMNS


def test_every_asyncpg_statement_names_every_column_of_the_table() -> None:
    assert insert_columns(postgres.APPEND) == TABLE_COLUMNS
    assert select_columns(postgres.STORED_WITH_IDS) == TABLE_COLUMNS
    # since() knows the session: every other column, in order.
    assert select_columns(postgres.DETECTIONS_SINCE) == TABLE_COLUMNS[1:]
    # The INSERT's SELECT gives one value per column, and the unnest one array per row column.
    inserted = re.search(r"INSERT INTO detections \([^)]*\)\s*SELECT (.*?)\n\s*FROM unnest", postgres.APPEND, re.S)
    assert inserted is not None
    assert len(inserted.group(1).split(",")) == len(TABLE_COLUMNS)
    arrays = re.search(r"FROM unnest\(([^)]*)\)\s*AS d\(([^)]*)\)", postgres.APPEND)
    assert arrays is not None
    given = [f.name for f in dataclasses.fields(DetectionIn)]
    assert names(arrays.group(2)) == ["session_id", "k", *given]
    assert len(arrays.group(1).split(",")) == len(given) + 2


def test_the_domain_holds_the_same_fields_as_the_table() -> None:
    stored = [f.name for f in dataclasses.fields(StoredDetection) if f.name != "duplicate"]
    assert stored == TABLE_COLUMNS
    assert [c.name for c in tables.ITEM_COLUMNS] == [f.name for f in dataclasses.fields(DetectionIn)]
    assert set(FULL.event()) == set(TABLE_COLUMNS)


def test_each_derived_conversion_carries_every_column() -> None:
    row = tables.detection_row(FULL)
    assert list(row) == TABLE_COLUMNS
    assert tables.detection_from_row(type("Row", (), row)) == FULL
    item = DetectionIn("car", 0.25, [1.0, 2.0, 3.0, 4.0], 9, 1_700_000_000_000, {"k": [1, "v"]}, "d-1")
    assert tables.detection_from_item("s", 7, item, AT) == FULL


def test_a_detection_crosses_nodes_with_every_column() -> None:
    assert detection_from_wire(FULL.event(), "s") == FULL
    without_options = dataclasses.replace(FULL, bbox=None, frame=None, ts=None, attributes=None, id=None)
    assert detection_from_wire(without_options.event(), "s") == without_options


@pytest.mark.parametrize(
    "change",
    [{"seq": 0}, {"seq": "7"}, {"label": 3}, {"confidence": "high"}, {"id": 12}, {"received_at": "yesterday"}],
)
def test_a_malformed_detection_from_another_node_is_dropped(change: dict[str, object]) -> None:
    assert detection_from_wire({**FULL.event(), **change}, "s") is None


@pytest.mark.parametrize("missing", ["seq", "label", "confidence", "received_at"])
def test_a_detection_from_another_node_without_a_required_field_is_dropped(missing: str) -> None:
    event = FULL.event()
    del event[missing]
    assert detection_from_wire(event, "s") is None
