"""Schema migrations on real databases: `testpulse migrate` (and `--sql`, and `--check` with and
without `--wait`), the initial revision against the schema of the builds before Alembic, and nodes
that migrate or refuse at start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel
from support.nodes import BASE_ENV
from support.processes import free_port, run_node
from support.processes import testpulse_command as command_line

import testpulse.store.tables  # noqa: F401 - the tables on SQLModel.metadata
from testpulse.store import schema

pytestmark = pytest.mark.migrations

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROOT = Path(__file__).parent.parent.parent
T = TypeVar("T")
DATABASES = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


# ---- databases -----------------------------------------------------------------------------------


@pytest.fixture
async def empty_database(request: pytest.FixtureRequest, tmp_path: Path, postgres: Any) -> AsyncIterator[str]:
    """The async URL of an empty database: a new SQLite file, or a new database on the run's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'testpulse.db'}"
        return
    server_url = make_url(await postgres.url())
    name = f"migrations_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield server_url.set(database=name).render_as_string(hide_password=False)
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


def databases(test: Callable[..., Any]) -> Callable[..., Any]:
    return pytest.mark.parametrize("empty_database", DATABASES, indirect=True)(test)


async def on(url: str, work: Callable[[Connection], T]) -> T:
    """Run `work` in one committed transaction on `url`."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await engine.dispose()


def dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def create_as_before_alembic(url: str) -> Callable[[Connection], None]:
    """The schema exactly as the builds before Alembic created it (tests/fixtures), plus one session
    with one detection."""
    statements = (FIXTURES / f"schema_before_alembic.{dialect(url)}.sql").read_text()

    def create(conn: Connection) -> None:
        for statement in statements.split(";"):
            body = "\n".join(line for line in statement.splitlines() if not line.startswith("--")).strip()
            if body:
                conn.exec_driver_sql(body)
        conn.execute(
            text(
                "INSERT INTO test_sessions (id, name, status, config, last_seq, created_at, updated_at)"
                " VALUES ('s1', 'kept', 'running', '{}', 1, '2026-11-01 00:00:00', '2026-11-01 00:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO detections (session_id, seq, label, confidence, received_at)"
                " VALUES ('s1', 1, 'car', 0.5, '2026-11-01 00:00:00')"
            )
        )

    return create


def shape(conn: Connection) -> dict[str, Any]:
    """Tables, columns, keys and indexes as the database reports them (alembic_version aside)."""
    insp = inspect(conn)
    tables: dict[str, Any] = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        tables[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default")) for c in insp.get_columns(table)],
            "primary key": insp.get_pk_constraint(table)["constrained_columns"],
            "foreign keys": [
                (fk["constrained_columns"], fk["referred_table"], fk["referred_columns"])
                for fk in insp.get_foreign_keys(table)
            ],
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)
            ),
        }
    return tables


def differences_from_the_models(conn: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(conn), SQLModel.metadata))


def revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def run_testpulse(url: str, *args: str) -> tuple[int, str]:
    """Run a testpulse command against `url` to completion; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTPULSE_")}
    env |= {**BASE_ENV, "TESTPULSE_DATABASE_URL": url}
    process = await asyncio.create_subprocess_exec(
        *command_line(),
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


# ---- testpulse migrate ---------------------------------------------------------------------------


@databases
async def test_migrate_takes_an_empty_database_to_this_builds_schema(empty_database: str) -> None:
    code, output = await run_testpulse(empty_database, "migrate")
    assert code == 0, output
    assert f"revision {schema.head_revision()}" in output
    assert await on(empty_database, revision) == schema.head_revision()
    assert await on(empty_database, differences_from_the_models) == []
    again = await run_testpulse(empty_database, "migrate")
    assert again[0] == 0, again[1]


@databases
async def test_the_initial_revision_is_the_schema_of_the_builds_before_alembic(
    empty_database: str, tmp_path: Path
) -> None:
    await on(empty_database, lambda conn: schema.upgrade(conn, schema.BEFORE_ALEMBIC))
    migrated = await on(empty_database, shape)
    if dialect(empty_database) == "sqlite":
        before = f"sqlite+aiosqlite:///{tmp_path / 'before.db'}"
    else:
        before = empty_database.rsplit("/", 1)[0] + f"/before_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(make_url(empty_database).set(drivername="postgresql").render_as_string(False))
        try:
            await admin.execute(f"CREATE DATABASE {make_url(before).database}")
        finally:
            await admin.close()
    await on(before, create_as_before_alembic(before))
    assert await on(before, shape) == migrated


@databases
async def test_migrate_upgrades_a_database_made_before_alembic_in_place(empty_database: str) -> None:
    await on(empty_database, create_as_before_alembic(empty_database))
    code, output = await run_testpulse(empty_database, "migrate")
    assert code == 0, output
    assert await on(empty_database, revision) == schema.head_revision()
    assert await on(empty_database, differences_from_the_models) == []
    rows = await on(
        empty_database, lambda c: c.execute(text("SELECT session_id, seq, label, id FROM detections")).all()
    )
    assert [tuple(r) for r in rows] == [("s1", 1, "car", None)]
    versions = await on(empty_database, lambda c: c.execute(text("SELECT version FROM schema_version")).all())
    assert [tuple(r) for r in versions] == [(1,)], "builds before Alembic refuse a schema_version above 1"


@pytest.mark.parametrize("empty_database", [DATABASES[1]], indirect=True)
async def test_concurrent_migrations_of_an_empty_postgres_take_turns(empty_database: str) -> None:
    outcomes = await asyncio.gather(*(run_testpulse(empty_database, "migrate") for _ in range(3)))
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    assert await on(empty_database, revision) == schema.head_revision()


@pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite:///{tmp}/never-created.db", "postgresql+asyncpg://nobody@127.0.0.1:1/none"]
)
async def test_migrate_sql_prints_the_ddl_without_touching_a_database(url: str, tmp_path: Path) -> None:
    code, output = await run_testpulse(url.format(tmp=tmp_path), "migrate", "--sql")
    assert code == 0, output
    for statement in (
        "CREATE TABLE test_sessions",
        "CREATE TABLE detections",
        "CREATE TABLE audit_log",
        "CREATE TABLE schema_version",
        "CREATE TABLE alembic_version",
        "ALTER TABLE detections ADD COLUMN id VARCHAR(64)",
        "CREATE UNIQUE INDEX uq_detections_session_id_id ON detections (session_id, id)",
    ):
        assert statement in output, statement
    assert not (tmp_path / "never-created.db").exists()


