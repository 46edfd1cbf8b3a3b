"""The ledger service: the write path behind ``Ledger`` and ``AsyncLedger``.

A batch of commands is applied in memory (``LedgerService.prepare``, or ``new_batch`` then
``apply`` as commands arrive) and written by ``commit``: all its events, and the idempotency
records of its requests, in one transaction; ``execute`` prepares and commits, and retries on
conflicts. Committers decide how commands reach it: one at a time (``DirectCommitter``) or
batched with other callers' commands (``group_commit.GroupCommitter``).

The service is an eventsourcing ``Application`` configured by environment (``bootstrap``
builds it from a URL); its recorder also keeps idempotency records (``RequestLog``).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
)

from daybook.domain.commands import Command, Receipt
from daybook.domain.errors import ConcurrencyConflict, DomainError, IdempotencyConflict
from daybook.domain.events import LedgerAggregate, metadata_scope
from daybook.infrastructure.ledger.requests import PendingRequest, RequestLog, RequestRecord
from daybook.infrastructure.lifecycle import Health, ServiceState, Supervisor

A = TypeVar("A", bound=LedgerAggregate)

Outcome = Receipt | DomainError


class Committer(Protocol):
    """Gets commands executed: alone, or batched with other callers' commands. A service:
    ``start``, ``close`` (finishing what was submitted), ``health``."""

    def start(self) -> None: ...

    def submit(self, command: Command) -> Receipt: ...

    def close(self) -> None: ...

    def health(self) -> Health: ...


class DirectCommitter:
    """Executes each command in its own transaction, one at a time, in the caller's thread."""

    def __init__(self, service: LedgerService) -> None:
        self._service = service
        self._lock = threading.Lock()
        self._health = Supervisor("direct commit")

    def start(self) -> None:
        self._health.move(ServiceState.RUNNING)

    def submit(self, command: Command) -> Receipt:
        with self._lock:
            (outcome,) = self._service.execute([command])
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    def close(self) -> None:
        with self._lock:
            self._health.move(ServiceState.STOPPED)

    def health(self) -> Health:
        return self._health.health()


class StaleCache(Exception):
    """A cached aggregate was behind the store when a command was refused."""


class UnitOfWork:
    """The aggregates one batch works on (handlers see it as ``Aggregates``): copies, so a
    failed batch leaves the cache untouched."""

    def __init__(self, service: LedgerService, base: UnitOfWork | None = None) -> None:
        self._service = service
        #: The unit of work of a batch still committing, whose state this one builds on.
        #: Only needed while commands are applied: ``seal`` drops it, or every batch would
        #: keep the one before it alive, and a process under steady load all of them.
        self._base = base
        # Keyed by ``UUID.int``: a UUID's hash is computed by Python code on every lookup,
        # an int's is not, and a command makes a dozen lookups.
        self.aggregates: dict[int, LedgerAggregate] = {}
        #: Version of each aggregate taken from a place that may be behind the store (the
        #: cache, or a batch still committing), as it was when taken.
        self.read_versions: dict[int, int] = {}
        self.touched: list[int] = []

    def _get(self, aggregate_id: UUID) -> LedgerAggregate | None:
        key = aggregate_id.int
        self.touched.append(key)
        aggregate = self.aggregates.get(key)
        if aggregate is not None:
            return aggregate
        base = self._base.aggregates.get(key) if self._base is not None else None
        if base is not None:
            # The previous batch's state: a copy, since that batch is still committing.
            copied = base.clone()
            # Another writer may have changed it since that batch read it; if that batch
            # did not change it, its commit will not find out, so a refusal must check.
            self.read_versions[key] = copied.version
            self.aggregates[key] = copied
            return copied
        repository = self._service.repository
        try:
            if repository.cache is None:
                raise KeyError(aggregate_id)
            aggregate = cast(LedgerAggregate, repository.cache.get(aggregate_id)).clone()
            self.read_versions[key] = aggregate.version
        except KeyError:
            try:
                aggregate = repository.get(aggregate_id)
            except AggregateNotFoundError:
                return None
        self.aggregates[key] = aggregate
        return aggregate

    def add(self, aggregate: A) -> A:
        key = aggregate.id.int
        self.aggregates[key] = aggregate
        self.touched.append(key)
        return aggregate

    def find(self, kind: type[A], key: Any) -> A | None:
        aggregate = self._get(kind.id_for(key))
        return aggregate if isinstance(aggregate, kind) else None

    def get(self, kind: type[A], key: Any) -> A:
        aggregate = self._get(kind.id_for(key))
        if not isinstance(aggregate, kind):
            raise kind.not_found(key)
        return aggregate

    def collect(self) -> list[LedgerAggregate.Event]:
        events: list[LedgerAggregate.Event] = []
        for key in dict.fromkeys(self.touched):
            events.extend(self.aggregates[key].collect_events())  # type: ignore[arg-type]
        self.touched.clear()
        return events

    def seal(self) -> None:
        """No more commands will be applied: let go of the batch this one built on."""
        self._base = None

    def check_refusal(self) -> None:
        """A refused command must have changed nothing, and must have been judged on the
        latest committed state: a cached aggregate may be behind another process's writes,
        and a refusal (unlike an acceptance) would never meet a version conflict to show it."""
        for key in dict.fromkeys(self.touched):
            aggregate = self.aggregates.get(key)
            if aggregate is None:
                continue
            if aggregate.pending_events:
                msg = f"a refused command changed aggregate {aggregate.id}"
                raise RuntimeError(msg)
            version = self.read_versions.get(key)
            if version is not None:
                newer = self._service.events.get(aggregate.id, gt=version, limit=1)
                if next(iter(newer), None) is not None:
                    raise StaleCache
        self.touched.clear()


