"""Where read models live: a database chosen by URL, by default the event store's own."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from daybook.infrastructure.readmodels.postgres import PostgresStore
from daybook.infrastructure.readmodels.sqlite import SqliteStore
from daybook.infrastructure.readmodels.store import ReadStore, ReadStoreError
from daybook.infrastructure.urls import redacted, scheme, sqlite_file


def open_store(url: str) -> ReadStore:
    """A connection to the read-model database at ``url`` (postgresql:// or sqlite:///)."""
    kind = _checked_scheme(url)
    if kind == "postgresql":
        return PostgresStore(url)
    return SqliteStore(sqlite_file(url))


def _checked_scheme(url: str) -> str:
    """``url``'s scheme, one a read-model store takes; else ``ReadStoreError``."""
    kind = scheme(url)
    if kind in ("postgresql", "sqlite"):
        return kind
    msg = (
        "read models need a database: use sqlite:///path.db or postgresql://..., "
        f"not {redacted(url)!r}"
    )
    raise ReadStoreError(msg)


def readmodel_url(events_url: str) -> str:
    """Where read models live by default: in the event store's own database. An in-memory
    event store has none (``ReadModelLocation`` gives it a scratch database)."""
    if scheme(events_url) == "memory":
        msg = (
            "an in-memory event store has no database for read models: "
            "give a read-model URL (sqlite:///path.db or postgresql://...)"
        )
        raise ReadStoreError(msg)
    return events_url


class ReadModelLocation:
    """The read-model database for an event store: ``url`` if given, else the event store's
    own database. A ``memory://`` event store gets a scratch SQLite file in a temporary
    directory of its own (no other process could read its log anyway), which ``close``
    removes with everything in it."""

    def __init__(self, events_url: str, url: str | None = None) -> None:
        self.scratch: Path | None = None
        if url is None and scheme(events_url) == "memory":
            self.scratch = Path(tempfile.mkdtemp(prefix="daybook-readmodels-"))
            url = f"sqlite:///{self.scratch}/readmodels.db"
        self.url = url if url is not None else readmodel_url(events_url)
        try:
            # Refused now, by the call that was given it, not by a runner's thread later.
            _checked_scheme(self.url)
        except ReadStoreError:
            self.close()
            raise

    def close(self) -> None:
        """Remove the scratch directory, if this location made one."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def __enter__(self) -> ReadModelLocation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
