"""Alembic environment: runs the revisions in versions/ on a connection the caller hands over.

testpulse runs migrations itself (`testpulse migrate`, node start-up; see server/store/schema.py), on a
connection of its own async engine inside one transaction. Offline (`--sql`) it renders the SQL
for the URL's dialect without connecting. Run bare (`alembic` with a config naming this folder,
e.g. to write a new revision), it connects through the async engine of `sqlalchemy.url`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import testpulse.store.tables  # noqa: F401 - registers the tables on SQLModel.metadata (for autogenerate)

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=SQLModel.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_through_async_engine(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    run_on(given)
else:
    asyncio.run(run_through_async_engine(str(config.get_main_option("sqlalchemy.url"))))
