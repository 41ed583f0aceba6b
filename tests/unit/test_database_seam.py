"""The Database seam: one implementation per database, chosen once from the (normalised) URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from testpulse.settings import Settings
from testpulse.store.auto import open_database
from testpulse.store.postgres import PostgresDatabase
from testpulse.store.sqlite import SqliteDatabase

pytestmark = pytest.mark.unit


async def test_a_sqlite_url_in_any_accepted_form_opens_the_sqlite_implementation(tmp_path: Path) -> None:
    settings = Settings.from_env({"TESTPULSE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    db = open_database(settings.database_url)
    try:
        assert type(db) is SqliteDatabase and db.is_sqlite
        await db.ping()
    finally:
        await db.close()


async def test_a_postgres_url_in_any_accepted_form_opens_the_postgres_implementation() -> None:
    # Building the engine does not connect: no server is needed to see which implementation it is.
    db = open_database(Settings.from_env({"TESTPULSE_DATABASE_URL": "postgres://app@db.example/tp"}).database_url)
    try:
        assert type(db) is PostgresDatabase and not db.is_sqlite
    finally:
        await db.close()


def test_a_url_no_implementation_serves_is_refused() -> None:
    with pytest.raises(ValueError, match="mysql"):
        open_database("mysql://app@db.example/tp")
