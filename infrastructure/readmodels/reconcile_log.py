"""The rows the reconciler repaired, before and after: ``daybook_reconcile_log``.

The newest ``KEPT_REPAIRS`` of each projection version are kept: a projection that keeps
drifting under a continuous reconciler with repair on would otherwise add its drifted rows
at every run, for as long as it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from daybook.infrastructure.readmodels.store import ReadStore, now_text
from daybook.projections.model import Key, Row, Value

#: Repaired rows kept per projection version (the newest).
KEPT_REPAIRS = 10_000


class ReconcileLog:
    def __init__(self, store: ReadStore) -> None:
        self.store = store

    def create_table(self) -> None:
        self.store.execute(
            f"CREATE TABLE IF NOT EXISTS daybook_reconcile_log ({self.store.serial_key()},"
            " name TEXT NOT NULL, version BIGINT NOT NULL, position BIGINT NOT NULL,"
            " table_name TEXT NOT NULL, row_key TEXT NOT NULL, change TEXT NOT NULL,"
            " before TEXT, after TEXT, repaired_at TEXT NOT NULL)"
        )

    def record(
        self,
        name: str,
        version: int,
        position: int,
        table: str,
        key: Key,
        change: str,
        before: Row | None,
        after: Row | None,
    ) -> None:
        """One repaired row (in the repair's transaction): ``change`` is the drift's kind."""
        self.store.execute(
            "INSERT INTO daybook_reconcile_log (name, version, position, table_name, row_key,"
            " change, before, after, repaired_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                name,
                version,
                position,
                table,
                json.dumps(list(key)),
                change,
                None if before is None else json.dumps(before, sort_keys=True),
                None if after is None else json.dumps(after, sort_keys=True),
                now_text(),
            ),
        )

    def trim(self, name: str, version: int) -> None:
        """Forget the version's repairs beyond the newest ``KEPT_REPAIRS`` (in the repair's
        transaction, after its rows are recorded)."""
        self.store.execute(
            "DELETE FROM daybook_reconcile_log WHERE name = %s AND version = %s AND id <= ("
            " SELECT id FROM daybook_reconcile_log WHERE name = %s AND version = %s"
            f" ORDER BY id DESC LIMIT 1 OFFSET {int(KEPT_REPAIRS)})",
            (name, version, name, version),
        )


@dataclass(frozen=True)
class Repair:
    """One row the reconciler rewrote."""

    name: str
    version: int
    position: int
    table: str
    key: list[Value]
    change: str
    repaired_at: str


def recent_repairs(store: ReadStore, limit: int = 20) -> list[Repair]:
    """The last ``limit`` repairs, newest first (none if nothing was ever repaired)."""
    try:
        with store.transaction(write=False):
            rows = store.execute(
                "SELECT name, version, position, table_name, row_key, change, repaired_at"
                " FROM daybook_reconcile_log ORDER BY id DESC LIMIT %s",
                (limit,),
            )
    except Exception as failure:
        if store.is_missing_table(failure):
            return []
        raise
    return [
        Repair(name, int(version), int(position), table, json.loads(key), change, at)
        for name, version, position, table, key, change, at in rows
    ]
