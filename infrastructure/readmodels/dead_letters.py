"""Events a projection version could not apply: ``daybook_dead_letters``.

The runner parks an event after its last attempt, in the same transaction as it stops the
version (``VersionCatalog.stop``), so a stopped version always has the letter that says why.
``VersionCatalog.resume`` marks the version's letters resolved as it lets it try again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from daybook.infrastructure.readmodels.store import ReadStore, now_text, time_text


@dataclass(frozen=True)
class ParkedEvent:
    id: int
    name: str
    version: int
    position: int
    event_type: str
    originator_id: str
    error: str
    attempts: int
    created_at: str
    resolved_at: str | None


#: Seconds a resolved letter is kept (30 days): long enough to look back on an incident.
RESOLVED_RETENTION = 30 * 86_400

_COLUMNS = (
    "id, name, version, position, event_type, originator_id, error, attempts,"
    " created_at, resolved_at"
)


class DeadLetters:
    def __init__(self, store: ReadStore) -> None:
        self.store = store

    def create_table(self) -> None:
        self.store.execute(
            f"CREATE TABLE IF NOT EXISTS daybook_dead_letters ({self.store.serial_key()},"
            " name TEXT NOT NULL, version BIGINT NOT NULL, position BIGINT NOT NULL,"
            " event_type TEXT NOT NULL, originator_id TEXT NOT NULL, error TEXT NOT NULL,"
            " attempts BIGINT NOT NULL, created_at TEXT NOT NULL, resolved_at TEXT)"
        )

    def add(
        self,
        name: str,
        version: int,
        position: int,
        event_type: str,
        originator_id: str,
        error: str,
        attempts: int,
    ) -> None:
        self.store.execute(
            "INSERT INTO daybook_dead_letters (name, version, position, event_type,"
            " originator_id, error, attempts, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (name, version, position, event_type, originator_id, error, attempts, now_text()),
        )

    def entries(self, name: str | None = None) -> list[ParkedEvent]:
        """Every letter (resolved ones too), oldest first; of projection ``name`` if given."""
        sql = f"SELECT {_COLUMNS} FROM daybook_dead_letters"
        params: list[str] = []
        if name is not None:
            sql += " WHERE name = %s"
            params.append(name)
        return [ParkedEvent(*row) for row in self.store.execute(sql + " ORDER BY id", params)]

    def unresolved(self) -> dict[tuple[str, int], int]:
        """How many letters each version has parked and not yet retried: one aggregate
        query (status and the dashboard ask at every poll; the resolved stay)."""
        rows = self.store.execute(
            "SELECT name, version, count(*) FROM daybook_dead_letters"
            " WHERE resolved_at IS NULL GROUP BY name, version"
        )
        return {(str(name), int(version)): int(count) for name, version, count in rows}

    def resolve(self, name: str, version: int) -> None:
        """Mark the version's unresolved letters resolved (it is about to retry them), and
        forget letters resolved more than ``RESOLVED_RETENTION`` ago: kept, they added up
        with every incident. (A retired version's go with its tables.)"""
        now = datetime.now(UTC)
        self.store.execute(
            "UPDATE daybook_dead_letters SET resolved_at = %s"
            " WHERE name = %s AND version = %s AND resolved_at IS NULL",
            (time_text(now), name, version),
        )
        before = time_text(now - timedelta(seconds=RESOLVED_RETENTION))
        self.store.execute(
            "DELETE FROM daybook_dead_letters WHERE resolved_at IS NOT NULL AND resolved_at < %s",
            (before,),
        )
