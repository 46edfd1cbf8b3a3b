"""Applying a batch of stream messages to the read models: the faust workers' core.

The same projection engine (``readmodels.engine``) and read-model store as the in-process
runner; what differs is where events come from and how progress is tracked. A group's
checkpoint is a partition vector (``readmodels.checkpoints``): one progress row per partition.
One batch is one read-model transaction that

1. locks the batch's partitions' progress rows (nothing else: workers of one group own
   different partitions and never wait for each other) and classifies each message against
   them (``progress.classify``): duplicates and messages past a gap change nothing; a mark
   moves the partition's bound;
2. reads the group's projection versions (a shared lock, so a handover or a switch of reads
   waits for the batch): only versions the group owns, live or rebuilding, are written;
3. applies the rest with every projection, each event's summed rows in its partition's
   shard, parks events that keep failing (dead-letter row, published to the dead-letter
   topic after the commit), and moves the progress rows.

Every row a handler reads for an event is that event's aggregate's or a summed table's shard
of that partition, so a worker's row cache stays valid while it keeps its partitions; a
partition last written by another worker (a rebalance), a repair or a handover (the version's
epoch) drops it.

Nothing is acknowledged to Kafka before that transaction commits (see ``app``), so a crash
anywhere means redelivery, which step 1 turns into no-ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from opentelemetry.trace import SpanKind

from daybook.infrastructure.lifecycle import Supervisor
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import LIMITED_AT_SOURCE
from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.readmodels.catalog import (
    IllegalTransition,
    RetiredDrops,
    VersionCatalog,
    VersionRecord,
    VersionState,
    repeated_keys,
)
from daybook.infrastructure.readmodels.checkpoints import (
    CodeLacksVersion,
    ForeignStore,
    GroupAlreadyStarted,
    NotOwner,
    PartitioningMismatch,
    read_vector,
    stream_owner,
    version_label,
)
from daybook.infrastructure.readmodels.engine import BatchRows, RowCache, Slot, StoreFailed
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.infrastructure.statelog import StateLog
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.streaming.progress import (
    DEAD_LETTER_TABLE,
    GAP,
    LETTER_RETENTION,
    LIVE,
    PARKED,
    PROGRESS_TABLE,
    VERSIONS_COLUMN,
    Step,
    classify,
    create_purge_index,
    create_tables_sql,
    letter_groups,
    purge_closed_letters,
)
from daybook.infrastructure.streaming.relay import CURSOR_TABLE
from daybook.infrastructure.transient import first_line, is_transient
from daybook.projections.model import LogEvent, Projection

log = logging.getLogger("daybook.worker")

#: Seconds a batch waits for its partitions' progress rows before it fails and is tried
#: again after a backoff (see ``_apply``).
BATCH_LOCK_WAIT = 10.0

#: Seconds between a worker's looks for closed dead letters past their retention.
LETTER_PURGE_INTERVAL = 3_600.0
#: Closed dead letters deleted per transaction, and transactions per look: a look runs after
#: a batch, under the agent's batch lock, so it must not hold the worker for long (nothing is
#: consumed meanwhile, and a stop waits for it). A look that deletes that many (there may be
#: more) makes the next one due after the next batch, so a backlog drains batch by batch.
LETTER_PURGE_BATCH = 1_000
LETTER_PURGE_BATCHES = 10
#: Dead letters claimed for publishing at a time (see ``claim_dead_letters``): the claim
#: lasts as long as their sends.
LETTERS_PER_CLAIM = 500

#: The longest a claim's transaction may sit idle on the server: longer than a send may
#: take (faust's producer gives the broker 1,200 s), so that only a worker frozen or cut
#: off mid-claim loses it. Without it, the server kept such a claim (its rows locked, the
#: group's other workers skipping them) until TCP gave the connection up, hours later.
CLAIM_IDLE_LIMIT_SECONDS = 1500

#: The same for a batch's transaction, which holds its partitions' progress rows locked:
#: without it, a worker frozen mid-batch (SIGSTOP, a paused VM) kept them until TCP gave
#: its connection up, hours later, and the worker the group gave its partitions retried
#: their batches all that while. A batch's longest idle stretch is its handlers running
#: over its events, in Python, between its reads and its writes: well under a second for
#: the default 2000 events, seconds for the largest batches. Ten minutes leaves room for
#: a loaded or swapping machine (faust calls a batch held past five minutes slow), and
#: still hands a frozen worker's partitions on within minutes.
BATCH_IDLE_LIMIT_SECONDS = 600
#: Tests set a shorter limit through this variable, for a worker process they start.
BATCH_IDLE_LIMIT_VARIABLE = "DAYBOOK_TEST_BATCH_IDLE_LIMIT"


def _batch_idle_limit() -> int:
    """``BATCH_IDLE_LIMIT_SECONDS``, or a test's whole number of seconds from
    ``BATCH_IDLE_LIMIT_VARIABLE``: anything else there (a typo, 0, a negative number,
    which PostgreSQL refuses at every batch) is ignored, never taken."""
    text = os.environ.get(BATCH_IDLE_LIMIT_VARIABLE, "")
    if text.isascii() and text.isdigit() and 0 < int(text) <= BATCH_IDLE_LIMIT_SECONDS:
        return int(text)
    return BATCH_IDLE_LIMIT_SECONDS


_BATCH_IDLE_LIMIT = _batch_idle_limit()


@dataclass(frozen=True, slots=True)
class Message:
    partition: int
    offset: int
    value: bytes
    #: The trace the message continues (its ``traceparent`` header: the relay's publish).
    traceparent: str | None = None


@dataclass
class _Partition:
    position: int
    applied: int
    duplicates: int
    dead_letters: int
    state: str
    last_error: str | None
    waiting_for: int
    bound: int
    writer: str | None
    changed: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked event, for the dead-letter topic: the original message and why."""

    #: The event's log position; for a message that is no envelope, ``letter_position``.
    position: int
    value: bytes
    error: str
    #: Where the message was (the topic's partition and offset).
    partition: int
    offset: int


