"""Group commit: many callers' commands applied in order and committed in one transaction.

A single writer thread takes every command that is waiting, runs them one after another
against the cached aggregates (``Ledger.execute``) and commits all their events and request
records in one transaction. While it commits, new commands queue up and form the next batch,
so batches grow with load and a lone caller waits for nobody.

Each caller gets exactly its own outcome, and only after the commit: its receipt, its
refusal, or its replay. If the commit fails, ``Ledger.execute`` re-runs the batch on fresh
state (request records make a commit that did happen show up as replays), so no caller is
ever told success for an event that is not durable.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from eventsourcing.persistence import PersistenceError

from domain.commands import Command
from domain.errors import DomainError
from domain.ledger import Ledger, Outcome, Receipt

_Item = tuple[Command, "Future[Receipt]"]


class LedgerClosed(RuntimeError):
    """A command was submitted after the ledger was closed."""


class GroupCommitter:
    """Batches concurrent commands into shared transactions (see the module docstring)."""

    def __init__(self, ledger: Ledger, *, max_batch: int = 1000) -> None:
        self._ledger = ledger
        self._max_batch = max_batch
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
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

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
