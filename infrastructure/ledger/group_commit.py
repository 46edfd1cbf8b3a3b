"""Group commit: many callers' commands applied in order and committed in one transaction.

Three kinds of thread take part. Callers (threads, or asyncio tasks on their event loop) put
commands in the inbox and wait. One writer thread applies them, in arrival order, to the
cached aggregates (``LedgerService.apply``): it builds the next batch *while callers are still
sending* and *while the previous batch commits*, so the Python work of applying commands
overlaps both the callers' turnaround and the database's fsync. One committing thread writes
each batch in one transaction (``LedgerService.commit``) and answers its callers the moment it has
committed.

When to commit a batch: a commit costs about one fsync, and a fixed amount of client CPU,
whatever its size, so a batch should carry every caller that is about to send. The callers a
commit just answered usually send their next command within a fraction of a millisecond, so
the writer keeps gathering (and applying) until the batch holds as many commands as the last
commit answered, at most ``max_wait`` (5 ms) after its first; a lone caller waits for nobody.
(Sending whatever arrived as soon as the previous commit ended splits the callers into
smaller batches, which costs more than it saves.)

Batches commit strictly in order, one at a time. A batch is built on the uncommitted state of
the one committing before it; if that commit fails (a conflict with another process, a lost
connection), nobody is told anything: the failed batch goes through ``LedgerService.execute``
(re-applied on fresh state, looking every request id up, so anything that did commit is
replayed rather than applied twice), and the batch built on top of it is thrown away and its
commands applied again. Each caller gets exactly its own outcome, and only after its commit:
its receipt, its refusal, or its replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError

from daybook.domain.commands import Command, Receipt
from daybook.infrastructure.ledger.application import (
    LedgerClosed as LedgerClosed,
)
from daybook.infrastructure.ledger.application import (
    LedgerService,
    Outcome,
    PreparedBatch,
    count_outcomes,
    unavailable,
)
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, VersionConflict
from daybook.infrastructure.lifecycle import Health, ServiceState, Supervisor
from daybook.infrastructure.observability.logs import LIMITED_AT_SOURCE


class _Waiter:
    """Where a blocked thread waits for its outcome: a lock the settling thread releases.
    (The cheapest hand-over between threads in CPython: a ``Future`` costs a condition
    variable, and measurably more CPU per command, which the writer thread then lacks.)"""

    __slots__ = ("_lock", "_outcome")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._outcome: Outcome | BaseException | None = None

    def settle(self, outcome: Outcome | BaseException) -> None:
        if self._outcome is not None:  # settled already (see GroupCommitter._abandon)
            return
        self._outcome = outcome
        self._lock.release()

    def wait(self) -> Receipt:
        self._lock.acquire()
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome


class _AsyncReply:
    """An asyncio caller's future, settled on its own event loop."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Receipt] = loop.create_future()


class _Submission:
    """The outcomes of one batch submission, gathered as the batches carrying its commands
    commit (possibly several, settled from both the writer and the committing thread); its
    caller is woken once, when the last arrives."""

    __slots__ = ("_lock", "_remaining", "done", "future", "loop", "outcomes")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.outcomes: list[Outcome | BaseException | None] = [None] * count
        self._remaining = count
        self._lock = threading.Lock()
        #: For a thread: released when complete. For a coroutine: ``loop`` and a future.
        self.done = threading.Lock()
        self.done.acquire()
        self.loop = loop
        self.future: asyncio.Future[list[Outcome | BaseException]] | None = (
            loop.create_future() if loop is not None else None
        )

    def settle(self, index: int, outcome: Outcome | BaseException) -> bool:
        """Fill one slot; True if that was the last."""
        with self._lock:
            if self.outcomes[index] is not None:
                return False
            self.outcomes[index] = outcome
            self._remaining -= 1
            return self._remaining == 0

    def wait(self) -> list[Outcome | BaseException]:
        self.done.acquire()
        return self.outcomes  # type: ignore[return-value]


class _Slot:
    """One command's place in a ``_Submission``."""

    __slots__ = ("index", "submission")

    def __init__(self, submission: _Submission, index: int) -> None:
        self.submission = submission
        self.index = index


_log = logging.getLogger(__name__)

_Reply = _Waiter | _AsyncReply | _Slot
_Item = tuple[Command, _Reply]


