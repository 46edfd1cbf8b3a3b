"""The catalog of projection versions: which exist, where each stands, which serves reads.

Tables shared by every projection:

- ``daybook_projection_versions``: one row per (projection, version): its state, the log
  position its tables reflect and an ``epoch`` bumped whenever rows are changed by anything
  other than the runner (reconciler repairs), so a runner knows to drop its row cache.
- ``daybook_read_models``: which version of each projection serves reads.
- ``daybook_dead_letters`` and ``daybook_reconcile_log`` (``dead_letters``,
  ``reconcile_log``), created with them.

A version's state moves only by the named transitions of ``VersionState``: each operation
here locks the version's row, asks its state for the move (an illegal one raises
``IllegalTransition`` and writes nothing) and stores the result.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.reconcile_log import ReconcileLog
from daybook.infrastructure.readmodels.store import ReadStore, now_text
from daybook.projections.model import Projection


class IllegalTransition(Exception):
    """A projection version was asked to move where its state does not allow."""

    code: ClassVar[str] = "illegal_transition"

    def __init__(self, operation: str, state: VersionState, allowed: Iterable[VersionState]):
        names = " or ".join(sorted(s.value for s in allowed))
        super().__init__(f"cannot {operation} a {state.value} version (only a {names} one)")
        self.operation = operation
        self.state = state


class VersionState(enum.Enum):
    """Where a projection version stands; stored as its value."""

    #: Serves reads (it is the active version) and follows the log.
    LIVE = "live"
    #: Being built from the log beside the active version; takes over when caught up.
    REBUILDING = "rebuilding"
    #: Parked an event it could not apply and waits to be resumed; nobody writes it.
    STOPPED = "stopped"
    #: Replaced by a newer version; nobody writes it, its tables may be dropped.
    RETIRED = "retired"

    @property
    def writable(self) -> bool:
        """Whether a runner may apply events to this version's tables."""
        return self in (VersionState.LIVE, VersionState.REBUILDING)

    @staticmethod
    def registered(*, serving: bool) -> VersionState:
        """A new version: live if it is its projection's first (it serves at once), else
        rebuilding beside the one that serves."""
        return VersionState.LIVE if serving else VersionState.REBUILDING

    def activated(self) -> VersionState:
        """Reads switch to this version: it has caught up with the log."""
        return self._move("activate", VersionState.LIVE, VersionState.REBUILDING)

    def retired(self) -> VersionState:
        """Reads switched away from this version, to a newer one."""
        return self._move("retire", VersionState.RETIRED, VersionState.LIVE, VersionState.STOPPED)

    def stopped(self) -> VersionState:
        """An event could not be applied: it is parked, and the version waits."""
        return self._move("stop", VersionState.STOPPED, VersionState.LIVE, VersionState.REBUILDING)

    def resumed(self, *, serving: bool) -> VersionState:
        """The cause was fixed: the version tries its parked events again, as live if it
        serves reads, else as rebuilding."""
        return self._move("resume", VersionState.registered(serving=serving), VersionState.STOPPED)

    def _move(self, operation: str, to: VersionState, *allowed: VersionState) -> VersionState:
        if self not in allowed:
            raise IllegalTransition(operation, self, allowed)
        return to


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: int
    state: VersionState
    position: int
    epoch: int
    last_event_at: str | None
    updated_at: str
    error: str | None


