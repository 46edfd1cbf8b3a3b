"""Bulk application of the log: rebuilds and long catch-ups, tens of thousands of events/s.

``BulkRunner`` is a ``ProjectionRunner`` (same slots, advisory locks, tracking rows checked
and moved in the same transaction as the rows, blue/green switch) whose batches are large
and cheap per event:

- the log is read as raw tuples and decoded by ``EventDecoder`` (topics resolved once,
  events no projection handles skipped before decoding);
- each event goes through a per-type list of the handlers of every projection at once;
- handlers write through ``BulkRows``: no undo journal and no column check per ``put``;
  rows are checked once each, when the batch is written;
- rows never written before go to the tables with COPY, changed ones with one upsert per
  table, through a staging table.

A batch either applies completely or changes nothing: if any handler raises, or a row has
the wrong columns, the buffered batch is dropped and the same events go through the
careful path (``ProjectionRunner._apply_batch``: undo journal, per-put checks), which applies
everything before the bad event and retries, then parks, that one exactly as the live runner
does. Both paths run the same definitions, so they build identical tables. A batch whose
rows the database refuses (a value out of range) rolls back, and its events go through the
careful path too, which stops only the projection whose rows caused it, as the live runner
does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from daybook.infrastructure.eventstore.log import EventDecoder, EventLog, RawEvent
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.checkpoints import RUNNER
from daybook.infrastructure.readmodels.engine import BulkRows, Slot, TablePlan, apply_fast
from daybook.infrastructure.readmodels.runner import Progress, ProjectionRunner, _moved
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import first_line
from daybook.projections.model import Projection, iso_time

log = logging.getLogger(__name__)


class LostSlot(Exception):
    """A projection version's tracking row changed under a batch in flight (a repair, a
    retirement, another writer): the batch rolled back."""


@dataclass
class _Flight:
    """A batch being written by the writer thread, and what to report once it commits."""

    future: Future[None]
    progress: Progress


class BulkRunner(ProjectionRunner):
    """A ``ProjectionRunner`` whose every batch takes the bulk path (see the module doc).

    ``batch_size`` events make one read-model transaction; a larger batch writes each changed
    row less often (a balance changed by a hundred deposits is written once), a smaller one
    commits progress more often.

    Batches are pipelined: while one batch is written and committed by a writer thread, the
    next one is read (a reader thread fetches it ahead) and computed over the row cache as the
    written batch leaves it. If that commit fails, or finds a tracking row changed, the
    computed batch is dropped with the caches, and the runner starts again from what is
    committed, exactly as after any failed batch. The store's connection is used by one
    thread at a time: the writer's batch lands before anything else touches it.
    """

    def __init__(
        self,
        log: EventLog,
        readmodels_url: str,
        projections: Sequence[Projection],
        *,
        batch_size: int = 100_000,
        **options: Any,
    ) -> None:
        super().__init__(log, readmodels_url, projections, batch_size=batch_size, **options)
        handled = {name for p in self.projections for name in p.handlers}
        self.decoder = EventDecoder(self.log.mapper, handled)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="daybook-bulk-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="daybook-bulk-reader")
        self._flight: _Flight | None = None
        self._ahead: tuple[int, Future[list[RawEvent]]] | None = None
        #: Whether the next batch takes the careful path: the database refused the rows of
        #: the last one, and only that path finds whose they were.
        self._careful = False

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self._land()
        except Exception:  # already logged by whoever stops us; nothing half-written
            log.warning("bulk runner: the last batch did not commit", exc_info=True)
        super().stop(timeout)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _disconnect(self) -> None:
        if self._flight is not None:
            wait([self._flight.future])
            self._flight = None
        super()._disconnect()

    def _step(self) -> int:
        """Apply one bulk batch; returns how many log events it read (0 when caught up)."""
        if self._flight is None:
            store = self._connect()
            self._claim_slots(store)
        else:
            assert self.store is not None
            store = self.store
        if not self.slots:
            return 0
        start = min(slot.record.position for slot in self.slots.values())
        raw = self._read(start)
        if not raw:
            if not self._land():
                # The batch in flight did not commit (refused, or a tracking row changed):
                # the log is not read to its end for what is committed; go again from it.
                return self._step()
            self._switch_caught_up(store, start)
            return 0
        # The tracking row keeps the time of the last event read, wanted or not.
        (final,) = self.log.decoder.decode(raw[-1:])
        last, last_at = final.position, iso_time(final.timestamp)
        if len(raw) == self.batch_size and self.log.concurrent_scans:
            self._ahead = (last, self._reader.submit(self.log.scan, last, self.batch_size))
        if self._careful:
            self._careful = False
            return self._apply_carefully(store, raw, start, last)
        if not self._caches_complete() and not self._land():
            # Handlers may fetch rows: the connection must be free. The batch in flight did
            # not commit: everything was let go, to be claimed again.
            return len(raw)
        batches = [
            (slot, BulkRows(slot, store))
            for slot in self.slots.values()
            if slot.record.position < last
        ]
        try:
            apply_fast(self.decoder.iterate(raw), batches)
            plans = [rows.plan() for _, rows in batches]
        except Exception:  # a handler failed or put a bad row: the careful path decides
            if not self._land():
                return len(raw)
            return self._apply_carefully(store, raw, start, last)
        if not self._land():
            return len(raw)  # computed on rows that did not commit: read again
        expected = [(slot.key, slot.record.position, slot.record.epoch) for slot, _ in batches]
        future = self._writer.submit(_write, store, batches, plans, expected, last, last_at)
        self._flight = _Flight(future, Progress(len(raw), last, 0))
        # Optimistic: the next batch builds on this one; ``_land`` undoes this if it fails.
        for slot, rows in batches:
            rows.merge_into_cache()
            slot.record = _moved(slot.record, last, last_at)
            if slot.attempts:
                slot.attempts = {p: n for p, n in slot.attempts.items() if p > last}
        if len(raw) < self.batch_size:
            self._land()
            self._switch_caught_up(store, last)
        return len(raw)

    def _apply_carefully(self, store: ReadStore, raw: list[RawEvent], start: int, last: int) -> int:
        """The careful path (``ProjectionRunner._apply_batch``) for ``raw``: a bad event is
        retried, then parked; rows the database refuses stop their projection alone."""
        self._ahead = None
        self._apply_each(store, self.decoder.decode(raw), start)
        if self.on_progress is not None:
            self.on_progress(Progress(len(raw), last, self.log.head()))
        return len(raw)

    def _read(self, start: int) -> list[RawEvent]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == start:
            return ahead[1].result()
        return self.log.scan(start, self.batch_size)

    def _caches_complete(self) -> bool:
        return all(
            slot.cache.complete.get(table.name, False)
            for slot in self.slots.values()
            for table in slot.projection.tables
            if not table.append_only
        )

    def _land(self) -> bool:
        """Wait for the batch in flight. True if it committed (or there was none); False if
        a tracking row had changed, or the database refused its rows (everything is let go,
        to be claimed again; after a refusal the next batch takes the careful path, which
        stops the projection whose rows they were); raises any other error that failed it,
        after dropping the caches built on it."""
        flight, self._flight = self._flight, None
        if flight is None:
            return True
        try:
            flight.future.result()
        except LostSlot as lost:
            log.info("bulk runner: %s; starting again from the committed position", lost)
            self._ahead = None
            self._disconnect()
            return False
        except Exception as error:
            self._ahead = None
            refused = self.store is not None and self.store.refused_rows(error)
            self._disconnect()
            if not refused:
                raise
            log.info("bulk runner: the database refused a batch's rows (%s); writing it with"
                     " the careful path", first_line(error))  # fmt: skip
            self._careful = True
            return False
        except BaseException:
            self._ahead = None
            self._disconnect()
            raise
        if self.on_progress is not None:
            progress = flight.progress
            self.on_progress(Progress(progress.events, progress.position, self.log.head()))
        return True


def _write(
    store: ReadStore,
    batches: list[tuple[Slot, BulkRows]],
    plans: list[list[TablePlan]],
    expected: list[tuple[tuple[str, int], int, int]],
    last: int,
    last_at: str,
) -> None:
    """One batch's transaction (in the writer thread): check each tracking row still holds
    the position and epoch the batch was computed from, write the rows, move the positions."""
    catalog = VersionCatalog(store)
    with store.transaction():
        for (_, rows), plan, (key, position, epoch) in zip(batches, plans, expected, strict=True):
            current = catalog.version(*key, lock=True)
            if current is None or not current.state.writable or current.owner != RUNNER:
                state = "absent" if current is None else current.state.value
                if current is not None and current.owner != RUNNER:
                    state = f"handed over to {current.owner}"
                msg = f"projection {key[0]} v{key[1]} is {state}"
                raise LostSlot(msg)
            if current.position != position or current.epoch != epoch:
                msg = f"projection {key[0]} v{key[1]} was changed by another writer"
                raise LostSlot(msg)
            rows.write(plan)
            catalog.set_position(*key, last, last_at)
        crash_point("bulk.before_commit")
