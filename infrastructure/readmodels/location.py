"""Where read models live: a database chosen by URL, by default the event store's own."""

from __future__ import annotations

import tempfile

from daybook.infrastructure.readmodels.postgres import PostgresStore
from daybook.infrastructure.readmodels.sqlite import SqliteStore
from daybook.infrastructure.readmodels.store import ReadStore, ReadStoreError
from daybook.infrastructure.urls import scheme, sqlite_path


def open_store(url: str) -> ReadStore:
    """A connection to the read-model database at ``url`` (postgresql:// or sqlite:///)."""
    kind = scheme(url)
    if kind == "postgresql":
        return PostgresStore(url)
    if kind == "sqlite":
        return SqliteStore(sqlite_path(url))
    msg = f"read models need a database: use sqlite:///path.db or postgresql://..., not {url!r}"
    raise ReadStoreError(msg)


def readmodel_url(events_url: str) -> str:
    """Where read models live by default: beside the events (a temporary SQLite file for an
    in-memory event store, which no other process can see anyway)."""
    if scheme(events_url) == "memory":
        directory = tempfile.mkdtemp(prefix="daybook-readmodels-")
        return f"sqlite:///{directory}/readmodels.db"
    return events_url