# ---- testpulse migrate --check ---------------------------------------------------------------------


def sqlite_file_exists(url: str) -> bool:
    return Path(make_url(url).database or "").exists()


def from_the_future(conn: Connection) -> None:
    schema.upgrade(conn)
    conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))


@databases
async def test_migrate_check_fails_until_migrate_has_run_and_changes_nothing(empty_database: str) -> None:
    code, output = await run_testpulse(empty_database, "migrate", "--check")
    assert code == 1, output
    assert "no schema yet" in output and "run `testpulse migrate`" in output, output
    if dialect(empty_database) == "sqlite":
        assert not sqlite_file_exists(empty_database), "a check created the SQLite file"
    else:
        assert await on(empty_database, lambda c: inspect(c).get_table_names()) == []
    code, output = await run_testpulse(empty_database, "migrate")
    assert code == 0, output
    code, output = await run_testpulse(empty_database, "migrate", "--check")
    assert code == 0, output
    assert f"database schema at revision {schema.head_revision()}, this build's newest" in output, output


@databases
async def test_migrate_check_reports_an_older_schema_without_migrating_it(empty_database: str) -> None:
    await on(empty_database, create_as_before_alembic(empty_database))
    code, output = await run_testpulse(empty_database, "migrate", "--check")
    assert code == 1, output
    assert f"revision {schema.BEFORE_ALEMBIC}, older than this build's {schema.head_revision()}" in output, output
    assert await on(empty_database, revision) is None, "a check changed the schema"


@databases
async def test_migrate_check_says_a_newer_schema_needs_a_newer_build_and_does_not_wait_for_it(
    empty_database: str,
) -> None:
    await on(empty_database, from_the_future)
    started = time.monotonic()
    code, output = await run_testpulse(empty_database, "migrate", "--check", "--wait", "60")
    assert code == 3, output
    assert "revision 9999" in output and "upgrade testpulse" in output, output
    assert time.monotonic() - started < 30, "waited for a schema that waiting cannot fix"


