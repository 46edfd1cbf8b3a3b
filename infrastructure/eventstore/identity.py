"""The event store's identity: a random id made once per PostgreSQL event store database.

Log positions and the relay's chains mean something only within one event store, so what
the relay publishes names the store it read (``streaming.envelope``). The id lives in a
one-row table beside the events; whichever process comes first creates it, and every other
reads that one (the row's key admits a single row, and the insert yields to one already
there), so processes starting together on a fresh database agree on it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.sql import SQL, Composed, Identifier

from daybook.infrastructure.own_schema import IN_OWN_SCHEMA

IDENTITY_TABLE = "daybook_store"
#: Advisory lock key taken while creating daybook's event store tables (the recorder's too:
#: PostgreSQL does not serialise concurrent CREATE TABLE IF NOT EXISTS of one table).
CREATE_TABLES_LOCK = 0x6461796B  # "dayk"


def create_statements(schema: str | None = None) -> list[Composed]:
    """The table and its one row (idempotent; any number of processes at once)."""
    table = Identifier(IDENTITY_TABLE) if schema is None else Identifier(schema, IDENTITY_TABLE)
    return [
        SQL(
            "CREATE TABLE IF NOT EXISTS {} (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
            "store_id uuid NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        ).format(table),
        SQL("INSERT INTO {} (store_id) VALUES (gen_random_uuid()) ON CONFLICT DO NOTHING").format(
            table
        ),
    ]


async def ensure_store_id(conn: psycopg.AsyncConnection[Any]) -> str:
    """The store's identity, made if it has none yet (``conn`` in autocommit)."""
    cur = await conn.execute(f"SELECT {IN_OWN_SCHEMA}", (IDENTITY_TABLE,))
    found = await cur.fetchone()
    if found is None or found[0] is None:
        # In turn with the recorder's and other relays' table creation.
        await conn.execute("SELECT pg_advisory_lock(%s)", (CREATE_TABLES_LOCK,))
        try:
            for statement in create_statements():
                await conn.execute(statement)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (CREATE_TABLES_LOCK,))
    else:
        # The table exists; its row too, unless a creator died between the two statements.
        await conn.execute(create_statements()[1])
    cur = await conn.execute(SQL("SELECT store_id FROM {}").format(Identifier(IDENTITY_TABLE)))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])
