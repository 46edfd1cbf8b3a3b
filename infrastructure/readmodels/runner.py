"""The in-process projection runner: follows the log and keeps read models up to date.

Exactly-once in effect: each batch of events is applied in one read-model transaction that
also moves the projection's tracking position, and that transaction first locks the
tracking row and checks it still holds the position this runner started from. A crash,
a lost connection or a second runner therefore can only make a batch roll back and be
re-read, never apply twice or skip.

One writer per projection version: the runner writes only versions whose checkpoint it owns
(``checkpoints``: owner ``runner``; a stream group's versions are left alone, said once in
the log, until ``daybook projections handover`` hands them over), and it holds a writer lock
per version (on PostgreSQL a session advisory lock); a second runner waits as a standby and
takes over when the first's session ends. (The position check above keeps even a runner that
lost its lock without noticing, or two runners on SQLite, which has no such locks, from doing
harm.)

A runner follows the version that serves reads. When a rebuild switches reads to a version
this runner's code does not define (a newer one), it says so once in its log and on that
version's catalog row, which ``daybook projections status`` shows (exiting 1) until a runner
with the new code follows it; so too when the switch drops the old version's tables while
this runner is taking that version (starting, or after a reconnect): it lets go of it.

A database error no retry cures, met while writing a batch, stops only the projection whose
rows caused it (state ``stopped``, with the error), found by writing each projection's part
of the batch alone; the others go on. A runner that writes one version stops that one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from types import TracebackType
from typing import Self

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.lifecycle import Health, ServiceState, Stopping, SupervisedThread
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import LIMITED_AT_SOURCE, SUBJECT
from daybook.infrastructure.readmodels.catalog import (
    IllegalTransition,
    RetiredDrops,
    VersionCatalog,
    VersionRecord,
    VersionState,
    repeated_keys,
    version_lock_key,
)
from daybook.infrastructure.readmodels.checkpoints import RUNNER, handover_command, past_the_log
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.engine import (
    BatchRows,
    Failure,
    RowCache,
    Slot,
    apply_careful,
)
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import ReadStore, WriterLocks
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import first_line
from daybook.projections.model import LogEvent, Projection

log = logging.getLogger(__name__)

#: Seconds the runner gives the event store, after a failure, to say how far the log has
#: gone on (its lag gauges); no answer within them, and the gauges wait for the next one.
LAG_GLANCE_SECONDS = 1.0


@dataclass
class Progress:
    """What a batch did, for progress bars and benchmarks."""

    events: int
    position: int
    head: int


class ProjectionRunner:
    """Applies projections to their read-model tables in batches, following the log.

    Use as a context manager (a background thread), or call ``run_until_caught_up`` /
    ``run_forever`` from the calling thread. New versions of a projection are built beside the
    active one and switched to when they have caught up with the log.
    """

    def __init__(
        self,
        log: EventLog,
        readmodels_url: str,
        projections: Sequence[Projection],
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.2,
        max_attempts: int = 5,
        retry_backoff: float = 0.05,
        cache_limit: int = 200_000,
        keep_old: bool = False,
        switch: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.log = log
        self.url = readmodels_url
        self.projections = list(projections)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        #: Whether ``with runner:`` starts its thread (``run_projections(start=False)``: no,
        #: the caller steps it).
        self.start_on_enter = True
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.cache_limit = cache_limit
        self.keep_old = keep_old
        #: Held by a step, and by ``stop`` (re-entrant: a step's thread may stop the runner).
        self._stepping = threading.RLock()
        #: What switches retired and left to drop (tables still being read).
        self.drops = RetiredDrops()
        self.switch = switch
        self.on_progress = on_progress
        self.store: ReadStore | None = None
        self._locks: WriterLocks | None = None
        self.slots: dict[tuple[str, int], Slot] = {}
        #: What this runner has said once already (see ``_tell``).
        self._told: set[tuple[tuple[str, int], str]] = set()
        #: Whether the runner has yet to (re)read to the head: at start, after a reconnect and
        #: after a full batch; the next catch-up is logged (once, not per event).
        self._behind = True
        #: Which group of versions the last batch was read for (``_batch_start``).
        self._turn = 0
        #: Versions of this runner's code that are stopped (an event parked, rows
        #: refused), and why. The runner itself runs on for the others;
        #: ``versions_health`` says it. (Not a version left behind by reads switched to
        #: newer code: that is what a rolling deploy looks like until it ends, and every
        #: server of the old code failing its health at once would take them all out.)
        self.halted: dict[tuple[str, int], str] = {}
        #: Of those, the ones a new version of its projection that stopped while being built
        #: beside the one serving reads, which another process's runner (older code, a
        #: rolling deploy under way) still follows: reads go on from it, so ``versions_health``
        #: does not fail for them (every server of the new code failing its health at once
        #: would take them all out). With nobody following the serving version, it does.
        self._followed_beside: set[tuple[str, int]] = set()
        #: Each version's position when the runner last failed (see ``_hold_lag``).
        self._applied: dict[tuple[str, int], int] = {}
        #: The runner as a service: a transient failure (the log's store or the read-model
        #: database unreachable, at any point) reconnects after a backoff; anything else
        #: stops it as FAILED with the reason, in ``health()`` and the log.
        self.service = SupervisedThread(
            "projection runner",
            self._follow,
            on_failure=lambda _: self._after_failure(),
            on_stop=self.log.interrupt,
        )
        self._stop = self.service.stopping

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Follow the log in a thread of its own (see ``service``)."""
        self.service.start()
        return self

    def request_stop(self) -> None:
        """Ask the runner to return after the batch in hand (safe in a signal handler)."""
        self._stop.set()
        self.log.interrupt()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then stop; nothing committed is lost."""
        self.service.stop(timeout)
        # A caller's step (``run_until_caught_up`` on another thread) finishes first, rather
        # than lose its connection mid-batch; one stuck longer is cut off as before.
        stepping = self._stepping.acquire(timeout=timeout)
        try:
            self._disconnect()
        finally:
            if stepping:
                self._stepping.release()
        self.log.close()

    def health(self) -> Health:
        return self.service.health()

    def versions_health(self) -> Health:
        """The health of the versions this runner's code defines: ``failed``, with each
        one's reason, while one is stopped (its read model stands still, for good, while
        the runner's own health says it runs); ``running`` again once a resume or a rebuild
        mends it."""
        since = self.service.health().since
        halted = {k: v for k, v in self.halted.items() if k not in self._followed_beside}
        if not halted:
            return Health("projection versions", ServiceState.RUNNING, since)
        reasons = "; ".join(halted[key] for key in sorted(halted))
        return Health("projection versions", ServiceState.FAILED, since, error=reasons)

    @property
    def error(self) -> str | None:
        """Why the runner failed (None while it has not)."""
        health = self.service.health()
        return health.error if health.state is ServiceState.FAILED else None

    def __enter__(self) -> Self:
        return self.start() if self.start_on_enter else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run_forever(self) -> Health:
        """Follow the log in this thread, supervised as ``start`` would, until stopped or
        failed; the final health says which."""
        return self.service.run()

    def _follow(self, stopping: Stopping) -> None:
        while not stopping:
            if self.step() == 0:
                self.log.wait(self.poll_interval)
            else:
                self.log.drain()  # busy: read what each commit sent, or it piles up

    def run_until_caught_up(self, max_idle_steps: int = 1) -> None:
        """Apply everything up to the current head, then return (switches included)."""
        idle = 0
        while idle < max_idle_steps and not self._stop:
            if self.step() == 0:
                idle += 1

    # -- connections and slots --------------------------------------------------------------

    def _connect(self) -> ReadStore:
        if self.store is None:
            store = open_store(self.url)
            try:
                catalog = VersionCatalog(store)
                catalog.ensure()
                crash_point("runner.connect")  # the catalog is there; versions next
                for projection in self.projections:
                    catalog.register(projection)
                self._locks = store.open_locks()
            except BaseException:
                store.close()
                raise
            self.store = store
            for projection in self.projections:  # what a switch may have left behind
                self.drops.drop(store, projection.name)
        return self.store

    def let_go(self) -> None:
        """After a failure: close the read-model connections and let go of every version;
        the next step connects and claims them again, from what is committed."""
        self._disconnect()

    def _after_failure(self) -> None:
        """Let go of everything, the log's listen connection too: a runner that failed for
        good waits no more, and the connection would hold back the server's notification
        queue (see ``EventLog.stop_listening``); a retry listens again at its first wait."""
        self._hold_lag()
        self._disconnect()
        self.log.stop_listening()

    def _hold_lag(self) -> None:
        """While the runner cannot apply (retrying, or failed), its lag keeps growing: the
        gauges say so at every failed attempt, from the positions last applied and the
        log's head, rather than freeze at the last value (0, say) that an alert would
        trust. Skipped when the log cannot be read either."""
        if self.slots:  # else: what the last failure with versions in hand knew
            self._applied = {key: slot.record.position for key, slot in self.slots.items()}
        if not self._applied:
            return
        # Bounded: when the event store is what is away, this must not hold up the retry
        # (nor a stop) for a pool's connect timeout, let alone its retries.
        glanced = self.log.glance(self._applied.values(), LAG_GLANCE_SECONDS)
        if glanced is None:
            return
        head, first = glanced
        now = time.time()
        for key, position in self._applied.items():
            event = first.get(position)
            age = now - event.timestamp.timestamp() if event is not None else 0.0
            _report_lag(key, head - position, age)

    def _disconnect(self) -> None:
        for connection in (self.store, self._locks):
            if connection is not None:
                connection.close()
        self.store = None
        self._locks = None
        self.slots.clear()
        self._behind = True

    def _serving_is_followed_elsewhere(self, catalog: VersionCatalog, key: tuple[str, int]) -> bool:
        """Whether another version of ``key``'s projection serves reads and another process's
        runner holds its writer lock (follows it)."""
        assert self._locks is not None
        active = catalog.active_version(key[0])
        if active is None or active == key[1]:
            return False
        serving = catalog.version(key[0], active)
        if serving is None or serving.owner != RUNNER or not serving.state.writable:
            return False
        return self._locks.held_elsewhere(version_lock_key(key[0], active))

    def _claim_slots(self, store: ReadStore) -> None:
        """Take every projection version we may write: ours to write (owner ``runner``),
        live or rebuilding, its writer lock free."""
        assert self._locks is not None
        self._locks.check()  # a dead lock session means our locks are gone
        catalog = VersionCatalog(store)
        head: int | None = None  # the log's, read once a version is claimed
        for projection in self.projections:
            key = (projection.name, projection.version)
            if key in self.slots:
                continue
            record = catalog.version(*key)
            if record is None:
                record = catalog.register(projection)
            if record is None:
                continue
            if record.owner == RUNNER and record.state is VersionState.STOPPED:
                self.halted[key] = _stopped(key, record.error)
                if self._serving_is_followed_elsewhere(catalog, key):
                    self._followed_beside.add(key)
                else:
                    self._followed_beside.discard(key)
            else:
                self.halted.pop(key, None)
                self._followed_beside.discard(key)
            if record.owner != RUNNER and record.state is VersionState.RETIRED:
                # A group's version that a rebuild replaced: the newer one may be ours.
                self._cannot_follow(catalog, projection, record)
                continue
            if record.owner != RUNNER:
                self._tell(key, "owner", f"projection {key[0]} v{key[1]} is owned by "
                           f"{record.owner}; this runner leaves it alone (to take it over: "
                           f"{handover_command(key[0], RUNNER)})")  # fmt: skip
                continue
            if not record.state.writable:
                self._cannot_follow(catalog, projection, record)
                continue
            if not self._locks.try_take(version_lock_key(*key)):
                continue  # another runner writes it; we stand by
            record = catalog.version(*key)
            assert record is not None
            cache = RowCache(projection, self.cache_limit)
            try:
                if record.state is VersionState.LIVE:
                    # Serving: its keys are in place, unless an older daybook (which built no
                    # deferred keys) switched to it; then build them now.
                    with store.transaction():
                        store.create_keys(projection)
                with store.transaction(write=False):
                    cache.warm(store, empty=record.position == 0)
            except Exception as error:
                # Nothing locks the row while its tables are read: a switch of reads to a
                # newer version may retire it and drop its tables meanwhile.
                if not self._moved_away(catalog, projection, error):
                    raise
                self._locks.release(version_lock_key(*key))
                continue
            if record.note is not None and catalog.active_version(key[0]) == key[1]:
                with store.transaction():
                    catalog.set_note(*key, None)  # followed again
            self.slots[key] = Slot(projection, record, cache)
            if head is None or record.position > head:
                # Read again for a version past the head read for an earlier one: the runner
                # that held it may have moved it on since (and let it go).
                head = self.log.head()
            if record.position > head:
                # Stopped, not waited out: once new events pass its position, they would be
                # skipped without a trace.
                self._stop_version(store, self.slots[key], past_the_log(record.position, head))
                continue
            with store.transaction(write=False):
                parked = _unresolved_letters(store, *key)
            metrics.PROJECTION_PARKED.labels(key[0], str(key[1])).set(parked)
        # A step went this far: what the runner held at its last failure is history.
        self._applied = {}
        # Every step starts here: whatever this runner let go of, or never took, stops being
        # reported by it (the one place that decides it).
        for projection in self.projections:
            if (projection.name, projection.version) not in self.slots:
                _forget_lag((projection.name, projection.version))

    def _moved_away(
        self, catalog: VersionCatalog, projection: Projection, error: Exception
    ) -> bool:
        """Whether ``error``, met reading ``projection``'s tables while claiming it, is a table
        gone because the version is no longer ours to write (a switch retired it and
        dropped its tables): then it is said as at any claim (``_cannot_follow``), and the
        version let go, never the runner failed. A table missing from a version still ours
        is a fault of its own."""
        if not catalog.store.is_missing_table(error):
            return False
        record = catalog.version(projection.name, projection.version)
        if record is None or (record.state.writable and record.owner == RUNNER):
            return False
        log.info("projection %s v%s is %s; releasing it", projection.name, projection.version,
                 record.state.value)  # fmt: skip
        self._cannot_follow(catalog, projection, record)
        return True

    def _cannot_follow(
        self, catalog: VersionCatalog, projection: Projection, record: VersionRecord
    ) -> None:
        """Say so if reads moved to a version newer than this runner's code defines."""
        if record.state is not VersionState.RETIRED:
            return
        serving = catalog.active_version(projection.name)
        if serving is None or serving <= projection.version:
            return
        newer = catalog.version(projection.name, serving)
        if newer is None or newer.owner != RUNNER:
            return  # a stream group's to follow, not a runner's
        key = (projection.name, projection.version)
        note = (
            f"a runner ({socket.gethostname()}:{os.getpid()}) cannot follow {projection.name} "
            f"version {serving}: its code defines version {projection.version}; deploy the "
            "new code"
        )
        if self._tell(key, "follow", note, level=logging.ERROR):
            with catalog.store.transaction():
                catalog.set_note(projection.name, serving, note)

    def _tell(
        self, key: tuple[str, int], topic: str, message: str, level: int = logging.WARNING
    ) -> bool:
        """Log ``message`` once per version and topic; True the first time."""
        if (key, topic) in self._told:
            return False
        self._told.add((key, topic))
        log.log(level, "%s", message, extra={LIMITED_AT_SOURCE: True})  # once per version
        return True

    def _release(self, slot: Slot) -> None:
        self.slots.pop(slot.key, None)
        if self._locks is not None:
            self._locks.release(version_lock_key(*slot.key))

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> int:
        """Apply one batch; returns how many events it read (0 when caught up). One caller
        at a time: steps share the runner's connection and its in-memory positions, and two
        at once would both apply the batch after the last committed one (a caller's
        ``run_until_caught_up`` while the runner's own thread follows the log, say)."""
        with self._stepping:
            return self._step()

    def _step(self) -> int:
        store = self._connect()
        self._claim_slots(store)
        if not self.slots:
            # Nothing to write (standing by for another runner's versions, or none ours):
            # the read-model database answered, which is all this step had to do.
            self.service.supervisor.recovered()
            return 0
        lowest = min(slot.record.position for slot in self.slots.values())
        start = self._batch_start(lowest)
        events = self.log.read(start, self.batch_size)
        if not events and start > lowest:
            self._measure_lag([], 0, start)  # the versions ahead are at the head
            start = lowest  # on with the others
            events = self.log.read(start, self.batch_size)
        if not events:
            self.service.supervisor.recovered()  # both databases answered: back to work
            self._measure_lag([], 0, start)
            self._caught_up(start)
            self._switch_caught_up(store, start)
            self.drops.retry(store)
            return 0
        with tracing.continued(
            "daybook.projection.apply",
            ((tracing.traceparent_in(event.data), event.position) for event in events),
            attributes={
                "daybook.projection": [key[0] for key in self.slots],
                "daybook.version": [key[1] for key in self.slots],
                "daybook.batch.size": len(events),
            },
        ):
            self._apply_each(store, events, start)
        self.service.supervisor.recovered()  # a batch committed: back to work
        full = len(events) >= self.batch_size
        head = self.log.head() if full or self.on_progress is not None else events[-1].position
        self._measure_lag(events, head, start)
        if self.on_progress is not None:
            self.on_progress(Progress(len(events), events[-1].position, head))
        if full:
            self._behind = True
        else:
            if start == lowest:
                self._caught_up(events[-1].position)
            self._switch_caught_up(store, events[-1].position)
        return len(events)

    def _batch_start(self, lowest: int) -> int:
        """Where the next batch starts: where the version furthest behind is (``lowest``),
        so that one read serves every version. Unless versions are more than a batch apart
        (a version built from the start of the log beside versions that serve: a new
        projection, or a new version in a deploy; or a serving version held back by an
        event it retries): then the versions form groups, each within a batch of the next,
        and batches are read from where each group starts in turn. A batch applies to every
        version at or past where it was read from, so the versions serving reads keep
        following the log instead of waiting for the new one to read all of it (each group
        at its share of the batches), and groups merge as they catch up."""
        positions = sorted(slot.record.position for slot in self.slots.values())
        starts = [lowest] + [
            later for earlier, later in pairwise(positions) if later - earlier > self.batch_size
        ]
        if len(starts) == 1:
            return lowest
        self._turn = (self._turn + 1) % len(starts)
        return starts[self._turn]

    def _caught_up(self, position: int) -> None:
        """Read to the end of the log: said once after a start, a reconnect or a backlog."""
        if self._behind:
            self._behind = False
            log.info(
                "projection runner: caught up at log position %d (%s)",
                position,
                ", ".join(f"{name} v{version}" for name, version in self.slots) or "no versions",
            )

    def _measure_lag(self, events: list[LogEvent], head: int, start: int) -> None:
        """Each version's lag after a batch of ``events`` read from ``start`` (none: the log
        was read to its end). Counted in events the batch read and the version has not
        applied; past a full batch, the rest of the log is estimated as ``head`` minus the
        batch's last position (a gap in positions counts there, and only there). In seconds:
        the age of the oldest event not applied (past a full batch, the age of its last
        event, an upper bound), 0 when caught up. A version behind ``start`` (the batch was
        not for it: ``_batch_start``), or past the last event of a full one, keeps the lag
        its own batches measure."""
        now = time.time()
        positions = [event.position for event in events]
        beyond = max(0, head - positions[-1]) if positions else 0
        past = positions[-1] if len(positions) >= self.batch_size else None
        for key, slot in self.slots.items():
            if slot.record.position < start or (past is not None and slot.record.position > past):
                continue
            applied = bisect_right(positions, slot.record.position)
            unapplied = len(positions) - applied + beyond
            if applied < len(positions):
                age = now - events[applied].timestamp.timestamp()
            elif beyond:
                age = now - events[-1].timestamp.timestamp()
            else:
                age = 0.0
            _report_lag(key, unapplied, age)

    def _apply_each(self, store: ReadStore, events: list[LogEvent], start: int) -> None:
        """Apply ``events`` to every version in one transaction; if the database refuses
        the rows, each version's part alone (``_apply_alone``); then retry or park each
        event a handler failed on."""
        try:
            failures = self._apply_batch(store, events, start)
        except Exception as error:
            if not store.refused_rows(error):
                raise
            failures = self._apply_alone(store, events, start, error)
        for failure in failures:
            self._handle_failure(store, failure)

    def _apply_alone(
        self, store: ReadStore, events: list[LogEvent], start: int, error: Exception
    ) -> list[Failure]:
        """After a batch failed with an error no retry cures: write each projection's part
        alone, and stop the one that fails again, with the error (the others go on). A
        batch of one version is that version's part: it stops at once (re-raised instead,
        the error failed the runner, and every restart met it again)."""
        if len(self.slots) == 1:
            (slot,) = self.slots.values()
            slot.cache.clear()
            self._stop_version(store, slot, f"writing its rows failed: {first_line(error)}")
            return []
        log.warning("projection runner: a batch failed (%s); writing each projection alone",
                    first_line(error))  # fmt: skip
        failures: list[Failure] = []
        slots = dict(self.slots)
        for key, slot in list(slots.items()):
            self.slots = {key: slot}
            try:
                failures.extend(self._apply_batch(store, events, start))
            except Exception as alone:
                if not store.refused_rows(alone):
                    self.slots = slots
                    raise
                slot.cache.clear()
                self._stop_version(store, slot, f"writing its rows failed: {first_line(alone)}")
                slots.pop(key, None)
        self.slots = slots
        return failures

    def _apply_batch(self, store: ReadStore, events: list[LogEvent], start: int) -> list[Failure]:
        """Apply ``events`` (the log's after position ``start``) to every version at
        ``start`` or past it, in one transaction; a version behind it would skip the events
        in between, and is left for a batch read from where it is."""
        failures: list[Failure] = []
        batches: list[tuple[Slot, BatchRows, int, str | None]] = []
        catalog = VersionCatalog(store)
        with store.transaction():
            for slot in list(self.slots.values()):
                if slot.record.position < start:
                    continue
                current = catalog.version(*slot.key, lock=True)
                if not self._still_ours(slot, current) or slot.record.position < start:
                    continue
                if slot.record.note is not None and slot.record.state is VersionState.LIVE:
                    # Serving, and followed: by this runner. A note that another could not
                    # (older code, gone or not) says nothing about the version any more.
                    catalog.set_note(*slot.key, None)
                rows = BatchRows(slot, store)
                position, last_at, failure = apply_careful(slot, rows, events, slot.record.position)
                if failure is not None:
                    failures.append(failure)
                if position == slot.record.position:
                    continue
                rows.flush()
                catalog.set_position(*slot.key, position, last_at)
                batches.append((slot, rows, position, last_at))
            crash_point("runner.before_commit")
        # Committed: only now may the caches and positions move on.
        committed = time.time()
        positions = [event.position for event in events]
        ages = [committed - event.timestamp.timestamp() for event in events] if batches else []
        for slot, rows, position, last_at in batches:
            rows.merge_into_cache()
            _count_applied(slot, positions, ages, slot.record.position, position)
            slot.record = _moved(slot.record, position, last_at)
        return failures

    def _still_ours(self, slot: Slot, current: VersionRecord | None) -> bool:
        """Check the tracking row before writing: moved, repaired or retired under us?"""
        if current is None or not current.state.writable or current.owner != RUNNER:
            if current is None:
                why = "absent"
            elif current.owner != RUNNER:
                why = f"handed over to {current.owner}"
            else:
                why = current.state.value
            log.info("projection %s v%s is %s; releasing it", *slot.key, why)
            self._release(slot)  # (its lag goes at the next claim: ``_forget_lag``)
            return False
        if current.position != slot.record.position or current.epoch != slot.record.epoch:
            # Someone else wrote these tables (a repair, or a runner that had our lock).
            slot.cache.clear()
        slot.record = current
        return True

    def _handle_failure(self, store: ReadStore, failure: Failure) -> None:
        slot, event = failure.slot, failure.event
        attempts = slot.attempts.get(event.position, 0) + 1
        slot.attempts[event.position] = attempts
        if attempts < self.max_attempts:
            log.warning(
                "projection %s v%s failed on event %s at position %s (attempt %s of %s)",
                *slot.key,
                event.type,
                event.position,
                attempts,
                self.max_attempts,
                extra={SUBJECT: slot.key},  # one version's retries never hide another's
            )
            self._stop.wait(self.retry_backoff * 2 ** (attempts - 1))
            return
        log.error(
            "projection %s v%s parked event %s at position %s and stopped:\n%s",
            *slot.key,
            event.type,
            event.position,
            failure.error,
            extra={LIMITED_AT_SOURCE: True},  # once per stop: see _stop_version
        )
        reason = (
            f"event {event.type} at position {event.position} failed {attempts} times; "
            f"see daybook_dead_letters. Last error: {failure.error.strip().splitlines()[-1]}"
        )
        letter = (event.position, event.type, event.originator_id, failure.error, attempts)
        self._stop_version(store, slot, reason, letter)

    def _stop_version(
        self,
        store: ReadStore,
        slot: Slot,
        reason: str,
        letter: tuple[int, str, str, str, int] | None = None,
    ) -> None:
        """Stop the version (with its dead letter, if an event caused it) and let it go."""
        # Once per stop of this version: never held back by another version's line (which,
        # held back, would never be written, as it does not repeat).
        log.error("projection %s v%s stopped: %s", *slot.key, reason,
                  extra={LIMITED_AT_SOURCE: True})  # fmt: skip
        self.halted[slot.key] = _stopped(slot.key, reason)
        try:
            with store.transaction():
                VersionCatalog(store).stop(*slot.key, reason)
                if letter is not None:
                    position, event_type, originator_id, error, attempts = letter
                    DeadLetters(store).add(
                        *slot.key, position, event_type, originator_id, error, attempts
                    )
            if letter is not None:
                metrics.PROJECTION_PARKED.labels(slot.key[0], str(slot.key[1])).inc()
        except (IllegalTransition, LookupError) as refused:
            # Retired (or stopped) by someone else meanwhile: not ours to park any more.
            log.info("projection %s v%s: %s; releasing it", *slot.key, refused)
        self._release(slot)

    def _switch_caught_up(self, store: ReadStore, reached: int) -> None:
        """A rebuilding version that read to the end of the log (``reached``: the position
        of the last event there was) replaces the active one; the first version of a
        projection starts serving."""
        if not self.switch:
            return
        catalog = VersionCatalog(store)
        for slot in list(self.slots.values()):
            if slot.record.state is not VersionState.REBUILDING or slot.record.position < reached:
                continue
            try:
                with store.transaction(write=False):
                    ready = self._may_switch(catalog, slot, reached, lock=False)
                if not ready:
                    continue
                catalog.build_keys(slot.projection)  # before the switch locks any row
                with store.transaction():
                    if not self._may_switch(catalog, slot, reached, lock=True):
                        continue
                    # Marks the old version retired: its runner, which locks that row at the
                    # start of every batch, lets go of it at its next batch.
                    # The replaced version's tables, unless kept, are marked to drop with
                    # the switch, and dropped once it has committed (``drop_retired`` says
                    # why not here), or by any runner that connects, should this one not
                    # get there (a lost reply).
                    catalog.activate(slot.projection, keep_old=self.keep_old)
                    catalog.set_note(*slot.key, None)
                    crash_point("runner.switch")  # the switch written; COMMIT next
            except Exception as error:
                if not store.refused_rows(error):
                    raise
                # Appended rows that repeat a key are found when the key's index is built,
                # as the version is about to serve: it never serves.
                slot.cache.clear()
                self._stop_version(store, slot, repeated_keys(error))
                continue
            slot.record = replace(slot.record, state=slot.record.state.activated())
            log.info("projection %s now reads from version %s", *slot.key)
            self.drops.drop(store, slot.projection.name)

    def _may_switch(self, catalog: VersionCatalog, slot: Slot, reached: int, *, lock: bool) -> bool:
        """Whether ``slot``'s version may start serving: still this runner's, rebuilding, read
        up to ``reached``, no newer version serving, and not behind the serving one
        (``VersionCatalog.may_replace_serving``). Asked before its keys are built (a build
        takes a while), and again under the lock of its row and then of the serving
        version's row (the order ``activate`` locks them in), held to the switch's COMMIT."""
        current = catalog.version(*slot.key, lock=lock)
        if current is None or current.state is not VersionState.REBUILDING:
            return False
        if current.position < reached or current.owner != RUNNER:
            return False
        return catalog.may_replace_serving(slot.projection, current.position, lock=lock)


