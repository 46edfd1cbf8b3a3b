"""The catalog of projection versions: which exist, where each stands, which serves reads.

Tables shared by every projection:

- ``daybook_projection_versions``: one row per (projection, version): its state, its owner
  (``checkpoints``: the runner, whose checkpoint is ``position``, or one stream group, whose
  checkpoint is a partition vector), and an ``epoch`` bumped whenever rows are changed by
  anything but the owner's writers (a repair, a handover), so writers drop their row caches;
  ``note`` says when a follower cannot follow it (its code defines an older version).
- ``daybook_read_models``: which version of each projection serves reads (none until its
  first version has been built up to the head: a partial build is never served).
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
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from daybook.infrastructure.readmodels.checkpoints import (
    RUNNER,
    create_progress_table,
    group_of,
    read_vector,
)
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.reconcile_log import ReconcileLog
from daybook.infrastructure.readmodels.store import ReadStore, now_text
from daybook.infrastructure.transient import first_line, may_only_read
from daybook.projections.model import Projection

log = logging.getLogger("daybook.projections")


#: Tables that keep what happened to a projection version, by ``name`` and ``version``
#: (see ``VersionCatalog._forget_history``).
HISTORY_TABLES = ("daybook_dead_letters", "daybook_reconcile_runs", "daybook_reconcile_log")


def repeated_keys(error: BaseException) -> str:
    """Why a version whose appended rows repeat a key (``error``, from building the key)
    stopped at its switch, and what helps (resuming would build the same rows and stop
    again)."""
    return (
        f"writing its rows failed: {first_line(error)}; its handlers append rows that repeat"
        " a key: fix the projection and bump its version"
    )


class IllegalTransition(Exception):
    """A projection version was asked to move where its state does not allow."""

    code: ClassVar[str] = "illegal_transition"

    def __init__(
        self,
        operation: str,
        state: VersionState,
        allowed: Iterable[VersionState],
        why: str | None = None,
    ):
        names = " or ".join(sorted(s.value for s in allowed))
        super().__init__(why or f"cannot {operation} a {state.value} version (only a {names} one)")
        self.operation = operation
        self.state = state


class VersionNotFound(LookupError):
    """A projection version nobody has built (registered) was asked for."""

    code: ClassVar[str] = "version_not_found"


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
    def registered() -> VersionState:
        """A new version is built from the log before it serves reads, the first version of
        a projection too (an interrupted first build must not be served as if complete)."""
        return VersionState.REBUILDING

    def activated(self) -> VersionState:
        """Reads switch to this version: it has caught up with the log."""
        return self._move("activate", VersionState.LIVE, VersionState.REBUILDING)

    def retired(self) -> VersionState:
        """Reads switched away from this version, to a newer one (or, for one still being
        built, to a newer one than it: it can never serve)."""
        return self._move(
            "retire",
            VersionState.RETIRED,
            VersionState.LIVE,
            VersionState.STOPPED,
            VersionState.REBUILDING,
        )

    def stopped(self) -> VersionState:
        """An event could not be applied: it is parked, and the version waits."""
        return self._move("stop", VersionState.STOPPED, VersionState.LIVE, VersionState.REBUILDING)

    def resumed(self, *, serving: bool) -> VersionState:
        """The cause was fixed: the version tries its parked events again, as live if it
        serves reads, else as rebuilding."""
        to = VersionState.LIVE if serving else VersionState.REBUILDING
        return self._move("resume", to, VersionState.STOPPED)

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
    #: ``runner`` or ``stream:GROUP`` (see ``checkpoints``).
    owner: str = RUNNER
    #: A stream owner's topic and partition count.
    topic: str | None = None
    partitions: int | None = None
    #: Why a follower cannot follow this version (None: nothing to say).
    note: str | None = None

    @property
    def group(self) -> str | None:
        return group_of(self.owner)

    @property
    def stream(self) -> tuple[str, str, int] | None:
        """The stream group that owns it, with the group's topic and partition count (its
        checkpoint is that group's partition vector); None when the runner owns it."""
        group = self.group
        if group is None or self.topic is None or not self.partitions:
            return None
        return group, self.topic, self.partitions


def version_lock_key(name: str, version: int) -> int:
    """A stable signed 64-bit lock key for one projection version (its writer's lock)."""
    digest = hashlib.blake2b(f"daybook:{name}:{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_COLUMNS = (
    "name, version, state, position, epoch, last_event_at, updated_at, error,"
    " owner, topic, partitions, note"
)