#: Bits of a letter's position that hold the partition of a message that is no envelope
#: (see ``letter_position``): Kafka partitions, at most 10,000 by the settings, fit.
_PARTITION_BITS = 20
#: The highest position such a letter can have. Below every position an envelope has
#: (positive), and every one a letter that was no envelope got before partitions were
#: part of it (``-offset - 1``, one partition's the same as another's: offsets below 2**62).
_NO_ENVELOPE = -(2**62) - 1


def letter_position(partition: int, offset: int) -> int:
    """The position a dead letter for a message that is no envelope is keyed by (the
    table's key is the group, the topic and the position): no log position, so one made of
    its partition and offset, the same for a redelivery of the message (a duplicate) and
    different for any other (every partition's offsets start at 0). Offsets below 2**42
    (4.4e12 messages in a partition) fit in a bigint; past that, a ``ValueError``, rather
    than two letters under one key."""
    if not (0 <= partition < 2**_PARTITION_BITS and 0 <= offset < 2 ** (62 - _PARTITION_BITS)):
        raise ValueError(f"no dead-letter position for partition {partition} offset {offset}")
    return _NO_ENVELOPE - (offset << _PARTITION_BITS | partition)


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    gaps: int = 0
    parked: list[DeadLetter] = field(default_factory=list)
    #: Per partition, the last offset of the batch (applied, skipped or parked).
    offsets: dict[int, int] = field(default_factory=dict)
    #: Per partition of the batch left waiting for a gap: the offset of the first message
    #: the gap held back, when the gap began in this batch (None: it began before).
    waiting: dict[int, int | None] = field(default_factory=dict)


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
        head: Callable[[], int | None] | None = None,
        published: Callable[[], int | None] | None = None,
        letter_retention: float = LETTER_RETENTION,
        letter_purge_interval: float = LETTER_PURGE_INTERVAL,
    ) -> None:
        self.url = readmodels_url
        #: The log's head (default: read beside the read models, if the log is there).
        self._head = head
        #: The partition count the relay publishes the topic with, from its cursor (None:
        #: no relay has published it); default: read beside the read models, if the event
        #: store is there.
        self._published = published
        self.projections = list(projections)
        self.group = group
        self.owner = stream_owner(group)
        self.topic = topic
        self.partitions = partitions
        self.writer = writer
        self.max_attempts = max_attempts
        self.cache_limit = cache_limit
        self.store: ReadStore | None = None
        #: Whether the connection holds a claim on dead letters (``claim_dead_letters``).
        self._claiming = False
        self._slots: list[Slot] = []
        self._told: set[tuple[str, int]] = set()
        #: Whether this connection registered the projections' versions (``_register``).
        self._registered = False
        self.states = StateLog(log)
        #: Per partition that parked events: when it last parked one (``states.clock``).
        self._parked_at: dict[int, float] = {}
        #: What switches retired and left to drop (tables still being read).
        self.drops = RetiredDrops()
        #: Closed dead letters are deleted ``letter_retention`` seconds after they were
        #: parked, checked at most every ``letter_purge_interval`` seconds (``purge_letters``),
        #: ``letter_batch`` rows per transaction and ``letter_batches`` transactions a look.
        self.letter_retention = letter_retention
        self.letter_purge_interval = letter_purge_interval
        self.letter_batch = LETTER_PURGE_BATCH
        self.letter_batches = LETTER_PURGE_BATCHES
        # The first look is due at a random moment of the first interval, not with the first
        # batch: workers of a group started together do not all look at once, and a worker
        # restarted over and over looks no more often, on average, than one left running
        # (yet still looks, as it would not if each start waited a whole interval).
        self._letters_due = time.monotonic() + random.uniform(0, letter_purge_interval)
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
            if not store.open_locks().between_processes:
                raise ValueError("faust workers write read models to PostgreSQL only")
            catalog = VersionCatalog(store)
            catalog.ensure()
            with store.transaction():
                store.ddl_guard()
                for statement in create_tables_sql():
                    store.execute(statement.as_string())
                store.add_column(DEAD_LETTER_TABLE, VERSIONS_COLUMN)
                create_purge_index(store)
        except BaseException:
            store.close()
            raise
        self.store = store
        self._registered = False
        self._slots = []
        return store

    def _register(self, store: ReadStore) -> None:
        """Make sure the projections' versions exist (with their keys, if serving), before
        the first batch of a connection. (Not in ``connect``: the agent connects at start to
        re-send dead letters, outside the batch path whose failures stop the worker.)"""
        self._refuse_unlike_relay(store)
        catalog = VersionCatalog(store)
        self._refuse_new_to_started_group(store, catalog)
        for projection in self.projections:
            record = catalog.register(
                projection, owner=self.owner, topic=self.topic, partitions=self.partitions
            )
            if record is not None and record.state is VersionState.LIVE:
                # Serving: its keys are in place, unless code that built no deferred keys
                # switched to it; then build them now.
                with store.transaction():
                    store.create_keys(projection)
            self.drops.drop(store, projection.name)  # what a switch left behind
        self._registered = True

    def _refuse_new_to_started_group(self, store: ReadStore, catalog: VersionCatalog) -> None:
        """Raise ``GroupAlreadyStarted``, before anything is registered, for a version new
        to a group that has consumed part of the topic already: Kafka gives the group's
        workers only what comes after its committed offsets, so the version would be built
        from there on, and then served as complete once the group's vector reached the
        head."""
        vector = read_vector(store, self.group, self.topic, self.partitions)
        if not vector.started:
            return
        for projection in self.projections:
            if catalog.version(projection.name, projection.version) is not None:
                continue
            active = catalog.active_version(projection.name)
            if active is not None and active > projection.version:
                continue  # an older version is never registered again
            raise GroupAlreadyStarted(
                projection.name, projection.version, self.group, self.topic, vector.furthest
            )

    def refuse_at_start(self) -> None:
        """Raise, at start, the refusal the first batch would meet: ``PartitioningMismatch``
        (the relay's cursor, or a version the group writes, counts other partitions),
        ``GroupAlreadyStarted``, or ``NotOwner`` when every one of the projections' versions
        has another owner, or none is the group's to write because a rebuild replaced it
        (naming the new one).
        Otherwise a worker its group cannot serve would say so only when events next come,
        and run on in silence on a quiet topic."""
        store = self.connect()
        self._refuse_unlike_relay(store)
        catalog = VersionCatalog(store)
        self._refuse_new_to_started_group(store, catalog)
        self._refuse_other_partitioning(catalog)
        try:
            self._refuse_lacking(catalog)
        except CodeLacksVersion as refusal:
            self._note_lacking(store, refusal)
            raise
        records = [(p, catalog.version(p.name, p.version)) for p in self.projections]
        found = [record for _, record in records if record is not None]
        if not records or len(found) < len(records):
            return  # a version not there yet is registered, the group's, at the first batch
        if any(r.owner == self.owner and r.state.writable for r in found):
            return
        # None to write: each is another owner's, or the group's but replaced by a
        # rebuild (then name what replaced it, as ``_claim`` does).
        for record in found:
            if (replaced := self._replaced(catalog, record)) is not None:
                raise replaced
        if all(r.owner != self.owner for r in found):
            raise NotOwner(found[0].name, found[0].version, found[0].owner, self.owner)

    def _refuse_unlike_relay(self, store: ReadStore) -> None:
        """Raise ``PartitioningMismatch`` if the relay publishes the topic with another
        partition count than this worker runs with. The versions a group writes record its
        workers' count, but a new group (a rebuild) has none yet, and Kafka hands a worker
        the topic's partitions whatever it was told: with fewer, its vector leaves some out
        (a version serves before their events are in); with more, one never moves (the
        version never serves)."""
        if self._published is not None:
            published = self._published()
        else:
            published = relay_partitions(store, self.topic)
        if published is not None and published != self.partitions:
            raise PartitioningMismatch.of_topic(
                self.topic, published, "the relay publishes topic", self.partitions
            )

    def _refuse_partitions_past(self, messages: Sequence[Message]) -> None:
        """Raise ``PartitioningMismatch`` for a message of a partition at or past this
        worker's count: the topic has more partitions than it was told (also where no relay
        cursor says how many)."""
        past = [m.partition for m in messages if not 0 <= m.partition < self.partitions]
        if past:
            raise PartitioningMismatch.of_message(self.topic, min(past), self.partitions)

    def _refuse_other_partitioning(self, catalog: VersionCatalog) -> None:
        """Raise ``PartitioningMismatch`` for a version the group writes that records
        another topic or partition count than this worker runs with."""
        running = f"{self.topic} with {self.partitions} partitions"
        for record in catalog.versions():
            if record.owner != self.owner or not record.state.writable:
                continue
            if record.topic is None or record.partitions is None:
                continue
            recorded = f"{record.topic} with {record.partitions} partitions"
            if recorded != running:
                raise PartitioningMismatch.of_version(
                    record.name, record.version, self.owner, recorded, running
                )

    def _refuse_lacking(self, catalog: VersionCatalog) -> None:
        """Raise ``CodeLacksVersion`` for a version the group writes (live or rebuilding)
        that this worker's code does not define: say, one handed to the group after a
        rebuild with newer code, while this worker still runs the old."""
        defined = {p.name: p.version for p in self.projections}
        for record in catalog.versions():
            if record.owner != self.owner or not record.state.writable:
                continue
            if defined.get(record.name) != record.version:
                raise CodeLacksVersion(
                    record.name, record.version, self.owner, defined.get(record.name)
                )

    def _note_lacking(self, store: ReadStore, refusal: CodeLacksVersion) -> None:
        """Say on the version's catalog row (for ``projections status``) that a worker of
        the group stopped for it; the group's next writer of it clears the note."""
        note = f"a worker of {self.owner} ({self.writer}) stopped: {refusal}"
        with store.transaction():
            VersionCatalog(store).set_note(refusal.name, refusal.version, note)

    def probe(self) -> None:
        """Raise unless the read-model database answers (connecting first if need be). An
        idle worker that says it retries has no batch to show that it can work again (see
        ``app``); the database answering is what a batch would have needed."""
        self.connect().execute("SELECT 1")

    def close(self) -> None:
        if self.store is not None:
            # The claim ends here rather than when the server notices the closed socket, a
            # moment later: the group's next claim sees the letters at once.
            self._end_claim(self.store)
            self.store.close()
        self.store = None
        self._registered = False
        self._slots = []
        self._claiming = False

    # -- one batch ---------------------------------------------------------------------------

    def apply(self, messages: Sequence[Message]) -> BatchResult:
        """Apply ``messages`` (in arrival order) in one transaction; raises for database
        errors (the caller reconnects and retries the same messages), ``NotOwner`` when
        the group owns none of its projections' versions, ``GroupAlreadyStarted`` when
        one of them would be a version new to a group that has consumed events, and
        ``CodeLacksVersion`` (having applied nothing) when the group writes a version its
        code does not define, and ``ForeignStore`` (having applied nothing) for a message
        of another event store than the one the group follows, and ``PartitioningMismatch``
        (having applied nothing) for a message of a partition past the worker's count, a
        relay that publishes the topic with another count (checked at the first batch of a
        connection), or a version of the group's that records another partitioning."""
        crash_point("worker.batch")
        self._refuse_partitions_past(messages)
        store = self.connect()
        if not self._registered:
            self._register(store)
        try:
            return self._apply_traced(store, messages)
        except CodeLacksVersion as refusal:  # the batch rolled back: nothing moved
            self._note_lacking(store, refusal)
            raise

    def _apply_traced(self, store: ReadStore, messages: Sequence[Message]) -> BatchResult:
        with tracing.continued(
            "daybook.worker.apply",
            _traced(messages),
            kind=SpanKind.CONSUMER,
            attributes={
                "daybook.group": self.group,
                "daybook.projection": [p.name for p in self.projections],
                "daybook.version": [p.version for p in self.projections],
                "daybook.batch.size": len(messages),
            },
        ):
            result, times = self._apply(store, messages)
        committed = time.time()
        ages = [max(0.0, committed - at) for at in times]
        for slot in self._slots:
            name, version = slot.key
            metrics.PROJECTION_APPLIED.labels(name, str(version)).inc(len(times))
            metrics.observe_many(metrics.CONVERGENCE_SECONDS.labels(name), ages)
            if result.parked:  # applied to none of the group's versions
                metrics.PROJECTION_PARKED.labels(name, str(version)).inc(len(result.parked))
        try:
            if any(slot.record.state is VersionState.REBUILDING for slot in self._slots):
                self._serve_caught_up(store)
            # After the batch committed: a drop still blocked by a reader gives up after its
            # lock wait (2 s, at most every DROP_RETRY seconds).
            self.drops.retry(store)
        except Exception as error:
            if not is_transient(error):
                raise
            # The batch committed: its result (the letters it parked, to publish) is
            # returned, and these steps run again after the next batch, whose first
            # statement meets the outage if it lasts. Raised, the batch's messages came
            # back as duplicates, and the letters it parked were never published.
            log.warning("worker: after a batch committed, %s; tried again after the next "
                        "batch", first_line(error))  # fmt: skip
        if time.monotonic() >= self._letters_due:
            self._purge_due_letters()
        return result

    def _purge_due_letters(self) -> None:
        """The look for closed dead letters after a batch: housekeeping, which never fails
        the batch nor stops the worker."""
        interval = self.letter_purge_interval
        failing = f"worker: deleting closed dead letters of group {self.group} fails"
        try:
            deleted = self.purge_letters(batch=self.letter_batch, batches=self.letter_batches)
        except Exception as error:
            # The batch has committed: an error out of ``apply`` would have its messages
            # delivered again and skipped as duplicates (the letters it parked left
            # unpublished until a restart), or stop the worker (a statement timeout), and
            # stop it again after each restart. The letters can wait for the next look; a
            # connection the error broke is the next batch's to find, and reopen.
            self._letters_due = time.monotonic() + interval
            lines = str(error).strip().splitlines()
            self.states.during(
                failing,
                f"worker: could not delete closed dead letters of group {self.group} "
                f"(trying again in {interval:g}s): {type(error).__name__}: "
                f"{lines[0] if lines else 'no message'}",
            )
            return
        self.states.ended(
            failing, f"worker: deletes closed dead letters of group {self.group} again"
        )
        full = deleted >= self.letter_batch * self.letter_batches
        self._letters_due = time.monotonic() + (0.0 if full else interval)

    def purge_letters(
        self,
        now: datetime | None = None,
        batch: int = LETTER_PURGE_BATCH,
        batches: int = LETTER_PURGE_BATCHES,
    ) -> int:
        """Delete the closed dead letters of the topic's groups (this one's first) parked
        more than ``letter_retention`` seconds before ``now`` (default: the time now),
        oldest first, at most ``batch`` rows per transaction and ``batch * batches`` in all;
        how many (``batch * batches``: there may be more). Open letters stay whatever their
        age: they say what a version in use lacks."""
        store = self.connect()
        moment = now if now is not None else datetime.now(UTC)
        parked_before = moment - timedelta(seconds=self.letter_retention)
        budget = batch * batches
        deleted = 0
        # Every group's on the topic, not only this one's: a group left behind by a rebuild
        # through a new group never runs again, and its closed letters stayed for good.
        for group in letter_groups(store, self.topic, first=self.group):
            while deleted < budget:
                size = min(batch, budget - deleted)
                count = purge_closed_letters(store, group, self.topic, parked_before, size)
                deleted += count
                if count < size:
                    break
        if deleted:
            log.info("worker: deleted %d closed dead letters of topic %s", deleted, self.topic)
        return deleted

    def _apply(
        self, store: ReadStore, messages: Sequence[Message]
    ) -> tuple[BatchResult, list[float]]:
        """The batch's transaction; the result, and the time of each event applied."""
        result = BatchResult()
        times: list[float] = []
        involved = sorted({m.partition for m in messages})
        with store.transaction():
            # For this transaction only (see ``BATCH_IDLE_LIMIT_SECONDS``).
            store.execute(f"SET LOCAL idle_in_transaction_session_timeout = '{_BATCH_IDLE_LIMIT}s'")
            # The partitions' progress rows held by another session (a former owner frozen
            # after a rebalance, an operator's open transaction) fail the batch after this
            # long, as an outage waited out with backoff, in health and the log: queued
            # for them, the batch waited for ever, unseen, and SIGTERM with it (faust waits
            # for the batch). Only there: the rest of the batch waits as it always did
            # (a switch building a large version's key holds its table for a while).
            store.wait_for_locks_at_most(BATCH_LOCK_WAIT)
            progress = self._lock_progress(store, involved)
            store.wait_for_locks_at_most(None)
            follows = self._followed_store(store)
            self._claim(store, progress)
            batches = {id(slot): BatchRows(slot, store) for slot in self._slots}
            for message in messages:
                part = progress[message.partition]
                result.offsets[message.partition] = message.offset
                try:
                    env = envelope.decode(message.value)
                except envelope.BadEnvelope as error:
                    self._park(store, part, message, None, str(error), result)
                    continue
                follows = self._follow(store, follows, env, involved)
                if env.is_mark:
                    self._mark(message.partition, part, env)
                    continue
                step = classify(part.position, env.position, env.prev)
                if step is Step.DUPLICATE:
                    part.duplicates += 1
                    part.changed = True
                    result.duplicates += 1
                    continue
                if step is Step.GAP:
                    if part.state != GAP:  # a gap begins here: its lag counts from here
                        result.waiting[message.partition] = message.offset
                    self._gap(message.partition, part, env.prev, env.position)
                    result.gaps += 1
                    continue
                for rows in batches.values():
                    rows.shard = message.partition
                event = LogEvent.from_state(env.position, env.type, env.to_state())
                failure = self._apply_event(event, batches)
                if failure is not None:
                    self._park(store, part, message, env, failure, result)
                else:
                    result.applied += 1
                    part.applied += 1
                    times.append(event.timestamp.timestamp())
                    self._parking_ended(message.partition)
                part.position = env.position
                part.bound = max(part.bound, env.position)
                self._gap_ended(message.partition, part)
                result.waiting.pop(message.partition, None)
                part.changed = True
            for partition in involved:
                if progress[partition].state == GAP:
                    result.waiting.setdefault(partition, None)
                else:
                    result.waiting.pop(partition, None)
            crash_point("worker.before_commit")
            for key, rows in list(batches.items()):
                if not self._flush_or_stop(store, rows):
                    del batches[key]
            self._save_progress(store, progress)
            crash_point("worker.commit")  # rows and progress written; COMMIT next
        for rows in batches.values():
            rows.merge_into_cache()
        crash_point("worker.after_commit")
        return result, times

    def _flush_or_stop(self, store: ReadStore, rows: BatchRows) -> bool:
        """Write a version's rows of the batch; if the database refuses them (a value out of
        a column's range, a key twice), stop that version with the error, as the runner
        does, and go on with the others: raised, the error failed the worker, and every
        worker of the group failed again at every start on the same batch, every version
        of the group left behind. (A version a group stopped is not resumed: rebuilt under
        a new version.) Whether the rows were written."""
        store.execute("SAVEPOINT daybook_rows")
        try:
            rows.flush()
        except Exception as error:
            if not store.refused_rows(error):
                raise
            store.execute("ROLLBACK TO SAVEPOINT daybook_rows")
            slot = rows.slot
            reason = f"writing its rows failed: {first_line(error)}"
            VersionCatalog(store).stop(*slot.key, reason)
            self._slots = [s for s in self._slots if s is not slot]
            log.error("worker: projection %s v%s stopped: %s", *slot.key, reason,
                      extra={LIMITED_AT_SOURCE: True})  # fmt: skip
            return False
        store.execute("RELEASE SAVEPOINT daybook_rows")
        return True

    def _followed_store(self, store: ReadStore) -> str | None:
        """The event store the group follows (None until a message named one)."""
        rows = store.execute(
            f"SELECT store_id FROM {PROGRESS_TABLE} WHERE group_id = %s AND topic = %s "
            "AND store_id IS NOT NULL ORDER BY partition LIMIT 1",
            (self.group, self.topic),
        )
        return str(rows[0][0]) if rows else None

    def _follow(
        self,
        store: ReadStore,
        follows: str | None,
        env: envelope.Envelope,
        partitions: list[int],
    ) -> str | None:
        """The store the group follows after ``env``: raise ``ForeignStore`` (the batch then
        rolls back: nothing applied) if it names another than the group follows; the first
        it meets that names one, the group follows from then on (recorded on the batch's
        own ``partitions``, whose rows it holds: rows made later take it from them).
        Envelopes of an older relay name none, and pass."""
        if env.store is None or env.store == follows:
            return follows
        if follows is not None:
            raise ForeignStore(self.group, self.topic, follows, env.store, env.position)
        store.execute(
            f"UPDATE {PROGRESS_TABLE} SET store_id = %s WHERE group_id = %s AND topic = %s "
            "AND partition = ANY(%s)",
            (env.store, self.group, self.topic, partitions),
        )
        return env.store

    def _serve_caught_up(self, store: ReadStore) -> None:
        """A version being built starts serving once every event up to the head is in and
        it is not behind the version serving (``_may_serve``); until then the next batch
        asks again."""
        head = self._head() if self._head is not None else store.head_position()
        if head is None:
            return
        catalog = VersionCatalog(store)
        vector = read_vector(store, self.group, self.topic, self.partitions)
        if vector.position < head:
            return
        for slot in self._slots:
            if slot.record.state is not VersionState.REBUILDING:
                continue
            try:
                with store.transaction(write=False):
                    ready = self._may_serve(catalog, slot, lock=False)
                if not ready:
                    continue
                catalog.build_keys(slot.projection)  # before the switch locks any row
                with store.transaction():
                    if not self._may_serve(catalog, slot, lock=True):
                        continue
                    catalog.activate(slot.projection)
            except IllegalTransition:
                continue  # another worker of the group did it first
            except Exception as error:
                if not store.refused_rows(error):
                    raise
                # Appended rows that repeat a key are found when the key's index is built,
                # as the version is about to serve: it stops there, with that reason (as
                # the runner's would), and never serves. The group goes on with the rest.
                reason = repeated_keys(error)
                with contextlib.suppress(IllegalTransition, LookupError):
                    # (Another worker of the group, finding the same, may have been first.)
                    catalog.stop(*slot.key, reason)
                # Once per stop of this version: never held back by another version's line.
                log.error("worker: projection %s v%s stopped: %s", *slot.key, reason,
                          extra={LIMITED_AT_SOURCE: True})  # fmt: skip
                continue
            log.info("worker: projection %s now reads from version %s", *slot.key)
            self.drops.drop(store, slot.projection.name)  # what the switch replaced

    def _may_serve(self, catalog: VersionCatalog, slot: Slot, *, lock: bool) -> bool:
        """Whether ``slot``'s version may start serving: still the group's, rebuilding, no
        newer version serving, and not behind the serving one: the group's position (every
        event up to it applied) is not before that version's checkpoint. A runner following
        an older version (another process, in a rolling deploy) may have applied events the
        group has not, past the head the worker read; serving then, reads would go back to
        a position behind one they had served. Asked before its keys are built (a build
        takes a while), and again under the lock of its row and then of the serving
        version's row (the order ``activate`` locks them in), held to the switch's COMMIT
        (``VersionCatalog.may_replace_serving``)."""
        current = catalog.version(*slot.key, lock=lock)
        if current is None or current.state is not VersionState.REBUILDING:
            return False  # switched by another worker of the group, or stopped
        if current.owner != self.owner:
            return False  # handed over: not the group's to switch (nor to build keys for)
        # The group's position now. With its row locked, no batch of the group (each holds
        # the row shared) moves it before the switch has committed.
        position = read_vector(catalog.store, self.group, self.topic, self.partitions).position
        return catalog.may_replace_serving(slot.projection, position, lock=lock)

    def _mark(self, partition: int, part: _Partition, env: envelope.Envelope) -> None:
        """The relay says: after ``prev``, this partition gets nothing up to the mark."""
        if env.prev == part.position:
            if env.position > part.bound:
                part.bound, part.changed = env.position, True
            self._gap_ended(partition, part)
        elif env.prev > part.position:
            self._gap(partition, part, env.prev, env.position)
        # prev < position: an old mark, delivered again; nothing to learn.

    def _gap(self, partition: int, part: _Partition, prev: int, position: int) -> None:
        self.states.during(
            ("gap", partition),
            f"worker: partition {partition} applied up to {part.position} but got {position} "
            f"(prev {prev}); waiting for the relay to re-publish",
        )
        if part.state != GAP or part.waiting_for != prev:
            part.state, part.waiting_for, part.changed = GAP, prev, True

    def _gap_ended(self, partition: int, part: _Partition) -> None:
        if part.state == GAP:
            part.state = PARKED if part.dead_letters else LIVE
            part.waiting_for, part.changed = 0, True
            self.states.ended(
                ("gap", partition), f"worker: partition {partition} goes on past its gap"
            )

    def _apply_event(self, event: LogEvent, batches: dict[int, BatchRows]) -> str | None:
        """Apply to every projection, or to none (the error after the last attempt)."""
        error = ""
        for _ in range(self.max_attempts):
            for rows in batches.values():
                rows.begin_event()
            try:
                for slot in self._slots:
                    slot.projection.apply(event, batches[id(slot)])
                return None
            except StoreFailed as failed:  # the batch's failure, not the event's
                raise failed.error from None
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
        commit. The partition moves past it (its status says so) rather than stalling. A
        letter recorded already (a message that is no envelope, delivered again) is a
        duplicate: neither counted nor published again."""
        summary = error.strip().splitlines()[-1] if error.strip() else "error"
        if env is not None:
            position, where = env.position, f"position {env.position}"
            what = f"event at {where}"
        else:
            position = letter_position(message.partition, message.offset)
            where, what = f"offset {message.offset} (no envelope)", "event that is no envelope"
        recorded = store.execute(
            f"INSERT INTO {DEAD_LETTER_TABLE} (group_id, topic, partition, position, "
            "kafka_offset, event_type, error, envelope, versions) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (
                self.group, self.topic, message.partition, position, message.offset,
                env.type if env is not None else None, error, message.value,
                [version_label(*slot.key) for slot in self._slots],
            ),
        )  # fmt: skip
        if not recorded:
            part.duplicates += 1
            part.changed = True
            result.duplicates += 1
            return
        # A handler bug can fail every event of a kind: one line when the partition starts
        # parking, a summary while it goes on (each event is a dead letter all the same).
        self.states.during(
            ("parked", message.partition),
            f"worker: parked {what} (partition {message.partition} "
            f"offset {message.offset}): {summary}",
            logging.ERROR,
        )
        self._parked_at[message.partition] = self.states.clock()
        part.dead_letters += 1
        part.state = PARKED
        part.last_error = f"{where}: {summary}"
        part.changed = True
        result.parked.append(
            DeadLetter(position, message.value, summary, message.partition, message.offset)
        )

    def _parking_ended(self, partition: int) -> None:
        """The partition applied an event: it has stopped parking once it has gone a
        summary interval without parking one (events of a failing kind scattered among
        events it applies would otherwise log a start and an end each)."""
        parked_at = self._parked_at.get(partition)
        if parked_at is None or self.states.clock() - parked_at < self.states.summary_every:
            return
        del self._parked_at[partition]
        self.states.ended(
            ("parked", partition), f"worker: partition {partition} applies events again"
        )

    # -- bookkeeping -------------------------------------------------------------------------

    def _claim(self, store: ReadStore, progress: dict[int, _Partition]) -> None:
        """The versions this batch writes: the group's own, live or rebuilding, read under a
        shared lock; row caches kept only if nobody else wrote meanwhile."""
        catalog = VersionCatalog(store)
        known = {slot.key: slot for slot in self._slots}
        slots: list[Slot] = []
        refused: NotOwner | None = None
        #: Refusals naming a version that replaced one of the group's: what to hand over.
        replaced: NotOwner | None = None
        for projection in self.projections:
            key = (projection.name, projection.version)
            record = catalog.version(*key, share=True)
            if record is None:
                continue
            if replaced is None:
                replaced = self._replaced(catalog, record)
            if record.owner != self.owner:
                refused = refused or NotOwner(*key, record.owner, self.owner)
                if key not in self._told:
                    self._told.add(key)
                    why = NotOwner(*key, record.owner, self.owner)
                    # Once per version (``_told``): never held back by another's line.
                    log.warning(
                        "worker: %s; leaving it alone", why, extra={LIMITED_AT_SOURCE: True}
                    )
                continue
            if not record.state.writable:
                self._cannot_follow(catalog, projection, record)
                continue
            slot = known.get(key)
            if slot is None or slot.record.epoch != record.epoch:
                slot = Slot(projection, record, RowCache(projection, self.cache_limit))
                slot.cache.warm(store, empty=False)
                parked = self._parked_count(store, *key)
                metrics.PROJECTION_PARKED.labels(*map(str, key)).set(parked)
            if record.note is not None and catalog.active_version(key[0]) == key[1]:
                catalog.set_note(*key, None)  # followed again
            slot.record = record
            slots.append(slot)
        self._refuse_lacking(catalog)
        # Also here, not only at start: a version handed to the group while it runs.
        self._refuse_other_partitioning(catalog)
        refusal = replaced or refused
        if not slots and refusal is not None:
            raise refusal
        if any(p.writer not in (None, self.writer) for p in progress.values()):
            # A partition another worker wrote since: what we remember of it may be old.
            for slot in slots:
                slot.cache.clear()
        self._slots = slots

    def _replaced(self, catalog: VersionCatalog, record: VersionRecord) -> NotOwner | None:
        """For a version of the group's that a rebuild retired, when another owner has the
        version that replaced it: the refusal naming that one and its handover."""
        if record.owner != self.owner or record.state is not VersionState.RETIRED:
            return None
        serving = catalog.active_version(record.name)
        newer = None if serving is None else catalog.version(record.name, serving)
        if newer is None or newer.owner == self.owner:
            return None
        return NotOwner(record.name, newer.version, newer.owner, self.owner)

    def _parked_count(self, store: ReadStore, name: str, version: int) -> int:
        """The group's parked events left out of version ``version`` of ``name``: those
        that name it, and those an older daybook parked (naming none, they count for every
        version). A letter of a version the fixed one replaced is in the fixed one's rows."""
        rows = store.execute(
            f"SELECT count(*) FROM {DEAD_LETTER_TABLE} WHERE group_id = %s AND topic = %s"
            " AND (versions IS NULL OR %s = ANY(versions))",
            (self.group, self.topic, version_label(name, version)),
        )
        return int(rows[0][0]) if rows else 0

    def _cannot_follow(
        self, catalog: VersionCatalog, projection: Projection, record: VersionRecord
    ) -> None:
        """Say so, once, if reads moved to a version newer than this worker's code defines."""
        key = (projection.name, projection.version)
        serving = catalog.active_version(projection.name)
        if record.state is not VersionState.RETIRED or serving is None or key in self._told:
            return
        if serving <= projection.version:
            return
        self._told.add(key)
        note = (
            f"a worker of {self.owner} ({self.writer}) cannot follow {projection.name} version "
            f"{serving}: its code defines version {projection.version}; deploy the new code"
        )
        log.error("worker: %s", note, extra={LIMITED_AT_SOURCE: True})  # once per version
        catalog.set_note(projection.name, serving, note)

    def _lock_progress(self, store: ReadStore, partitions: list[int]) -> dict[int, _Partition]:
        # New rows take the event store the group follows, if it follows one already.
        store.execute(
            f"INSERT INTO {PROGRESS_TABLE} (group_id, topic, partition, store_id) "
            f"SELECT %s, %s, p, (SELECT store_id FROM {PROGRESS_TABLE} "
            "WHERE group_id = %s AND topic = %s AND store_id IS NOT NULL LIMIT 1) "
            "FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING",
            (self.group, self.topic, self.group, self.topic, partitions),
        )
        rows = store.execute(
            f"SELECT partition, position, applied, duplicates, dead_letters, state, last_error, "
            f"waiting_for, bound, writer FROM {PROGRESS_TABLE} WHERE group_id = %s "
            "AND topic = %s AND partition = ANY(%s) ORDER BY partition FOR UPDATE",
            (self.group, self.topic, partitions),
        )
        return {int(row[0]): _Partition(*row[1:]) for row in rows}

    def _save_progress(self, store: ReadStore, progress: dict[int, _Partition]) -> None:
        changed = [(p, s) for p, s in progress.items() if s.changed or s.writer != self.writer]
        if not changed:
            return
        store.executemany(
            f"UPDATE {PROGRESS_TABLE} SET position = %s, applied = %s, duplicates = %s, "
            "dead_letters = %s, state = %s, last_error = %s, waiting_for = %s, bound = %s, "
            "writer = %s WHERE group_id = %s AND topic = %s AND partition = %s",
            [
                (
                    s.position, s.applied, s.duplicates, s.dead_letters, s.state,
                    s.last_error, s.waiting_for, s.bound, self.writer, self.group, self.topic, p,
                )
                for p, s in changed
            ],
        )  # fmt: skip
        for _, part in changed:
            part.writer = self.writer

    def claim_dead_letters(self, limit: int = LETTERS_PER_CLAIM) -> list[DeadLetter]:
        """Up to ``limit`` of the group's dead letters recorded but not yet on the
        dead-letter topic (those a batch just parked, or left by a crash between the commit
        and the publish), claimed: their rows stay locked, in a transaction this connection
        keeps open until ``mark_published`` (or ``close``, on a failed send), and
        the group's other workers skip them. Each letter is so published by one worker; one
        that crashes between the send and the mark leaves its letters to be sent again."""
        store = self.connect()
        store.control(store.begin_write)
        self._claiming = True
        try:
            store.execute(
                f"SET LOCAL idle_in_transaction_session_timeout = '{CLAIM_IDLE_LIMIT_SECONDS}s'"
            )
            rows = store.execute(
                f"SELECT position, envelope, error, partition, kafka_offset "
                f"FROM {DEAD_LETTER_TABLE} WHERE group_id = %s AND topic = %s "
                "AND NOT published ORDER BY position LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.group, self.topic, limit),
            )
        except BaseException:
            # (A statement cancelled, a lock not granted: retried later.) Left open, the
            # aborted claim would fail the next batch on this connection, for good.
            self._end_claim(store)
            raise
        return [
            DeadLetter(int(p), bytes(v), (e.strip().splitlines() or ["error"])[-1], part, at)
            for p, v, e, part, at in rows
        ]

    def _end_claim(self, store: ReadStore) -> None:
        """End the claim on dead letters ``store``'s connection holds, if any, its rows
        unpublished (on a connection already lost the rollback fails: closing ends it)."""
        if self._claiming:
            self._claiming = False
            with contextlib.suppress(Exception):
                store.control("ROLLBACK")

    def mark_published(self, letters: Sequence[DeadLetter]) -> None:
        """Record ``letters`` as on the dead-letter topic (ending their claim, if any)."""
        store = self.connect()
        store.execute(
            f"UPDATE {DEAD_LETTER_TABLE} SET published = true "
            "WHERE group_id = %s AND topic = %s AND position = ANY(%s)",
            (self.group, self.topic, [letter.position for letter in letters]),
        )
        if self._claiming:
            self._claiming = False
            store.control("COMMIT")


def relay_partitions(store: ReadStore, topic: str) -> int | None:
    """The partition count the relay's cursor for ``topic`` records, read in ``store`` (the
    event store's database); None if no relay has published ``topic`` there."""
    found = store.execute(f"SELECT {IN_OWN_SCHEMA}", (CURSOR_TABLE,))
    if not found or found[0][0] is None:
        return None
    rows = store.execute(f"SELECT partitions FROM {CURSOR_TABLE} WHERE topic = %s", (topic,))
    return int(rows[0][0]) if rows else None


def _traced(messages: Sequence[Message]) -> Iterator[tuple[str | None, int]]:
    """``(traceparent, position)`` of each event among ``messages``: the message's header
    (the relay's publish span), else the traceparent in the event's metadata (its command's
    span). Only iterated when tracing is on (it decodes the envelopes once more)."""
    for message in messages:
        try:
            env = envelope.decode(message.value)
        except envelope.BadEnvelope:
            continue
        if not env.is_mark:
            parent = message.traceparent or tracing.traceparent_in({"meta": env.metadata})
            yield parent, env.position