class _Inbox:
    """The queue from callers to the writer thread, which it wakes only when asked to.

    A plain queue wakes a waiting consumer on every put: with 16 callers that is 16 thread
    switches per batch, each costing CPU the writer should spend applying commands. Here the
    writer says how many commands it waits for, and only the put that reaches that number
    (or a ``poke``: a commit ended; or ``close``) wakes it.
    """

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._lock = threading.Lock()
        #: Held while the writer sleeps; released by whoever should wake it.
        self._wake = threading.Lock()
        self._wake.acquire()
        #: Wake the writer when this many commands wait (0: it is not sleeping).
        self._want = 0
        self._poked = False
        self._closing = False

    def put(self, item: _Item) -> None:
        # ``put_many`` for one item, written out: this runs for every command.
        with self._lock:
            if self._closing:
                raise LedgerClosed("the ledger is closed; open a new one to submit commands")
            self._items.append(item)
            if self._want and len(self._items) >= self._want:
                self._want = 0
                self._wake.release()

    def put_many(self, items: Sequence[_Item]) -> None:
        """Queue ``items`` together (nobody else's come between them)."""
        with self._lock:
            if self._closing:
                raise LedgerClosed("the ledger is closed; open a new one to submit commands")
            self._items.extend(items)
            if self._want and len(self._items) >= self._want:
                self._want = 0
                self._wake.release()

    def poke(self) -> None:
        """Wake the writer now (or make its next ``take`` return at once)."""
        with self._lock:
            self._poked = True
            if self._want:
                self._want = 0
                self._wake.release()

    def close(self) -> None:
        """Refuse new commands; the writer still takes those already waiting."""
        with self._lock:
            self._closing = True
            if self._want:
                self._want = 0
                self._wake.release()

    def take(self, want: int, timeout: float | None, limit: int) -> list[_Item] | None:
        """Wait until ``want`` commands are waiting, a poke, closing, or ``timeout``
        seconds; then take up to ``limit`` of them. None once closed and drained."""
        with self._lock:
            sleep = not (len(self._items) >= want or self._poked or self._closing)
            if sleep:
                self._want = want
        if sleep and not self._wake.acquire(timeout=-1 if timeout is None else timeout):
            with self._lock:  # timed out; unless somebody woke us just now, stop asking
                if self._want:
                    self._want = 0
                else:
                    self._wake.acquire()  # re-arm: they released it
        with self._lock:
            self._poked = False
            if self._closing and not self._items:
                return None
            return [self._items.popleft() for _ in range(min(len(self._items), limit))]


class _CommitThread:
    """The committing thread: runs what it is given one at a time, in order, each answered
    by a ``Future``. Not a ``ThreadPoolExecutor``: concurrent.futures refuses new work once
    the interpreter begins to shut down (when the main thread ends), while the process's
    other threads may still be sending commands for a while. Started and shut down by the
    writer thread, its only user."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Any, tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def submit(self, work: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._work.put((future, work, args))
        return future

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, work, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = work(*args)
            except BaseException as error:
                future.set_exception(error)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Finish what was given, then end the thread (if it was started)."""
        self._work.put(None)
        if self.thread.ident is not None:
            self.thread.join()


class _Batch:
    """Commands and their callers, applied in memory and waiting for (or under) commit."""

    def __init__(self, prepared: PreparedBatch, deadline: float) -> None:
        self.prepared = prepared
        self.items: list[_Item] = []
        #: When to commit it even if fewer callers came than expected.
        self.deadline = deadline
        self.commit: Future[None] | None = None