def _record(row: tuple[Any, ...]) -> VersionRecord:
    name, version, state, position, epoch, last_event_at, updated_at, error = row[:8]
    owner, topic, partitions, note = row[8:]
    return VersionRecord(
        name,
        int(version),
        VersionState(state),
        int(position),
        int(epoch),
        last_event_at,
        updated_at,
        error,
        owner,
        topic,
        None if partitions is None else int(partitions),
        note,
    )


@dataclass(frozen=True)
class Checkpoint:
    """Where a version stands, whoever owns it: every event up to ``position`` is applied;
    ``includes_later``: some events after it are too (a stream partition ahead)."""

    position: int
    includes_later: bool = False


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
            for column in ("owner TEXT NOT NULL DEFAULT 'runner'", "topic TEXT",
                           "partitions BIGINT", "note TEXT",
                           "drop_pending BIGINT NOT NULL DEFAULT 0"):  # fmt: skip
                store.add_column("daybook_projection_versions", column)
            create_progress_table(store)
            DeadLetters(store).create_table()
            ReconcileLog(store).create_table()

    def ensure_where_writable(self) -> bool:
        """``ensure`` where this connection may write; True if it did. Reads need no write:
        on a read replica, or as a role that may only read, they go on without (a writer of
        the read models, the runner or a worker, keeps the catalog)."""
        try:
            self.ensure()
        except Exception as error:
            if not may_only_read(error):
                raise
            return False
        return True

    # -- reading -----------------------------------------------------------------------------

    def versions(self, name: str | None = None) -> list[VersionRecord]:
        sql = f"SELECT {_COLUMNS} FROM daybook_projection_versions"
        params: list[str] = []
        if name is not None:
            sql += " WHERE name = %s"
            params.append(name)
        return [_record(row) for row in self.store.execute(sql + " ORDER BY name, version", params)]

    def version(
        self, name: str, version: int, *, lock: bool = False, share: bool = False
    ) -> VersionRecord | None:
        """The version's row; ``lock``: locked until the transaction ends; ``share``: the
        same, but shared with other sharers (stream workers of one group)."""
        sql = f"SELECT {_COLUMNS} FROM daybook_projection_versions WHERE name = %s AND version = %s"
        if lock:
            sql = self.store.locking(sql)
        elif share:
            sql = self.store.sharing(sql)
        rows = self.store.execute(sql, (name, version))
        return _record(rows[0]) if rows else None

    def active_versions(self) -> dict[str, int]:
        rows = self.store.execute("SELECT name, active_version FROM daybook_read_models")
        return {name: int(version) for name, version in rows}

    def active_version(self, name: str) -> int | None:
        rows = self.store.execute(
            "SELECT active_version FROM daybook_read_models WHERE name = %s", (name,)
        )
        return int(rows[0][0]) if rows else None

    def may_replace_serving(self, projection: Projection, position: int, *, lock: bool) -> bool:
        """Whether ``projection``'s version, every event up to ``position`` applied, may take
        over reads from the version serving them: none serves, or an older one, not retired
        by another switch meanwhile, that has applied nothing past ``position`` (readers must
        never see the position go backwards: the new version catches up first).

        ``lock``: the serving version's row is locked to the end of the transaction, after
        the caller has locked its own version's row (the order ``activate`` locks them in):
        asked in the switch's transaction, no batch of the serving version's writer (the
        runner, which locks its version's row at the start of every batch, or a stream group,
        which holds it shared for its batch) commits between the comparison and the switch's
        COMMIT. Read unlocked, such a batch could commit after the comparison, and reads would
        switch to a position behind one they had already served."""
        name = projection.name
        previous = self.active_version(name)
        if previous is not None and previous > projection.version:
            return False  # a newer version serves: this one never will
        serving = None if previous is None else self.version(name, previous, lock=lock)
        if serving is None:
            return True
        if serving.state is VersionState.RETIRED:
            return False  # another switch replaced it meanwhile, with a newer version
        return self.checkpoint(serving).position <= position

    # -- registering and moving --------------------------------------------------------------

    def checkpoint(self, record: VersionRecord) -> Checkpoint:
        """The version's checkpoint in this transaction's snapshot. A group's version that
        the group no longer writes (stopped, retired) stands where it was when it stopped
        (``_freeze``), not where the group's vector went on to without it."""
        stream = record.stream
        if stream is None:
            return Checkpoint(record.position)
        if not record.state.writable:
            return Checkpoint(record.position, includes_later=True)
        vector = read_vector(self.store, *stream)
        return Checkpoint(vector.position, vector.includes_later)

    def register(
        self,
        projection: Projection,
        *,
        owner: str = RUNNER,
        topic: str | None = None,
        partitions: int | None = None,
    ) -> VersionRecord | None:
        """Make sure ``projection``'s version exists, with its tables, owned by ``owner`` if
        it is new. A new version is built beside the active one (the first version of a
        projection too) and serves once it has caught up. An older version than the active
        one is not recreated (returns None unless it still exists)."""
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
            state = VersionState.registered()
            tables = [t.physical_name(projection.version) for t in projection.tables]
            store.execute(
                "INSERT INTO daybook_projection_versions (name, version, state, position,"
                " epoch, updated_at, tables, owner, topic, partitions)"
                " VALUES (%s, %s, %s, 0, 0, %s, %s, %s, %s, %s)",
                (projection.name, projection.version, state.value, now_text(),
                 json.dumps(tables), owner, topic, partitions),
            )  # fmt: skip
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

    def set_owner(
        self,
        name: str,
        version: int,
        owner: str,
        *,
        position: int,
        topic: str | None = None,
        partitions: int | None = None,
    ) -> None:
        """Hand the version to ``owner`` (in the handover's transaction, which converted
        the checkpoint); writers' caches are dropped (the epoch moves)."""
        self.store.execute(
            "UPDATE daybook_projection_versions SET owner = %s, topic = %s, partitions = %s,"
            " position = %s, epoch = epoch + 1, updated_at = %s WHERE name = %s AND version = %s",
            (owner, topic, partitions, position, now_text(), name, version),
        )

    def set_note(self, name: str, version: int, note: str | None) -> None:
        """Say (or, with None, stop saying) why a follower cannot follow this version."""
        self.store.execute(
            "UPDATE daybook_projection_versions SET note = %s WHERE name = %s AND version = %s",
            (note, name, version),
        )

    def bump_epoch(self, name: str, version: int) -> None:
        """Tell runners the version's rows were changed by someone else (a repair)."""
        self.store.execute(
            "UPDATE daybook_projection_versions SET epoch = epoch + 1, updated_at = %s"
            " WHERE name = %s AND version = %s",
            (now_text(), name, version),
        )

    def build_keys(self, projection: Projection) -> None:
        """Give ``projection``'s version its keys (``ReadStore.create_keys``) in a transaction
        of its own, committed before the switch (``activate``) locks any catalog row. Called
        outside any transaction, just before the switch.

        An index build locks its table in SHARE mode until its transaction ends, for as long
        as the build takes over a large table. Held inside the switch, with catalog rows,
        it made a cycle: another worker of the group, holding the version's row FOR SHARE
        for its batch, waited for the table while the switch waited for that row
        ('deadlock detected'); and a writer connecting (``register``: the DDL lock, then the
        row) held every other connection's ``ensure`` behind it for the whole build. Alone,
        the build holds no other lock: a writer waits for it, or it for the writer, never
        both. One transaction per table, so that it is so with several append-only tables
        too. Fails with the store's refusal (``refused_rows``) when appended rows repeat a
        key."""
        for table in projection.tables:
            if table.append_only:
                with self.store.transaction():
                    self.store.create_keys(projection, table)

    def activate(self, projection: Projection, *, keep_old: bool = False) -> int | None:
        """Serve reads of ``projection`` from its version (rebuilding -> live), with every
        table's key in place (``ReadStore.create_keys``), and retire the version it replaces
        (live or stopped -> retired) and any older one that never served, marking their tables
        to drop (``drop_retired``, once this has committed) unless ``keep_old``; returns the
        version it replaces."""
        name, version = projection.name, projection.version
        with self.store.transaction():
            # Built already by ``build_keys`` as a rule; this builds only what is still
            # missing (a version an older daybook switched to), and costs a look otherwise.
            self.store.create_keys(projection)
            record = self._locked(name, version)
            previous = self.active_version(name)
            moves = [(record, record.state.activated())]
            if previous is not None and previous != version:
                replaced = self.version(name, previous, lock=True)
                if replaced is not None:
                    moves.append((replaced, replaced.state.retired()))
            # Older versions that never served go with it, stopped or still being built (a
            # first build interrupted before a newer version was built): none can serve now
            # (reads never switch back to an older version), and their tables, as large as
            # the projection, would stay for good, a runner with the old code adding to them.
            unserved = (VersionState.STOPPED, VersionState.REBUILDING)
            for older in self.versions(name):
                if older.version >= version or older.version == previous:
                    continue
                if older.state in unserved:
                    locked = self._locked(name, older.version)
                    if locked.state in unserved:  # (not resumed into serving meanwhile)
                        moves.append((locked, locked.state.retired()))
            # Every move was allowed: now write them.
            if previous is None:
                self.store.execute(
                    "INSERT INTO daybook_read_models VALUES (%s, %s, %s)",
                    (name, version, now_text()),
                )
            else:
                self.store.execute(
                    "UPDATE daybook_read_models SET active_version = %s, switched_at = %s"
                    " WHERE name = %s",
                    (version, now_text(), name),
                )
            for moved, state in moves:
                if not state.writable:
                    self._freeze(moved)
                self._set_state(moved.name, moved.version, state)
            for retired, _ in moves[1:] if not keep_old else ():
                self.store.execute(
                    "UPDATE daybook_projection_versions SET drop_pending = 1"
                    " WHERE name = %s AND version = %s",
                    (name, retired.version),
                )
            return previous

    def stop(self, name: str, version: int, error: str) -> None:
        """The version parked an event (live or rebuilding -> stopped); ``error`` says why."""
        with self.store.transaction():
            record = self._locked(name, version)
            state = record.state.stopped()
            self._freeze(record)
            self._set_state(name, version, state, error)

    def _freeze(self, record: VersionRecord) -> None:
        """Record where a group's version stands as the group stops writing it (stopped,
        or retired): the group's vector goes on without it, and its rows do not."""
        if record.stream is None:
            return
        position = self.checkpoint(record).position
        self.store.execute(
            "UPDATE daybook_projection_versions SET position = %s WHERE name = %s AND version = %s",
            (position, record.name, record.version),
        )

    def resume(self, name: str, version: int) -> VersionState:
        """Let a stopped version try its parked events again (stopped -> live if it serves
        reads, else rebuilding); its dead letters are marked resolved."""
        with self.store.transaction():
            record = self._locked(name, version)
            if record.owner != RUNNER and record.state is VersionState.STOPPED:
                # A group stops a version at its switch (its rows repeat a key) or when the
                # database refuses its rows, and its partition vector, the group's, moved on
                # meanwhile: resumed, the version would go on from there, without the events
                # in between.
                raise IllegalTransition(
                    "resume",
                    record.state,
                    (),
                    f"cannot resume {name} v{version}: {record.owner} owns it, and the "
                    "group went on while it was stopped (a resume would skip the events in "
                    f"between); fix the projection and bump its version (daybook projections "
                    f"rebuild {name})",
                )
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

    def mark_to_drop(self, name: str, version: int) -> list[str]:
        """Mark a retired version's tables to drop (``drop_retired`` drops them): those a
        switch kept (``--keep-old``), or that daybook retired before switches marked them;
        nothing else ever drops them. Only a retired version: any other serves reads, is
        being built, or may be resumed. Returns the tables' names ([]: none left)."""
        with self.store.transaction():
            record = self._locked(name, version)
            if record.state is not VersionState.RETIRED:
                why = None
                if record.state in (VersionState.STOPPED, VersionState.REBUILDING):
                    why = (
                        f"cannot drop the tables of a {record.state.value} version (only a "
                        "retired one); one that will not serve reads (a rebuild given up on) "
                        "is retired and dropped with --abandon"
                    )
                raise IllegalTransition(
                    "drop the tables of", record.state, {VersionState.RETIRED}, why
                )
            return self._mark_tables_to_drop(name, version)

    def _mark_tables_to_drop(self, name: str, version: int) -> list[str]:
        """Mark a retired version's tables to drop, if it has any; their names."""
        rows = self.store.execute(
            "SELECT tables FROM daybook_projection_versions WHERE name = %s AND version = %s",
            (name, version),
        )
        names: list[str] = json.loads(rows[0][0])
        if names:
            self.store.execute(
                "UPDATE daybook_projection_versions SET drop_pending = 1"
                " WHERE name = %s AND version = %s",
                (name, version),
            )
        return names

    def abandon(self, name: str, version: int) -> list[str]:
        """Retire a version that does not serve reads and never will: stopped or being built,
        by the runner, and not the one serving (a rebuild given up on, the code gone back to
        the version serving). Its tables are marked to drop (``drop_retired``); a runner still
        building it sees it retired at its next batch and lets it go. A newer version's switch
        retires such a version too; this is for when none is coming. Its version number is
        used up: no runner builds a retired version again. Returns the tables' names."""
        unserved = {VersionState.STOPPED, VersionState.REBUILDING}
        with self.store.transaction():
            record = self._locked(name, version)
            if self.active_version(name) == version:
                raise IllegalTransition(
                    "abandon", record.state, unserved, f"{name} v{version} serves reads"
                )
            if record.state not in unserved:
                raise IllegalTransition("abandon", record.state, unserved)
            if record.owner != RUNNER:
                msg = (
                    f"{name} v{version} is owned by {record.owner}: hand it to the runner first "
                    f"(daybook projections handover {name} --to runner)"
                )
                raise IllegalTransition("abandon", record.state, unserved, msg)
            self._set_state(name, version, record.state.retired())
            return self._mark_tables_to_drop(name, version)

    def _forget_history(self, name: str, version: int) -> None:
        """With a retired version's tables, what was kept about them: its dead letters and
        its reconcile runs and repairs (each capped per version, but a version retired is
        never reconciled again; kept, they added up with every rebuild). Its catalog row
        stays: it is what stops a runner of old code from building that version anew."""
        for table in HISTORY_TABLES:
            if self.store.has_column(table, "version"):  # made once something was recorded
                self.store.execute(
                    f"DELETE FROM {table} WHERE name = %s AND version = %s", (name, version)
                )

    def drop_retired(self, name: str, *, lock_wait: float = 2.0) -> bool:
        """Drop the tables that switches of ``name`` retired and did not keep (``activate``
        marks them); False when some were left for later. Versions retired before switches
        marked them are never dropped here: whether they were kept is not known.

        Each version in a transaction of its own, after the switch that retired it has
        committed: a DROP waits for every transaction reading the table, and inside the
        switch it would hold the catalog, so every new read of the projection would queue
        behind the slowest read of the old version. Once switched, new reads use the new
        version and nothing waits on the drop; a drop that still waits longer than
        ``lock_wait`` gives up and is left for the next call (runners and stream workers
        call this through ``RetiredDrops``: when they connect, after a switch, and while
        one is left, every ``DROP_RETRY`` seconds), as is one whose switch's reply was
        lost."""
        rows = self.store.execute(
            "SELECT version, tables FROM daybook_projection_versions WHERE name = %s"
            " AND state = %s AND drop_pending = 1",
            (name, VersionState.RETIRED.value),
        )
        done = True
        for version, tables in rows:
            names: list[str] = json.loads(tables)
            try:
                with self.store.transaction():
                    self.store.wait_for_locks_at_most(lock_wait)
                    for table in names:
                        self.store.drop_table(table)
                    self._forget_history(name, version)
                    self.store.execute(
                        "UPDATE daybook_projection_versions SET tables = '[]', drop_pending = 0,"
                        " updated_at = %s WHERE name = %s AND version = %s",
                        (now_text(), name, version),
                    )
            except Exception as error:
                if not self.store.lock_not_granted(error):
                    raise
                log.info(
                    "projection %s v%s: its tables are still being read; dropped later",
                    name,
                    version,
                )
                done = False
        return done

    def _locked(self, name: str, version: int) -> VersionRecord:
        record = self.version(name, version, lock=True)
        if record is None:
            msg = f"projection {name} has no version {version}"
            raise VersionNotFound(msg)
        return record

    def _set_state(
        self, name: str, version: int, state: VersionState, error: str | None = None
    ) -> None:
        self.store.execute(
            "UPDATE daybook_projection_versions SET state = %s, error = %s, updated_at = %s"
            " WHERE name = %s AND version = %s",
            (state.value, error, now_text(), name, version),
        )


#: Seconds between tries to drop a retired version's tables that were still being read.
DROP_RETRY = 30.0


class RetiredDrops:
    """One writer's part in dropping what switches of reads retired
    (``VersionCatalog.drop_retired``): ``drop`` right after a switch and when connecting;
    tables still being read stay, and ``retry`` (called when the writer has a moment) tries
    them again, at most every ``DROP_RETRY`` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._due: dict[str, float] = {}

    def drop(self, store: ReadStore, name: str) -> None:
        if VersionCatalog(store).drop_retired(name):
            self._due.pop(name, None)
        else:
            self._due[name] = self.clock() + DROP_RETRY

    def retry(self, store: ReadStore) -> None:
        now = self.clock()
        for name, due in list(self._due.items()):
            if due <= now:
                self.drop(store, name)
