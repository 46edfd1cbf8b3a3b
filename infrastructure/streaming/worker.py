"""Applying a batch of stream messages to the read models: the faust workers' core.

The same projection definitions, row buffering (``BatchRows``) and read-model store
(``ReadStore``) as the in-process runner; what differs is where events come from and how
progress is tracked. One batch is one read-model transaction that

1. takes the consumer group's transaction-level advisory lock. Workers own different
   partitions, but some read-model rows are shared across aggregates (daily totals), and a
   read-modify-write on them must not interleave. It also serialises two workers that both
   hold a partition for a moment during a rebalance;
2. locks the batch's partitions' progress rows and classifies each message against them
   (``progress.classify``): duplicates and messages past a gap change nothing;
3. applies the rest with every projection, writes the rows, parks events that keep failing
   (dead-letter row, published to the dead-letter topic after the commit), and moves the
   progress rows and each projection version's position.

Nothing is acknowledged to Kafka before that transaction commits (see ``app``), so a crash
anywhere means redelivery, which step 2 turns into no-ops.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from psycopg.sql import Identifier

from daybook.infrastructure.lifecycle import Supervisor
from daybook.infrastructure.readmodels.catalog import VersionCatalog, version_lock_key
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.runner import BatchRows, RowCache, Slot
from daybook.infrastructure.readmodels.store import ReadStore, WriterLocks
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.streaming.progress import (
    DEAD_LETTER_TABLE,
    GAP,
    LIVE,
    PROGRESS_TABLE,
    Step,
    classify,
    create_tables_sql,
)
from daybook.projections.model import LogEvent, Projection, iso_time

log = logging.getLogger("daybook.worker")

PARKED = "parked events (see dead letters)"
WRITERS_TABLE = "daybook_stream_writers"


@dataclass(frozen=True, slots=True)
class Message:
    partition: int
    offset: int
    value: bytes


@dataclass
class _Partition:
    position: int
    applied: int
    duplicates: int
    dead_letters: int
    state: str
    last_error: str | None
    waiting_for: int
    changed: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked event, for the dead-letter topic: the original message and why."""

    position: int
    value: bytes
    error: str


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    gaps: int = 0
    parked: list[DeadLetter] = field(default_factory=list)