class GroupCommitter:
    """Batches concurrent commands into shared transactions (see the module docstring).

    ``apply_every``: while gathering, the writer wakes to apply commands once this many wait
    (fewer thread switches than waking for each; enough to overlap the callers' turnaround).

    ``pipeline_at``: the writer applies at most this many commands at a time, and a batch
    holding this many goes out as soon as nothing is committing. Commands that arrive
    together in large numbers (a batch submission) are then applied while the commands
    before them commit, instead of all being applied first and committed after.
    """

    def __init__(
        self,
        ledger: LedgerService,
        *,
        max_batch: int = 1000,
        max_wait: float = 0.005,
        apply_every: int = 4,
        pipeline_at: int = 200,
    ) -> None:
        self._ledger = ledger
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._apply_every = apply_every
        self._pipeline_at = pipeline_at
        #: How many callers the last commit answered: most will send again soon.
        self._expected = 1
        self._inbox = _Inbox()
        self._closed = threading.Event()
        self._closing = threading.Lock()
        # Writer-thread state: the batch committing, and the one being built on top of it.
        self._committing: _Batch | None = None
        self._building: _Batch | None = None
        #: Commands taken from the inbox and not yet in a batch.
        self._in_hand: list[_Item] = []
        self._committer = _CommitThread("daybook-commit_0")
        self._thread = threading.Thread(target=self._run, name="daybook-group-commit", daemon=True)
        #: Its health: running, stopped, or failed with the reason (a bug in the writer).
        self.supervisor = Supervisor("group commit")

    def start(self) -> None:
        """Start the writer thread (commands submitted before wait in the inbox)."""
        if self.supervisor.move(ServiceState.RUNNING) and not self._thread.is_alive():
            self._thread.start()

    def health(self) -> Health:
        return self.supervisor.health()

    def submit(self, command: Command) -> Receipt:
        """Run ``command`` with whatever else is waiting; its receipt, or raise its refusal."""
        waiter = _Waiter()
        self._inbox.put((command, waiter))
        return waiter.wait()

    def submit_async(self, command: Command) -> asyncio.Future[Receipt]:
        """The same from a coroutine (call it on the event loop): the future's result is
        the receipt, or its exception the refusal."""
        reply = _AsyncReply(asyncio.get_running_loop())
        self._inbox.put((command, reply))
        return reply.future

    def submit_many(self, commands: Sequence[Command]) -> list[Outcome | BaseException]:
        """Run ``commands`` in order, batched with whatever else is waiting; one outcome per
        command (its receipt, its refusal, or the error that stopped it)."""
        if not commands:
            self._inbox.put_many([])  # nothing to queue; but a closed ledger says so
            return []
        submission = _Submission(len(commands))
        self._inbox.put_many(
            [(command, _Slot(submission, i)) for i, command in enumerate(commands)]
        )
        return submission.wait()

    def submit_many_async(
        self, commands: Sequence[Command]
    ) -> asyncio.Future[list[Outcome | BaseException]]:
        """The same from a coroutine (call it on the event loop)."""
        loop = asyncio.get_running_loop()
        submission = _Submission(len(commands), loop)
        assert submission.future is not None
        if not commands:
            self._inbox.put_many([])  # nothing to queue; but a closed ledger says so
            submission.future.set_result([])
            return submission.future
        self._inbox.put_many(
            [(command, _Slot(submission, i)) for i, command in enumerate(commands)]
        )
        return submission.future

    def close(self) -> None:
        """Finish the commands already queued, then stop the writer thread. After the
        writer itself failed (it closed the inbox and told its callers), wait for it to end:
        a closed ledger leaves no thread behind, and its health stays failed."""
        with self._closing:  # several threads may close at once: one of them closes
            closing = not self._closed.is_set()
            if closing:
                self._closed.set()
                self.supervisor.move(ServiceState.STOPPING)
                self._inbox.close()
                if not self._thread.is_alive() and self._thread.ident is None:
                    self._thread.start()  # never started: it drains the inbox and stops
        if threading.current_thread() is not self._thread and self._thread.ident is not None:
            self._thread.join()
        if closing:
            self.supervisor.move(ServiceState.STOPPED)

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        closing = False
        try:
            self._committer.thread.start()
            while True:
                committing = self._committing
                if committing is not None and committing.commit is not None:
                    if committing.commit.done():
                        self._committed(committing)
                    elif closing:
                        with contextlib.suppress(Exception):
                            committing.commit.result()
                        continue
                building = self._building
                ready = building is not None and (closing or self._full(building))
                if ready and self._committing is None:
                    assert building is not None
                    self._start_commit(building)
                    continue
                if closing:
                    if self._committing is None and self._building is None:
                        return
                    continue
                items = self._inbox.take(*self._what_to_wait_for())
                if items is None:
                    closing = True
                elif items:
                    self._apply(items)
        except BaseException as error:
            # Once per ledger: never held back by another ledger's line in the process.
            _log.exception("daybook's group commit writer failed; the ledger is closed",
                           extra={LIMITED_AT_SOURCE: True})  # fmt: skip
            self.supervisor.move(ServiceState.FAILED, f"{type(error).__name__}: {error}")
            self._abandon(error)
        finally:
            self._committer.shutdown()

    def _abandon(self, error: BaseException) -> None:
        """The writer thread itself failed (a bug, not a refusal): refuse new commands and
        tell every caller still waiting, rather than leave them blocked. None of their
        commands was committed, except those of a commit that succeeds meanwhile (whose
        callers it answers itself)."""
        self._closed.set()
        self._inbox.close()
        # Coded (``ledger_closed``): a caller that handles daybook's errors recognises it.
        stopped = LedgerClosed(
            f"daybook's group commit stopped ({error!r}); not committed; the ledger is "
            "closed: open a new one"
        )
        waiting: list[_Item] = []
        committing, self._committing = self._committing, None
        if committing is not None:
            commit = committing.commit
            if commit is None:
                waiting += committing.items  # its commit could not even be started
            else:
                with contextlib.suppress(Exception):
                    commit.result()
                if commit.exception() is not None:
                    waiting += committing.items
        if self._building is not None:
            waiting += self._building.items
            self._building = None
        waiting += self._in_hand
        while items := self._inbox.take(0, 0, self._max_batch):
            waiting += items
        _settle(waiting, [stopped] * len(waiting))

    def _what_to_wait_for(self) -> tuple[int, float | None, int]:
        """(commands to wait for, timeout, most to take)."""
        building = self._building
        taken = len(building.items) if building else 0
        limit = min(self._max_batch - taken, self._pipeline_at)
        if building is None:
            return 1, None, limit  # the first command (a finished commit pokes us)
        if self._committing is not None:
            if limit == 0:
                # Full, and waiting for the commit under way: sleep until it pokes us.
                # (Asking for more would return at once, and spinning here takes the
                # interpreter from the committing thread.)
                return sys.maxsize, None, 0
            return self._apply_every, None, limit  # more, until the commit pokes us
        missing = max(1, min(self._expected - taken, self._apply_every))
        return missing, max(0.0, building.deadline - time.monotonic()), limit

    def _full(self, building: _Batch) -> bool:
        taken = len(building.items)
        return (
            taken >= self._expected
            or taken >= self._max_batch
            or taken >= self._pipeline_at
            or time.monotonic() >= building.deadline
        )

    def _apply(self, items: list[_Item]) -> None:
        """Apply newly arrived commands to the batch being built."""
        self._in_hand = items  # for _abandon, should the writer fail in between
        self._apply_in_hand(items)
        self._in_hand = []

    def _apply_in_hand(self, items: list[_Item]) -> None:
        building = self._building
        if building is None:
            committing = self._committing
            now = time.monotonic()
            building = self._building = _Batch(
                # On the state of the batch still committing, if there is one.
                self._ledger.new_batch(after=committing.prepared if committing else None),
                deadline=now + self._max_wait,
            )
        commands = [command for command, _ in items]
        started = self._ledger.monotonic()
        try:
            # A caller-chosen id may have been recorded by an earlier batch (a retry): look
            # those up first, so the retry is replayed instead of failing the batch.
            self._ledger.apply(building.prepared, commands, known=self._ledger.lookup(commands))
        except Exception as error:
            # A stale cache, a lost connection, or a bug in one command: this batch's state
            # is suspect. Serve all its commands the careful way, after the commit under way;
            # unless the database did not answer a read (nothing sent) in an outage that has
            # outlasted its budget (commands queued behind one that retried it): answered
            # now, as the careful way's first attempt would have, after waiting the pool once
            # more.
            answer = isinstance(
                error, OperationalError | InterfaceError
            ) and self._ledger.outage_outlasted(started, error)
            self._building = None
            self._wait_for_commit()
            waiting = building.items + items
            if answer:
                # Coded, as the careful way answers an outage (``unavailable``): one each.
                _settle(waiting, [unavailable(error) for _ in waiting])
            else:
                self._execute(waiting)
            return
        building.items.extend(items)

    def _start_commit(self, batch: _Batch) -> None:
        self._building = None
        self._committing = batch
        batch.commit = self._committer.submit(self._commit, batch)
        batch.commit.add_done_callback(lambda _: self._inbox.poke())

    def _wait_for_commit(self) -> None:
        committing = self._committing
        if committing is not None and committing.commit is not None:
            with contextlib.suppress(Exception):
                committing.commit.result()
            self._committed(committing)

    def _committed(self, batch: _Batch) -> None:
        """A commit ended. Its callers were answered if it succeeded; if it failed, serve
        them carefully, and apply the batch built on top of it again."""
        self._committing = None
        assert batch.commit is not None
        error = batch.commit.exception()
        if error is None:
            self._expected = len(batch.items)
            return
        built_on_it, self._building = self._building, None
        if isinstance(error, IntegrityError) and not isinstance(
            error, VersionConflict | DuplicateRequest
        ):
            # Not a conflict: the same batch would fail the same way. Nothing was written;
            # find the command that breaks the constraint by running each alone.
            for item in batch.items:
                self._execute([item])
        else:
            # An integrity error says nothing was written; after any other error the
            # commit may have happened, and the retry must look the batch up (and fence it
            # off if it is still on its way). After a version conflict, write-once
            # aggregates are looked up rather than assumed absent, or the same write would
            # be refused again.
            self._execute(
                batch.items,
                attempt=None if isinstance(error, IntegrityError) else batch.prepared,
                fresh=isinstance(error, VersionConflict),
            )
        if built_on_it is not None:
            self._apply(built_on_it.items)

    # -- the committing thread --------------------------------------------------------------

    def _commit(self, batch: _Batch) -> None:
        """Write the batch; answer its callers at once (the writer thread is busy), then
        cache its aggregates (the batch built on top of it reads them from it, not from
        the cache, and the writer only starts another after this returns)."""
        _settle(batch.items, self._ledger.commit(batch.prepared, remember=False))
        self._ledger.remember(batch.prepared)

    # -- the careful path ---------------------------------------------------------------------

    def _execute(
        self, items: list[_Item], *, attempt: PreparedBatch | None = None, fresh: bool = False
    ) -> None:
        """Commands whose batch failed: ``LedgerService.execute`` retries them on fresh state."""
        if not items:
            return
        commands = [command for command, _ in items]
        try:
            outcomes = self._ledger.execute(commands, attempt=attempt, fresh=fresh)
        except Exception as error:  # a bug in the ledger itself: nobody is left waiting
            _log.exception("daybook's careful path failed")
            _settle(items, [error] * len(items))
            return
        _settle(items, outcomes)


