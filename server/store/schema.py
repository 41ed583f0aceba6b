"""Schema migrations: where the database's schema stands against this build's, and bringing it up.

The revisions live in server/store/migrations (shipped in the package). Everything here runs on a
synchronous SQLAlchemy Connection inside a transaction the caller owns (Database.migrate), so
PostgreSQL migrates through the async engine's `run_sync` and SQLite on its writer thread.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

MIGRATIONS = Path(__file__).with_name("migrations")
# The revision equal to the schema of the builds before Alembic (see versions/0001_initial.py).
BEFORE_ALEMBIC = "0001"
# A table those builds created: its presence without alembic_version marks such a database.
BEFORE_ALEMBIC_MARKER = "test_sessions"


class SchemaError(RuntimeError):
    """The database's schema is one this node must not run on."""


class Standing(enum.Enum):
    EMPTY = "empty"
    OLDER = "older"
    CURRENT = "current"
    NEWER = "newer"


@dataclass(frozen=True, slots=True)
class SchemaState:
    revision: str | None  # None: no schema at all
    head: str
    standing: Standing
    # Made by a build before Alembic: has the tables, but no alembic_version to say so.
    unstamped: bool = False


def config(url: str | None = None, output: io.StringIO | None = None) -> Config:
    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(config()).get_current_head()
    assert head is not None, "server/store/migrations has no revisions"
    return head


def state(conn: Connection) -> SchemaState:
    head = head_revision()
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None:
        if inspect(conn).has_table(BEFORE_ALEMBIC_MARKER):
            return SchemaState(BEFORE_ALEMBIC, head, _standing(BEFORE_ALEMBIC, head), unstamped=True)
        return SchemaState(None, head, Standing.EMPTY)
    return SchemaState(revision, head, _standing(revision, head))


def _standing(revision: str, head: str) -> Standing:
    if revision == head:
        return Standing.CURRENT
    known = {script.revision for script in ScriptDirectory.from_config(config()).walk_revisions()}
    return Standing.OLDER if revision in known else Standing.NEWER


def upgrade(conn: Connection, target: str = "head") -> SchemaState:
    """Migrate to `target` on `conn` (in the caller's transaction); the state afterwards."""
    before = state(conn)
    if before.standing is Standing.NEWER:
        raise SchemaError(newer_message(before))
    cfg = config()
    cfg.attributes["connection"] = conn
    if before.unstamped:
        command.stamp(cfg, BEFORE_ALEMBIC)
    command.upgrade(cfg, target)
    return state(conn)


def ensure_current(conn: Connection, *, migrate: bool) -> SchemaState:
    """What a node does at start: run on a current schema; set up an empty database; migrate an
    older one when `migrate` is on (development, the local cluster), else refuse with the remedy."""
    found = state(conn)
    if found.standing is Standing.CURRENT:
        return found
    if found.standing is Standing.NEWER:
        raise SchemaError(newer_message(found))
    if found.standing is Standing.OLDER and not migrate:
        raise SchemaError(
            f"the database schema is at revision {found.revision}, older than this build's {found.head};"
            " run `testpulse migrate` (with this build's TESTPULSE_DATABASE_URL) before starting it"
        )
    return upgrade(conn)


def newer_message(found: SchemaState) -> str:
    return (
        f"the database schema is at revision {found.revision}, which this build does not know (its newest"
        f" is {found.head}): it was migrated by a newer testpulse; upgrade testpulse"
    )


def offline_sql(url: str) -> str:
    """The SQL that takes an empty database of `url`'s dialect to head, without connecting."""
    output = io.StringIO()
    command.upgrade(config(url, output), "head", sql=True)
    return output.getvalue()
