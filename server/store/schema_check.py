"""Whether a database's schema is this build's, asked once or until it is: `testpulse migrate --check`."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from testpulse.domain.protocol import ProtocolError
from testpulse.store import schema
from testpulse.store.auto import open_database
from testpulse.store.database import Database


class Verdict(enum.IntEnum):
    """What a check found, as the exit code of `testpulse migrate --check` (docs/operations.md)."""

    CURRENT = 0
    PENDING = 1  # empty or older: this build's `testpulse migrate` brings it to current
    NEWER = 3  # migrated by a later release: this build never runs on it, so waiting cannot help
    UNAVAILABLE = 4  # the database did not answer


@dataclass(frozen=True, slots=True)
class Finding:
    verdict: Verdict
    message: str
    revision: str | None = None


def judge(found: schema.SchemaState) -> Finding:
    if found.standing is schema.Standing.CURRENT:
        return Finding(Verdict.CURRENT, f"database schema at revision {found.revision}, this build's newest")
    if found.standing is schema.Standing.NEWER:
        return Finding(Verdict.NEWER, schema.newer_message(found), found.revision)
    if found.standing is schema.Standing.EMPTY:
        message = f"the database has no schema yet (this build's is revision {found.head}); run `testpulse migrate`"
        return Finding(Verdict.PENDING, message)
    return Finding(
        Verdict.PENDING,
        f"the database schema is at revision {found.revision}, older than this build's {found.head};"
        " run `testpulse migrate`",
        found.revision,
    )


class SchemaCheck:
    """Reads where the schema of `url` stands against this build's and changes nothing: no DDL, no
    DDL lock (a migration in progress is seen as not yet done, never waited behind), and a SQLite
    file that does not exist yet counts as empty instead of being created."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._db: Database | None = None

    def _sqlite_file_missing(self) -> bool:
        if not self.url.startswith("sqlite"):
            return False
        return not Path(make_url(self.url).database or "").exists()

    async def once(self) -> Finding:
        if self._db is None:
            if self._sqlite_file_missing():
                return judge(schema.SchemaState(None, schema.head_revision(), schema.Standing.EMPTY))
            self._db = open_database(self.url, pool_size=1, timeout=self.timeout)
        try:
            return judge(await self._db.schema_state())
        except ProtocolError as exc:
            return Finding(Verdict.UNAVAILABLE, f"could not read the schema: {exc.message}")

    async def until_current(
        self, *, within: float, interval: float, report: Callable[[Finding, float], None]
    ) -> Finding:
        """Check every `interval` seconds until the schema is current, for at most `within` seconds;
        the last finding. A newer schema ends the wait at once. `report(finding, elapsed)` hears the
        first finding, every change, and a reminder every REMIND_SECONDS while nothing changes."""
        started = time.monotonic()
        reported: tuple[Finding, float] | None = None
        while True:
            finding = await self.once()
            elapsed = time.monotonic() - started
            if finding.verdict in (Verdict.CURRENT, Verdict.NEWER) or elapsed >= within:
                return finding
            if reported is None or reported[0] != finding or elapsed - reported[1] >= REMIND_SECONDS:
                report(finding, elapsed)
                reported = (finding, elapsed)
            await asyncio.sleep(min(interval, max(0.0, within - elapsed)))

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None


# Long enough not to flood an initContainer's log, short enough that `kubectl logs` shows it is alive.
REMIND_SECONDS = 30.0
