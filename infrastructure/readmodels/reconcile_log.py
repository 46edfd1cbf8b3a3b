"""Every row the reconciler repaired, before and after: ``daybook_reconcile_log``."""

from __future__ import annotations

import json

from daybook.infrastructure.readmodels.store import ReadStore, now_text
from daybook.projections.model import Key, Row


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
