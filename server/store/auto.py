"""Which Database implementation a URL gets, decided by its scheme."""

from __future__ import annotations

from testpulse.store.database import Database


def database_class(url: str) -> type[Database]:
    """The implementation for `url`, in one of the forms Settings normalise every accepted URL to.
    Imported only when chosen: a SQLite node never loads asyncpg."""
    if url.startswith("sqlite+aiosqlite://"):
        from testpulse.store.sqlite import SqliteDatabase

        return SqliteDatabase
    if url.startswith("postgresql+asyncpg://"):
        from testpulse.store.postgres import PostgresDatabase

        return PostgresDatabase
    raise ValueError(f"no store for {url.split('://')[0]!r} URLs (Settings normalises the accepted forms)")


def open_database(url: str, *, pool_size: int = 10, timeout: float = 5.0) -> Database:
    return database_class(url)(url, pool_size=pool_size, timeout=timeout)
