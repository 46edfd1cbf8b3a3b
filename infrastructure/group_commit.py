"""Group commit: many callers' commands applied in order and committed in one transaction.

A single writer thread takes every command that is waiting, runs them one after another
against the cached aggregates (``Ledger.prepare``) and hands the batch to a committing thread,
which writes all its events and request records in one transaction (``Ledger.commit``).
While that transaction commits (the database's fsync, with the GIL released), the writer
thread already prepares the next batch on top of the state the committing one leaves behind:
the Python work of one batch overlaps the disk wait of the previous one. Batches grow with
load, and a lone caller waits for nobody.

A commit costs one fsync whatever its size, so a batch should carry every caller that is about
to send: the callers a commit just answered usually send their next command within a fraction
of a millisecond. When fewer commands are waiting than the last batch answered, the writer
waits for the rest, at most ``max_wait`` (5 ms); a lone caller never waits.

The next batch is only committed after the previous one committed. If the previous one fails
(a conflict with another process, a lost connection), the next one, built on its state, is
thrown away unseen, the failed batch goes through ``Ledger.execute`` (re-applied on fresh
state, with replays for anything that did commit), and the next batch is prepared again.

Each caller gets exactly its own outcome, and only after the commit: its receipt, its
refusal, or its replay. If the commit fails, ``Ledger.execute`` re-runs the batch on fresh
state (request records make a commit that did happen show up as replays), so no caller is
ever told success for an event that is not durable.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from eventsourcing.persistence import PersistenceError

from domain.commands import Command
from domain.errors import DomainError
from domain.ledger import Ledger, Outcome, PreparedBatch, Receipt

_Item = tuple[Command, "Future[Receipt]"]


class _InFlight:
    """A prepared batch whose transaction the committing thread is running."""

    def __init__(self, items: list[_Item], prepared: PreparedBatch, commit: Future[list[Outcome]]):
        self.items = items
        self.prepared = prepared
        self.commit = commit


class LedgerClosed(RuntimeError):
    """A command was submitted after the ledger was closed."""


class GroupCommitter:
    """Batches concurrent commands into shared transactions (see the module docstring)."""

    def __init__(self, ledger: Ledger, *, max_batch: int = 1000, max_wait: float = 0.005) -> None:
        self._ledger = ledger
        self._max_batch = max_batch
        self._max_wait = max_wait
        #: How many callers the last committed batch answered: most will send again soon.
        self._expected = 0
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="daybook-group-commit", daemon=True)
        self._thread.start()

    def submit_future(self, command: Command) -> Future[Receipt]:
        """Queue ``command``; the future holds its receipt or raises its refusal."""
        if self._closed.is_set():
            raise LedgerClosed("the ledger is closed; open a new one to submit commands")
        future: Future[Receipt] = Future()
        self._queue.put((command, future))
        return future

    def submit(self, command: Command) -> Receipt:
        return self.submit_future(command).result()

    def close(self) -> None:
        """Finish the commands already queued, then stop the writer thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        committer = ThreadPoolExecutor(1, thread_name_prefix="daybook-commit")
        in_flight: _InFlight | None = None
        try:
            while True:
                items = self._take(block=in_flight is None)
                if items is None:  # closing
                    break
                if not items:  # nothing new waiting: finish the commit under way
                    assert in_flight is not None
                    self._finish(in_flight)
                    in_flight = None
                    continue
                commands = [command for command, _ in items]
                try:
                    prepared = self._ledger.prepare(
                        commands, after=in_flight.prepared if in_flight else None
                    )
                except Exception:  # StaleCache, a lost connection, or a bug in one command
                    prepared = None  # take the slow, careful path below
                if in_flight is not None:
                    if not self._finish(in_flight):
                        prepared = None  # it was built on a batch that did not commit
                    in_flight = None
                if prepared is None:
                    self._commit(items)
                    continue
                in_flight = _InFlight(
                    items, prepared, committer.submit(self._ledger.commit, prepared)
                )
            if in_flight is not None:
                self._finish(in_flight)
        finally:
            committer.shutdown()

    def _take(self, *, block: bool) -> list[_Item] | None:
        """Everything waiting, up to ``max_batch`` (waiting for one item if ``block``);
        None once the committer is closing and the queue is drained."""
        items: list[_Item] = []
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return items
        deadline = time.monotonic() + self._max_wait
        while item is not None:
            items.append(item)
            if len(items) >= self._max_batch:
                return items
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                # Callers just answered are probably about to send their next command:
                # wait a moment for them rather than commit a fraction of them.
                # (Not while a commit is under way: its callers are waiting to be answered.)
                wait = deadline - time.monotonic()
                if not block or len(items) >= self._expected or wait <= 0:
                    return items
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    return items
        # The close marker: serve what came before it, then report closing.
        if items:
            self._queue.put(None)
            return items
        return None

    def _finish(self, in_flight: _InFlight) -> bool:
        """Wait for a batch's transaction; settle its callers. False if it did not commit
        (its callers are then served by ``Ledger.execute``, which retries carefully)."""
        try:
            outcomes = in_flight.commit.result()
        except Exception:
            self._commit(in_flight.items)
            return False
        for (_, future), outcome in zip(in_flight.items, outcomes, strict=True):
            _settle(future, outcome)
        self._expected = len(in_flight.items)
        return True

    def _commit(self, batch: list[_Item]) -> None:
        try:
            outcomes = self._ledger.execute([command for command, _ in batch])
        except PersistenceError as error:
            # The store is unreachable: nothing was committed for anyone in this batch
            # (or, if it was, a retry with the same request ids will replay it).
            for _, future in batch:
                future.set_exception(error)
            return
        except Exception as error:
            if len(batch) == 1:
                _, future = batch[0]
                future.set_exception(error)
                return
            # An unexpected error in one command must not fail its neighbours: run each
            # alone. Nothing of the failed batch was committed.
            for item in batch:
                self._commit([item])
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)


def _settle(future: Future[Receipt], outcome: Outcome) -> None:
    if isinstance(outcome, DomainError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