@databases
async def test_migrate_check_wait_returns_once_another_process_has_migrated(empty_database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTPULSE_")}
    env |= {**BASE_ENV, "TESTPULSE_DATABASE_URL": empty_database}
    waiter = await asyncio.create_subprocess_exec(
        *command_line(),
        "migrate",
        "--check",
        "--wait",
        "90",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert waiter.stdout is not None
    try:
        first = await asyncio.wait_for(waiter.stdout.readline(), 30)
        assert b"waiting for the schema" in first and b"no schema yet" in first, first
        assert waiter.returncode is None, "gave up instead of waiting"
        code, output = await run_testpulse(empty_database, "migrate")
        assert code == 0, output
        rest = await asyncio.wait_for(waiter.stdout.read(), 30)
        assert await asyncio.wait_for(waiter.wait(), 10) == 0, rest
        assert f"revision {schema.head_revision()}, this build's newest" in rest.decode(), rest
    finally:
        with contextlib.suppress(ProcessLookupError):
            waiter.kill()
        await waiter.wait()


@databases
async def test_migrate_check_wait_gives_up_after_its_bound_and_says_why(empty_database: str) -> None:
    started = time.monotonic()
    code, output = await run_testpulse(empty_database, "migrate", "--check", "--wait", "3")
    elapsed = time.monotonic() - started
    assert code == 1, output
    assert "gave up after 3 s: the database has no schema yet" in output, output
    assert elapsed >= 3, f"gave up after {elapsed:.1f} s, before its bound"


async def test_migrate_check_of_a_database_that_does_not_answer_exits_4() -> None:
    code, output = await run_testpulse(
        "postgresql+asyncpg://nobody@127.0.0.1:1/none", "migrate", "--check", "--wait", "1"
    )
    assert code == 4, output
    assert "gave up after 1 s: could not read the schema" in output, output
    assert "Connect call failed" in output or "Connection refused" in output, "the driver's reason is logged"


async def test_migrate_wait_without_check_is_a_usage_error(tmp_path: Path) -> None:
    code, output = await run_testpulse(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", "migrate", "--wait", "5")
    assert code == 2 and "--wait needs --check" in output, output
    assert not (tmp_path / "x.db").exists()


# ---- nodes at start ------------------------------------------------------------------------------


async def node_exit(url: str, **env: str) -> tuple[int, str]:
    """Start a node that is expected to refuse to start; its exit code and output."""
    environment = {**BASE_ENV, "TESTPULSE_DATABASE_URL": url, **env}
    child = {k: v for k, v in os.environ.items() if not k.startswith("TESTPULSE_")} | environment
    process = await asyncio.create_subprocess_exec(
        *command_line(),
        "serve",
        "--port",
        str(free_port()),
        env=child,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@databases
async def test_a_node_refuses_a_schema_older_than_its_own_and_says_to_run_migrate(empty_database: str) -> None:
    await on(empty_database, create_as_before_alembic(empty_database))
    code, output = await node_exit(empty_database, TESTPULSE_MIGRATE_ON_START="false")
    assert code != 0
    assert "older than this build's" in output and "run `testpulse migrate`" in output, output[-2000:]
    assert await on(empty_database, revision) is None, "a refusing node changed the schema"


@databases
async def test_a_development_node_migrates_an_older_schema_for_you(empty_database: str) -> None:
    await on(empty_database, create_as_before_alembic(empty_database))
    async with run_node({**BASE_ENV, "TESTPULSE_DATABASE_URL": empty_database}):
        pass
    assert await on(empty_database, revision) == schema.head_revision()


@databases
async def test_a_node_refuses_a_schema_newer_than_its_own(empty_database: str) -> None:
    await on(empty_database, from_the_future)
    code, output = await node_exit(empty_database)
    assert code != 0
    assert "revision 9999" in output and "upgrade testpulse" in output, output[-2000:]


def test_only_development_migrates_by_default() -> None:
    from testpulse.settings import Settings

    url = {"TESTPULSE_DATABASE_URL": "sqlite+aiosqlite:///x.db"}
    assert Settings.from_env(url).migrates_on_start
    assert not Settings.from_env({**url, "TESTPULSE_MIGRATE_ON_START": "false"}).migrates_on_start
    assert sys.modules["testpulse.store.schema"] is schema