def _settle(items: list[_Item], outcomes: Sequence[Outcome | BaseException]) -> None:
    """Hand each caller its outcome: threads directly, each event loop once per batch
    (waking a loop costs a system call; one wake-up settles all its callers). Every answer
    passes here once, so this is where they are counted: first, so that a caller holding
    its answer finds it counted. Counting must not cost anyone an answer: should it fail,
    the callers are answered all the same (and the writer thread goes on)."""
    try:
        count_outcomes([command for command, _ in items], outcomes)
    except Exception:
        _log.exception("daybook could not count %d outcomes", len(items))
    by_loop: dict[asyncio.AbstractEventLoop, list[_LoopSettlement]] = defaultdict(list)
    for (_, reply), outcome in zip(items, outcomes, strict=True):
        if isinstance(reply, _Waiter):
            reply.settle(outcome)
        elif isinstance(reply, _AsyncReply):
            by_loop[reply.loop].append((reply, outcome))
        elif reply.submission.settle(reply.index, outcome):  # the submission's last outcome
            submission = reply.submission
            if submission.loop is None:
                submission.done.release()
            else:
                by_loop[submission.loop].append(submission)
    for loop, settlements in by_loop.items():
        # RuntimeError: the loop was closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_on_loop, settlements)


#: What an event loop is handed: one caller's outcome, or a whole submission's.
_LoopSettlement = tuple[_AsyncReply, Outcome | BaseException] | _Submission


def _settle_on_loop(settlements: list[_LoopSettlement]) -> None:
    for settlement in settlements:
        if isinstance(settlement, _Submission):
            future = settlement.future
            assert future is not None
            if not future.done():  # unless the caller was cancelled
                future.set_result(settlement.outcomes)  # type: ignore[arg-type]
            continue
        reply, outcome = settlement
        if reply.future.done():  # the caller was cancelled
            continue
        if isinstance(outcome, BaseException):
            reply.future.set_exception(outcome)
        else:
            reply.future.set_result(outcome)