def _report_lag(key: tuple[str, int], events: int, seconds: float) -> None:
    """Set a version's lag gauges: events not applied, and the age of the oldest."""
    labels = (key[0], str(key[1]))
    metrics.PROJECTION_LAG_EVENTS.labels(*labels).set(max(0, events))
    metrics.PROJECTION_LAG_SECONDS.labels(*labels).set(max(0.0, seconds))


def _forget_lag(key: tuple[str, int]) -> None:
    """Stop reporting the lag of a version this runner does not follow (any more, or yet:
    retired, another's, stopped, written by another runner while this one stands by): its
    last figures would stay, and an alert on them fire (or stay quiet) for nothing. Whoever
    follows it reports it."""
    for gauge in (metrics.PROJECTION_LAG_EVENTS, metrics.PROJECTION_LAG_SECONDS):
        with contextlib.suppress(KeyError):
            gauge.remove(key[0], str(key[1]))


def _count_applied(
    slot: Slot, positions: list[int], ages: list[float], before: int, after: int
) -> None:
    """Count the events a version applied in a committed batch (past ``before``, up to
    ``after``), and how long each took from its time to the commit (``ages``)."""
    first, last = bisect_right(positions, before), bisect_right(positions, after)
    if last <= first:
        return
    name, version = slot.key
    metrics.PROJECTION_APPLIED.labels(name, str(version)).inc(last - first)
    metrics.observe_many(
        metrics.CONVERGENCE_SECONDS.labels(name), [max(0.0, age) for age in ages[first:last]]
    )


def _unresolved_letters(store: ReadStore, name: str, version: int) -> int:
    rows = store.execute(
        "SELECT count(*) FROM daybook_dead_letters"
        " WHERE name = %s AND version = %s AND resolved_at IS NULL",
        (name, version),
    )
    return int(rows[0][0]) if rows else 0


def _moved(record: VersionRecord, position: int, last_event_at: str | None) -> VersionRecord:
    return replace(record, position=position, last_event_at=last_event_at or record.last_event_at)


def _stopped(key: tuple[str, int], reason: str | None) -> str:
    """What a stopped version's health says: why, and what to do."""
    return f"{key[0]} v{key[1]} stopped: {reason}; once fixed: daybook projections resume {key[0]}"