@dataclass(eq=False)
class PreparedBatch:
    """Commands applied in memory by ``LedgerService.apply``, ready for ``commit``."""

    uow: UnitOfWork
    #: The batch this one builds on (its state is this one's starting point).
    after: PreparedBatch | None = None
    commands: list[Command] = field(default_factory=list)
    outcomes: list[Outcome | None] = field(default_factory=list)
    events: list[LedgerAggregate.Event] = field(default_factory=list)
    #: ``events`` mapped for the recorder (as they are applied, so ``commit`` only does I/O)
    stored: list[StoredEvent] = field(default_factory=list)
    pending: list[PendingRequest] = field(default_factory=list)
    #: index -> (receipt fields, index in ``events`` of the command's last event)
    receipts: dict[int, tuple[dict[str, Any], int]] = field(default_factory=dict)
    #: request id -> index of the command that used it first in this batch
    first_use: dict[str, int] = field(default_factory=dict)
    #: index of a repeated request -> (batch, index) of its first use
    repeats: dict[int, tuple[PreparedBatch, int]] = field(default_factory=dict)
    committed: bool = False


class LedgerService(Application[UUID]):
    """Aggregates on an append-only event store, with idempotent commands applied in batches."""

    name = "daybook"
    env: ClassVar[dict[str, str]] = {
        "AGGREGATE_CACHE_MAXSIZE": "100000",
        # Commands rely on optimistic concurrency to catch a stale cache (see UnitOfWork),
        # so the write path needs no fast-forward query; reads fast-forward explicitly.
        "AGGREGATE_CACHE_FASTFORWARD": "n",
    }
    #: How often a batch is re-run after a version conflict or a lost connection.
    max_attempts: ClassVar[int] = 40

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env)
        if not isinstance(self.recorder, RequestLog):
            msg = (
                f"{type(self.recorder).__name__} keeps no idempotency records; "
                "open the ledger with daybook.open_ledger(url)"
            )
            raise TypeError(msg)
        self._requests: RequestLog = self.recorder
        self.committer: Committer = DirectCommitter(self)
        self.committer.start()

    # -- reads (strongly consistent, straight from the log) ---------------------------------

    def read(self, kind: type[A], key: Any) -> A:
        """The current state of the ``kind`` aggregate with ``key``, fast-forwarded from the
        store (the cache may be behind other processes' writes)."""
        aggregate = self._read(kind.id_for(key))
        if not isinstance(aggregate, kind):
            raise kind.not_found(key)
        return aggregate

    def head(self) -> int:
        """The log position of the newest event (0 for an empty log)."""
        return self.recorder.max_notification_id() or 0

    def _read(self, aggregate_id: UUID) -> LedgerAggregate | None:
        try:
            aggregate: LedgerAggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        # The cache may be behind other processes' writes: fast-forward from the store.
        for event in self.events.get(aggregate_id, gt=aggregate.version):
            cast(LedgerAggregate.Event, event).mutate(aggregate)
        return aggregate

    # -- the command path -------------------------------------------------------------------

    def execute(self, batch: Sequence[Command], *, recheck_all: bool = False) -> list[Outcome]:
        """Apply ``batch`` in order and commit all its events in one transaction.

        Returns one outcome per command: its receipt, or the refusal it met. Nothing is
        reported before the transaction has committed. If the commit fails (another writer
        changed an aggregate first, or the connection was lost), the whole batch is applied
        again on fresh state; every command carries a request id whose record commits with
        its events, so a batch whose commit did happen is recognised and replayed, never
        applied twice. ``recheck_all`` looks every request id up from the first attempt
        (for a batch that already failed once elsewhere).
        """
        for attempt in range(self.max_attempts):
            try:
                return self.commit(self.prepare(batch, recheck_all=recheck_all or attempt > 0))
            except (IntegrityError, StaleCache, OperationalError, InterfaceError) as error:
                if isinstance(error, (OperationalError, InterfaceError)) and (
                    attempt >= self.max_attempts // 4
                ):
                    raise
                # Jittered backoff so that competing writers stop colliding.
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
        message = (
            f"gave up after {self.max_attempts} attempts: other writers kept changing the "
            "same accounts or SKUs; retry the request"
        )
        return [ConcurrencyConflict(message) for _ in batch]

    def prepare(
        self,
        batch: Sequence[Command],
        *,
        after: PreparedBatch | None = None,
        recheck_all: bool = False,
    ) -> PreparedBatch:
        """Apply ``batch`` in memory, on copies of the aggregates; nothing is written.

        Commands whose caller chose the request id (or, with ``recheck_all``, every command)
        are first looked up in the store, so that a request already recorded is replayed.
        With ``after``, see ``new_batch``.

        Raises ``StaleCache`` if a refusal was judged on a cached aggregate that another
        writer has since changed.
        """
        prepared = self.new_batch(after=after)
        # On a first attempt only caller-chosen ids can have been seen before; on a retry,
        # any id may belong to a batch whose commit succeeded although we saw an error.
        known = self._requests.select_requests(
            [c.request_id for c in batch if recheck_all or c.caller_request_id]
        )
        self.apply(prepared, batch, known=known)
        return prepared

    def new_batch(self, *, after: PreparedBatch | None = None) -> PreparedBatch:
        """An empty batch to ``apply`` commands to.

        With ``after``, the batch builds on the state ``after`` leaves behind, before
        ``after`` has committed (so a group committer can prepare one batch while the
        previous one commits). Such a batch may only be committed once ``after`` committed;
        if ``after`` fails, it must be discarded and its commands applied again.
        """
        return PreparedBatch(UnitOfWork(self, base=after.uow if after else None), after=after)

    def apply(
        self,
        prepared: PreparedBatch,
        batch: Sequence[Command],
        *,
        known: dict[str, RequestRecord] | None = None,
    ) -> None:
        """Run ``batch`` in memory after the commands already in ``prepared``.

        ``known`` holds the request records found in the store for some of these commands:
        those are replayed, not run. A command whose id is recorded but not in ``known``
        runs, and its batch then fails to commit on the duplicate request id (the careful
        path, ``execute``, looks every id up). On an exception other than a refusal the
        batch is unusable: discard it.
        """
        known = known or {}
        after = prepared.after
        uow = prepared.uow
        mapped = len(prepared.events)
        for command in batch:
            index = len(prepared.commands)
            prepared.commands.append(command)
            prepared.outcomes.append(None)
            request_id = command.request_id
            if request_id in known:
                prepared.outcomes[index] = _replay(known[request_id], command)
                continue
            if after is not None and request_id in after.first_use:
                prepared.repeats[index] = (after, after.first_use[request_id])
                continue
            if request_id in prepared.first_use:
                prepared.repeats[index] = (prepared, prepared.first_use[request_id])
                continue
            prepared.first_use[request_id] = index
            with metadata_scope(command.metadata):
                try:
                    fields = command.handle(uow)
                except DomainError as refusal:
                    try:
                        uow.check_refusal()
                    except StaleCache:
                        self._evict(uow)
                        raise
                    prepared.outcomes[index] = refusal
                    if command.caller_request_id:
                        prepared.pending.append(
                            PendingRequest(_record(command, {"error": refusal.to_record()}), None)
                        )
                    continue
            prepared.events.extend(uow.collect())
            last = len(prepared.events) - 1
            receipt = {"command": command.name, "request_id": request_id, **fields}
            prepared.receipts[index] = (receipt, last)
            prepared.pending.append(PendingRequest(_record(command, {"receipt": receipt}), last))
        to_stored_event = self.mapper.to_stored_event
        prepared.stored.extend(to_stored_event(event) for event in prepared.events[mapped:])

    def commit(self, prepared: PreparedBatch, *, remember: bool = True) -> list[Outcome]:
        """Write a prepared batch's events and request records in one transaction and
        return its outcomes. On failure the batch's aggregates are evicted from the cache
        and the error is raised: nobody has been told anything, and ``execute`` can retry.

        With ``remember=False`` the cache is not updated: call ``remember`` afterwards (a
        group committer answers its callers first; the next batch builds on this one's
        state directly, not on the cache)."""
        assert prepared.after is None or prepared.after.committed, "commit batches in order"
        prepared.uow.seal()
        prepared.after = None
        if prepared.pending:
            try:
                positions = self.recorder.insert_events(prepared.stored, requests=prepared.pending)
            except BaseException:
                self._evict(prepared.uow)
                raise
            assert positions is not None
            for index, (receipt, last) in prepared.receipts.items():
                # The fields are this process's own values (UUIDs, not their JSON strings).
                prepared.outcomes[index] = Receipt(position=positions[last], **receipt)
            if remember:
                self.remember(prepared)
        for index, (source, first) in prepared.repeats.items():
            prepared.outcomes[index] = _repeat(
                source.commands[first], source.outcomes[first], prepared.commands[index]
            )
        prepared.repeats.clear()  # they name earlier batches: keep none of them alive
        prepared.committed = True
        assert all(outcome is not None for outcome in prepared.outcomes)
        return prepared.outcomes  # type: ignore[return-value]

    def remember(self, prepared: PreparedBatch) -> None:
        """Put a committed batch's aggregates in the cache."""
        cache = self.repository.cache
        if cache is not None and prepared.pending:
            for aggregate in prepared.uow.aggregates.values():
                cache.put(aggregate.id, aggregate)

    def _evict(self, uow: UnitOfWork) -> None:
        if self.repository.cache is None:
            return
        for aggregate in uow.aggregates.values():
            with contextlib.suppress(KeyError):
                self.repository.cache.get(aggregate.id, evict=True)

    def install_committer(self, factory: Callable[[LedgerService], Committer]) -> None:
        """Replace how commands reach ``execute`` (see ``group_commit``)."""
        old, self.committer = self.committer, factory(self)
        old.close()
        self.committer.start()

    def close(self) -> None:
        self.committer.close()
        super().close()


def _record(command: Command, outcome: dict[str, Any]) -> RequestRecord:
    return RequestRecord(command.request_id, command.name, command.fingerprint, outcome)


def _conflict(request_id: str, first_command: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"request id {request_id!r} was already used for a {first_command} with a different "
        "payload; use a new request id for a new request",
        request_id=request_id,
        original_command=first_command,
    )


def _replay(record: RequestRecord, command: Command) -> Outcome:
    """The original outcome of a repeated request (or a conflict if it asks for more)."""
    if record.fingerprint != command.fingerprint:
        return _conflict(command.request_id, record.command)
    if "error" in record.outcome:
        return DomainError.from_record(record.outcome["error"])
    return Receipt.from_record(record.outcome["receipt"], replayed=True)


def _repeat(first: Command, outcome: Outcome | None, command: Command) -> Outcome:
    """A request repeated inside one batch gets its first use's outcome, replayed."""
    if first.fingerprint != command.fingerprint:
        return _conflict(command.request_id, first.name)
    if isinstance(outcome, Receipt):
        return replace(outcome, replayed=True)
    assert outcome is not None
    return DomainError.from_record(outcome.to_record())