def version_lock_key(name: str, version: int) -> int:
    """A stable signed 64-bit lock key for one projection version (its writer's lock)."""
    digest = hashlib.blake2b(f"daybook:{name}:{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_COLUMNS = "name, version, state, position, epoch, last_event_at, updated_at, error"


def _record(row: tuple[Any, ...]) -> VersionRecord:
    name, version, state, *rest = row
    return VersionRecord(name, int(version), VersionState(state), *rest)


class VersionCatalog:
    """The catalog on one read-model connection. Writes belong in the caller's transaction
    (the operations that must be atomic open their own, which joins the caller's)."""

    def __init__(self, store: ReadStore) -> None:
        self.store = store

    def ensure(self) -> None:
        """Create the catalog tables if they do not exist yet."""
        store = self.store
        with store.transaction():
            store.ddl_guard()
            store.execute(
                "CREATE TABLE IF NOT EXISTS daybook_projection_versions ("
                " name TEXT NOT NULL, version BIGINT NOT NULL, state TEXT NOT NULL,"
                " position BIGINT NOT NULL DEFAULT 0, epoch BIGINT NOT NULL DEFAULT 0,"
                " last_event_at TEXT, updated_at TEXT NOT NULL, error TEXT,"
                " tables TEXT NOT NULL DEFAULT '[]', PRIMARY KEY (name, version))"
            )
            store.execute(
                "CREATE TABLE IF NOT EXISTS daybook_read_models ("
                " name TEXT PRIMARY KEY, active_version BIGINT NOT NULL, switched_at TEXT NOT NULL)"
            )
            DeadLetters(store).create_table()
            ReconcileLog(store).create_table()

    # -- reading -----------------------------------------------------------------------------

    def versions(self, name: str | None = None) -> list[VersionRecord]:
        sql = f"SELECT {_COLUMNS} FROM daybook_projection_versions"
        params: list[str] = []
        if name is not None:
            sql += " WHERE name = %s"
            params.append(name)
        return [_record(row) for row in self.store.execute(sql + " ORDER BY name, version", params)]

    def version(self, name: str, version: int, *, lock: bool = False) -> VersionRecord | None:
        """The version's row; ``lock``: locked until the transaction ends."""
        sql = f"SELECT {_COLUMNS} FROM daybook_projection_versions WHERE name = %s AND version = %s"
        rows = self.store.execute(self.store.locking(sql) if lock else sql, (name, version))
        return _record(rows[0]) if rows else None

    def active_versions(self) -> dict[str, int]:
        rows = self.store.execute("SELECT name, active_version FROM daybook_read_models")
        return {name: int(version) for name, version in rows}

    def active_version(self, name: str) -> int | None:
        rows = self.store.execute(
            "SELECT active_version FROM daybook_read_models WHERE name = %s", (name,)
        )
        return int(rows[0][0]) if rows else None

    # -- registering and moving --------------------------------------------------------------

    def register(self, projection: Projection) -> VersionRecord | None:
        """Make sure ``projection``'s version exists, with its tables: the first version of a
        projection goes live at once; a newer one starts rebuilding beside the active one. An
        older version than the active one is not recreated (returns None unless it still
        exists)."""
        store = self.store
        with store.transaction():
            store.ddl_guard()
            existing = self.version(projection.name, projection.version, lock=True)
            if existing is not None:
                return existing
            active = self.active_version(projection.name)
            if active is not None and active > projection.version:
                return None
            store.create_tables(projection)
            state = VersionState.registered(serving=active is None)
            tables = [t.physical_name(projection.version) for t in projection.tables]
            store.execute(
                "INSERT INTO daybook_projection_versions (name, version, state, position,"
                " epoch, updated_at, tables) VALUES (%s, %s, %s, 0, 0, %s, %s)",
                (projection.name, projection.version, state.value, now_text(), json.dumps(tables)),
            )
            if active is None:
                store.execute(
                    "INSERT INTO daybook_read_models VALUES (%s, %s, %s)",
                    (projection.name, projection.version, now_text()),
                )
            return self.version(projection.name, projection.version)

    def set_position(
        self, name: str, version: int, position: int, last_event_at: str | None
    ) -> None:
        """Record that the version's tables reflect the log up to ``position`` (in the
        transaction that wrote them)."""
        self.store.execute(
            "UPDATE daybook_projection_versions SET position = %s,"
            " last_event_at = COALESCE(%s, last_event_at), updated_at = %s"
            " WHERE name = %s AND version = %s",
            (position, last_event_at, now_text(), name, version),
        )

    def bump_epoch(self, name: str, version: int) -> None:
        """Tell runners the version's rows were changed by someone else (a repair)."""
        self.store.execute(
            "UPDATE daybook_projection_versions SET epoch = epoch + 1, updated_at = %s"
            " WHERE name = %s AND version = %s",
            (now_text(), name, version),
        )

    def activate(self, name: str, version: int) -> int | None:
        """Serve reads of ``name`` from ``version`` (rebuilding -> live) and retire the
        version it replaces (live or stopped -> retired); returns that version."""
        with self.store.transaction():
            record = self._locked(name, version)
            previous = self.active_version(name)
            moves = [(record, record.state.activated())]
            if previous is not None and previous != version:
                replaced = self.version(name, previous, lock=True)
                if replaced is not None:
                    moves.append((replaced, replaced.state.retired()))
            # Every move was allowed: now write them.
            self.store.execute(
                "UPDATE daybook_read_models SET active_version = %s, switched_at = %s"
                " WHERE name = %s",
                (version, now_text(), name),
            )
            for moved, state in moves:
                self._set_state(moved.name, moved.version, state)
            return previous

    def stop(self, name: str, version: int, error: str) -> None:
        """The version parked an event (live or rebuilding -> stopped); ``error`` says why."""
        with self.store.transaction():
            record = self._locked(name, version)
            self._set_state(name, version, record.state.stopped(), error)

    def resume(self, name: str, version: int) -> VersionState:
        """Let a stopped version try its parked events again (stopped -> live if it serves
        reads, else rebuilding); its dead letters are marked resolved."""
        with self.store.transaction():
            record = self._locked(name, version)
            state = record.state.resumed(serving=self.active_version(name) == version)
            self._set_state(name, version, state)
            DeadLetters(self.store).resolve(name, version)
            return state

    def drop_tables(self, name: str, version: int) -> list[str]:
        """Drop the tables a (retired) version created; returns their names."""
        rows = self.store.execute(
            "SELECT tables FROM daybook_projection_versions WHERE name = %s AND version = %s",
            (name, version),
        )
        names: list[str] = json.loads(rows[0][0]) if rows else []
        for table in names:
            self.store.drop_table(table)
        return names

    def _locked(self, name: str, version: int) -> VersionRecord:
        record = self.version(name, version, lock=True)
        if record is None:
            msg = f"projection {name} has no version {version}"
            raise LookupError(msg)
        return record

    def _set_state(
        self, name: str, version: int, state: VersionState, error: str | None = None
    ) -> None:
        self.store.execute(
            "UPDATE daybook_projection_versions SET state = %s, error = %s, updated_at = %s"
            " WHERE name = %s AND version = %s",
            (state.value, error, now_text(), name, version),
        )