class StreamApplier:
    """Applies message batches of one consumer group to the read models (one connection,
    used from one thread at a time)."""

    def __init__(
        self,
        readmodels_url: str,
        projections: Sequence[Projection],
        *,
        group: str,
        topic: str,
        partitions: int,
        writer: str,
        max_attempts: int = 3,
        cache_limit: int = 200_000,
    ) -> None:
        self.url = readmodels_url
        self.projections = list(projections)
        self.group = group
        self.topic = topic
        self.partitions = partitions
        self.writer = writer
        self.max_attempts = max_attempts
        self.cache_limit = cache_limit
        self.store: ReadStore | None = None
        self._locks: WriterLocks | None = None
        self._slots: list[Slot] = []
        self._serial = -1
        self._group_key = version_lock_key(f"stream:{group}:{topic}", 0)
        #: The worker's health: a batch that meets a transient failure (the read-model
        #: database unreachable) is retried after a backoff; any other failure stops the
        #: worker as FAILED with the reason.
        self.supervisor = Supervisor(f"stream worker {group}")

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> ReadStore:
        if self.store is not None:
            return self.store
        store = open_store(self.url)
        try:
            self._locks = store.open_locks()
            if not self._locks.between_processes:
                raise ValueError("faust workers write read models to PostgreSQL only")
            catalog = VersionCatalog(store)
            catalog.ensure()
            with store.transaction():
                store.ddl_guard()
                for statement in create_tables_sql():
                    store.execute(statement.as_string())
                store.execute(
                    f"CREATE TABLE IF NOT EXISTS {WRITERS_TABLE} (group_id text NOT NULL, "
                    "topic text NOT NULL, serial bigint NOT NULL, writer text NOT NULL, "
                    "PRIMARY KEY (group_id, topic))"
                )
            for projection in self.projections:
                catalog.register(projection)
            # Shared locks: workers of a group write together; an in-process runner (which
            # takes the same keys exclusively) stands by while they run, and vice versa.
            for projection in self.projections:
                key = version_lock_key(projection.name, projection.version)
                while not self._locks.try_take(key, shared=True):
                    log.warning(
                        "worker: an in-process runner writes %s v%s; waiting",
                        projection.name,
                        projection.version,
                    )
                    time.sleep(1.0)
        except BaseException:
            store.close()
            if self._locks is not None:
                self._locks.close()
                self._locks = None
            raise
        self.store = store
        self._slots = []
        for projection in self.projections:
            record = catalog.version(projection.name, projection.version)
            assert record is not None
            self._slots.append(Slot(projection, record, RowCache(projection, self.cache_limit)))
        self._serial = -1
        return store

    def close(self) -> None:
        for connection in (self.store, self._locks):
            if connection is not None:
                connection.close()
        self.store = None
        self._locks = None

    # -- one batch ---------------------------------------------------------------------------

    def apply(self, messages: Sequence[Message]) -> BatchResult:
        """Apply ``messages`` (in arrival order) in one transaction; raises only for database
        errors (the caller reconnects and retries the same messages)."""
        store = self.connect()
        result = BatchResult()
        involved = sorted({m.partition for m in messages})
        with store.transaction():
            store.lock_transaction(self._group_key)
            self._check_caches(store)
            progress = self._lock_progress(store, involved)
            batches = {id(slot): BatchRows(slot, store) for slot in self._slots}
            last_at: str | None = None
            for message in messages:
                part = progress[message.partition]
                try:
                    env = envelope.decode(message.value)
                except envelope.BadEnvelope as error:
                    self._park(store, part, message, None, str(error), result)
                    continue
                step = classify(part.position, env.position, env.prev)
                if step is Step.DUPLICATE:
                    part.duplicates += 1
                    part.changed = True
                    result.duplicates += 1
                    continue
                if step is Step.GAP:
                    if part.state != GAP or part.waiting_for != env.prev:
                        log.warning(
                            "worker: partition %d applied up to %d but got %d (prev %d); "
                            "waiting for the relay to re-publish",
                            message.partition, part.position, env.position, env.prev,
                        )  # fmt: skip
                    part.state, part.waiting_for, part.changed = GAP, env.prev, True
                    result.gaps += 1
                    continue
                failure = self._apply_event(env, batches)
                if failure is not None:
                    self._park(store, part, message, env, failure, result)
                else:
                    result.applied += 1
                    part.applied += 1
                    last_at = env.occurred_at
                part.position = env.position
                if part.state == GAP:
                    part.state = PARKED if part.dead_letters else LIVE
                part.waiting_for = 0
                part.changed = True
            crash_point("worker.before_commit")
            for rows in batches.values():
                rows.flush()
            self._save_progress(store, progress)
            self._move_versions(store, last_at)
        for rows in batches.values():
            rows.merge_into_cache()
        crash_point("worker.after_commit")
        return result

    def _apply_event(self, env: envelope.Envelope, batches: dict[int, BatchRows]) -> str | None:
        """Apply to every projection, or to none (the error after the last attempt)."""
        event = LogEvent.from_state(env.position, env.type, env.to_state())
        error = ""
        for _ in range(self.max_attempts):
            for rows in batches.values():
                rows.begin_event()
            try:
                for slot in self._slots:
                    slot.projection.apply(event, batches[id(slot)])
                return None
            except Exception:  # a handler bug or a bad event: retried, then parked
                for rows in batches.values():
                    rows.undo_event()
                error = traceback.format_exc(limit=5)
        return error

    def _park(
        self,
        store: ReadStore,
        part: _Partition,
        message: Message,
        env: envelope.Envelope | None,
        error: str,
        result: BatchResult,
    ) -> None:
        """Record an event that cannot be applied; it goes to the dead-letter topic after the
        commit. The partition moves past it (its status says so) rather than stalling."""
        summary = error.strip().splitlines()[-1] if error.strip() else "error"
        position = env.position if env is not None else -message.offset - 1
        log.error(
            "worker: parked event at position %s (partition %d offset %d): %s",
            position, message.partition, message.offset, summary,
        )  # fmt: skip
        store.execute(
            f"INSERT INTO {DEAD_LETTER_TABLE} (group_id, topic, partition, position, "
            "kafka_offset, event_type, error, envelope) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (
                self.group, self.topic, message.partition, position, message.offset,
                env.type if env is not None else None, error, message.value,
            ),
        )  # fmt: skip
        part.dead_letters += 1
        part.state = PARKED
        part.last_error = f"position {position}: {summary}"
        part.changed = True
        result.parked.append(DeadLetter(position, message.value, summary))

    # -- bookkeeping -------------------------------------------------------------------------

    def _check_caches(self, store: ReadStore) -> None:
        """Keep the row caches only if nobody else wrote since our last batch."""
        rows = store.execute(
            f"INSERT INTO {WRITERS_TABLE} (group_id, topic, serial, writer) "
            "VALUES (%s, %s, 1, %s) ON CONFLICT (group_id, topic) DO UPDATE "
            f"SET serial = {WRITERS_TABLE}.serial + 1, writer = EXCLUDED.writer "
            "RETURNING serial",
            (self.group, self.topic, self.writer),
        )
        serial = int(rows[0][0])
        catalog = VersionCatalog(store)
        for slot in self._slots:
            current = catalog.version(*slot.key)
            assert current is not None
            if self._serial == -1:
                # First batch on this connection: load small tables whole. (Not position 0:
                # ``warm`` takes that to mean empty tables, and a stream version's position
                # is only a lower bound, 0 while any partition is idle.)
                slot.cache.warm(store, max(current.position, 1))
            elif serial != self._serial + 1 or current.epoch != slot.record.epoch:
                # Another worker (or a repair) wrote since our last batch.
                slot.cache.clear()
            slot.record = current
        self._serial = serial

    def _lock_progress(self, store: ReadStore, partitions: list[int]) -> dict[int, _Partition]:
        table = Identifier(PROGRESS_TABLE).as_string()
        store.execute(
            f"INSERT INTO {table} (group_id, topic, partition) "
            "SELECT %s, %s, p FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING",
            (self.group, self.topic, partitions),
        )
        rows = store.execute(
            f"SELECT partition, position, applied, duplicates, dead_letters, state, last_error, "
            f"waiting_for FROM {table} WHERE group_id = %s AND topic = %s "
            "AND partition = ANY(%s) FOR UPDATE",
            (self.group, self.topic, partitions),
        )
        return {row[0]: _Partition(*row[1:]) for row in rows}

    def _save_progress(self, store: ReadStore, progress: dict[int, _Partition]) -> None:
        changed = [(p, s) for p, s in progress.items() if s.changed]
        if not changed:
            return
        store.executemany(
            f"UPDATE {PROGRESS_TABLE} SET position = %s, applied = %s, duplicates = %s, "
            "dead_letters = %s, state = %s, last_error = %s, waiting_for = %s, updated_at = now() "
            "WHERE group_id = %s AND topic = %s AND partition = %s",
            [
                (
                    s.position, s.applied, s.duplicates, s.dead_letters, s.state,
                    s.last_error, s.waiting_for, self.group, self.topic, p,
                )
                for p, s in changed
            ],
        )  # fmt: skip

    def _move_versions(self, store: ReadStore, last_at: str | None) -> None:
        """Each version's position: every event up to the smallest partition position has
        been applied (a safe lower bound; an idle partition holds it back)."""
        rows = store.execute(
            f"SELECT count(*), COALESCE(min(position), 0) FROM {PROGRESS_TABLE} "
            "WHERE group_id = %s AND topic = %s",
            (self.group, self.topic),
        )
        count, low = rows[0]
        position = int(low) if count >= self.partitions else 0
        at = iso_time(datetime.fromisoformat(last_at)) if last_at else None
        catalog = VersionCatalog(store)
        for slot in self._slots:
            catalog.set_position(*slot.key, position, at)

    def unpublished_dead_letters(self) -> list[DeadLetter]:
        """Dead letters recorded but not yet on the dead-letter topic (say, after a crash
        between the commit and the publish)."""
        store = self.connect()
        rows = store.execute(
            f"SELECT position, envelope, error FROM {DEAD_LETTER_TABLE} "
            "WHERE group_id = %s AND topic = %s AND NOT published ORDER BY position",
            (self.group, self.topic),
        )
        return [
            DeadLetter(int(p), bytes(v), (e.strip().splitlines() or ["error"])[-1])
            for p, v, e in rows
        ]

    def mark_published(self, letters: Sequence[DeadLetter]) -> None:
        store = self.connect()
        store.execute(
            f"UPDATE {DEAD_LETTER_TABLE} SET published = true "
            "WHERE group_id = %s AND topic = %s AND position = ANY(%s)",
            (self.group, self.topic, [letter.position for letter in letters]),
        )
