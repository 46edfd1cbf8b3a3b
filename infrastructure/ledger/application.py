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
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import (
    EventStore,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
)

from daybook.domain.commands import Command, Receipt
from daybook.domain.errors import (
    ConcurrencyConflict,
    DomainError,
    IdempotencyConflict,
    UnknownOutcome,
    reserve_codes,
)
from daybook.domain.events import LedgerAggregate, id_held_by_another_kind, metadata_scope
from daybook.domain.ids import is_generated_request_id, new_request_id
from daybook.domain.linked import Atomic
from daybook.domain.snapshots import snapshot_class
from daybook.infrastructure.eventstore.snapshots import Snapshots
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, Read, VersionConflict
from daybook.infrastructure.ledger.requests import (
    BATCH_TOKEN,
    DEFAULT_RETENTION,
    FENCED_TOKEN,
    PendingRequest,
    RequestLog,
    RequestRecord,
    token_record,
)
from daybook.infrastructure.ledger.retention import RequestPurge, Retention
from daybook.infrastructure.lifecycle import Health, ServiceState, Supervisor
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.topics import reader_topics
from daybook.infrastructure.transient import (
    AT_ONCE,
    discard_ended_connections,
    first_line,
    is_transient,
    rolled_back,
    storage_full,
)

A = TypeVar("A", bound=LedgerAggregate)

Outcome = Receipt | DomainError
#: What ``execute`` answers for one command: its outcome, or the error that stopped it (the
#: store unreachable through several attempts, a constraint the ledger does not know, a bug).
Result = Outcome | Exception

_log = logging.getLogger("daybook.ledger")


class Committer(Protocol):
    """Gets commands executed: alone, or batched with other callers' commands. A service:
    ``start``, ``close`` (finishing what was submitted), ``health``."""

    def start(self) -> None: ...

    def submit(self, command: Command) -> Receipt: ...

    def submit_many(self, commands: Sequence[Command]) -> list[Outcome | BaseException]:
        """Each command's outcome, in order: its receipt, its refusal, or the error that
        stopped it (the commands are not applied all-or-nothing)."""
        ...

    def close(self) -> None: ...

    def health(self) -> Health: ...


class LedgerClosed(RuntimeError):
    """A command was submitted, or a read asked, after the ledger was closed."""

    code: ClassVar[str] = "ledger_closed"


# Not a refusal: no refusal class may take its code (see ``reserve_codes``).
reserve_codes((LedgerClosed.code,), "the ledger's own")


class Unavailable(OperationalError):
    """A database the ledger needs did not answer through the ledger's retries (an outage;
    eventsourcing's error is its ``__cause__``, and the driver's that one's): the command may
    or may not have committed. Send it again with the same request id: it is applied once
    either way. A read the store did not answer raises it too."""

    code: ClassVar[str] = "unavailable"


class StorageFull(Unavailable):
    """The database the ledger writes to is out of disk space: nothing was applied. Send
    the command again with the same request id once its operator has freed space."""

    code: ClassVar[str] = "storage_full"


reserve_codes((Unavailable.code, StorageFull.code), "the ledger's own")


def unavailable(error: BaseException, *, reading: bool = False) -> Unavailable:
    """The coded answer to a command whose outage outlasted the ledger's retries, or
    (``reading``) to a read the store did not answer."""
    full = storage_full(error)
    if full and reading:
        answer: Unavailable = StorageFull(
            f"the database is out of disk space ({first_line(error)}); nothing changed: read "
            "again once space is freed"
        )
    elif full:
        answer = StorageFull(
            f"the database is out of disk space ({first_line(error)}): nothing was applied; "
            "send the command again with the same request id once space is freed"
        )
    elif reading:
        answer = Unavailable(
            f"the database did not answer the read ({first_line(error)}); nothing changed: "
            "read again once it answers"
        )
    else:
        answer = Unavailable(
            f"the database did not answer through the ledger's retries ({first_line(error)});"
            " the command may have committed: send it again with the same request id, "
            "which applies it once"
        )
    answer.__cause__ = error
    return answer


class LedgerForked(LedgerClosed):
    """The ledger was opened in a parent process before it forked this one: its writer
    threads do not exist here, and its connections are the parent's (using them would
    corrupt the parent's sessions). Open a ledger in this process instead."""


#: The ledgers open in this process: a forked child marks them (``_after_fork``).
_open_services: weakref.WeakSet[LedgerService] = weakref.WeakSet()


def _after_fork() -> None:
    for service in list(_open_services):
        service.forked = True


os.register_at_fork(after_in_child=_after_fork)


class DirectCommitter:
    """Executes each command in its own transaction, one at a time, in the caller's thread
    (a submission of many too: ``group_commit=False`` promises each command commits alone;
    sharing transactions is the group committer's job)."""

    def __init__(self, service: LedgerService) -> None:
        self._service = service
        self._lock = threading.Lock()
        self._closed = False
        #: Its health; the ledger says when it retries an outage (``_committer_moves``).
        self.supervisor = Supervisor("direct commit")

    def _refuse_if_closed(self) -> None:
        """Under ``_lock``: a closed ledger writes nothing more (its store is released)."""
        if self._closed:
            raise LedgerClosed("the ledger is closed; open a new one to submit commands")

    def start(self) -> None:
        self.supervisor.move(ServiceState.RUNNING)

    def submit(self, command: Command) -> Receipt:
        with self._lock:
            self._refuse_if_closed()
            (outcome,) = self._service.execute([command])
        count_outcomes([command], [outcome])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_many(self, commands: Sequence[Command]) -> list[Outcome | BaseException]:
        outcomes: list[Outcome | BaseException] = []
        with self._lock:
            self._refuse_if_closed()  # refused whole, as the group committer does
        for command in commands:
            # The lock per command, not for the whole submission: another thread's command
            # waits for one commit, not for thousands (one thread keeps this one's order).
            with self._lock:
                if self._closed:  # closed meanwhile: the rest is not run
                    outcomes.append(LedgerClosed("the ledger was closed before this command"))
                    continue
                outcomes.extend(self._service.execute([command]))
        count_outcomes(commands, outcomes)
        return outcomes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.supervisor.move(ServiceState.STOPPED)

    def health(self) -> Health:
        return self.supervisor.health()


class StaleCache(Exception):
    """A cached aggregate was behind the store when a command was refused."""


class Rejudge(Exception):
    """Raised by ``confirm_refusal`` in a command that caught a refusal: a copy the refusal
    was judged on was brought up to date from the store, so the command is judged again
    (``_judge``). Not a ``DomainError``: no command catches it."""


def _matter_to_readers(aggregate: LedgerAggregate, events: Iterable[object]) -> bool:
    """Whether one of ``events`` is of a kind that changes what a command that only read
    ``aggregate`` judged of it (``LedgerAggregate.changes_for_readers``)."""
    names = type(aggregate).changes_for_readers
    if names is None:
        return True
    kinds = tuple(getattr(type(aggregate), name) for name in names)
    return any(isinstance(event, kinds) for event in events)


class UnitOfWork:
    """The aggregates one batch works on (handlers see it as ``Aggregates``): copies, so a
    failed batch leaves the cache untouched."""

    def __init__(
        self, service: LedgerService, base: UnitOfWork | None = None, *, fresh: bool = False
    ) -> None:
        self._service = service
        #: Look write-once aggregates up in the store instead of assuming they do not exist
        #: (a previous attempt met another writer's changes).
        self._fresh = fresh
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
        #: Version of every aggregate when this batch took it (0: created here). After a
        #: version conflict, comparing them with the store names the aggregates that moved.
        self.taken_versions: dict[int, int] = {}
        self.touched: list[int] = []
        #: The instant the command being applied is judged at (``LedgerAggregate.as_of``).
        self.now: datetime | None = None
        #: Write-once aggregates taken to be absent without asking the store (see
        #: ``LedgerAggregate.write_once``): a refusal, or an acceptance that does not
        #: create one, must check.
        self.assumed_absent: dict[int, UUID] = {}
        #: Aggregates the store was asked for and does not hold: asked again (a command
        #: that creates one asks whether its id is taken by another kind after finding
        #: none), they are not looked up again.
        self._absent: set[int] = set()
        #: Aggregates read from the store itself (or found absent there) by this batch, and
        #: those of them the command being applied read: a refusal judged on one that an
        #: earlier command read is brought up to date first (``catch_up_for_refusal``).
        self._from_store: set[int] = set()
        self._loaded_now: set[int] = set()
        #: Aggregates an accepted command read without changing them (``collect``): unlike
        #: those it changes, nothing it writes would meet another writer's change to them,
        #: so the commit checks them (``reads``).
        self.read_only: list[int] = []
        #: How many of ``touched`` a refusal the command caught had confirmed on the latest
        #: state (``confirm_refusal``): what only that refusal read is not checked again at
        #: the commit (a refused command's reads are not either).
        self._confirmed = 0

    def _get(self, aggregate_id: UUID, kind: type[LedgerAggregate]) -> LedgerAggregate | None:
        key = aggregate_id.int
        self.touched.append(key)
        aggregate = self.aggregates.get(key)
        if aggregate is not None:
            aggregate.as_of = self.now
            return aggregate
        if key in self._absent:
            return None
        base = self._base.aggregates.get(key) if self._base is not None else None
        if base is not None:
            # The previous batch's state: a copy, since that batch is still committing.
            copied = self._newer_cached(key, base).clone()
            # Another writer may have changed it since that batch read it; if that batch
            # did not change it, its commit will not find out, so a refusal must check.
            self.read_versions[key] = self.taken_versions[key] = copied.version
            self.aggregates[key] = copied
            copied.as_of = self.now
            return copied
        repository = self._service.repository
        try:
            if repository.cache is None:
                raise KeyError(aggregate_id)
            aggregate = cast(LedgerAggregate, repository.cache.get(aggregate_id)).clone()
            self.read_versions[key] = aggregate.version
        except KeyError:
            if kind.write_once and not self._fresh:
                # Not in this batch, the one before or the cache: most likely it does not
                # exist. Creating it lets the store check; anything else checks below.
                self.assumed_absent[key] = aggregate_id
                return None
            self._from_store.add(key)
            self._loaded_now.add(key)
            try:
                aggregate = repository.get(aggregate_id)
            except AggregateNotFoundError:
                self._absent.add(key)
                return None
        self.taken_versions[key] = aggregate.version
        self.aggregates[key] = aggregate
        aggregate.as_of = self.now
        return aggregate

    def _newer_cached(self, key: int, base: LedgerAggregate) -> LedgerAggregate:
        """``base`` (the previous batch's copy), or the cache's if the previous batch only
        read it and the cache has a newer one (brought up to date when an earlier batch that
        read it was cached: ``LedgerService.remember``). Taken from batch to batch under
        steady load, a copy only read would otherwise stay at the version first cached while
        other processes move it on."""
        previous = self._base
        cache = self._service.repository.cache
        if cache is None or previous is None or previous.taken_versions.get(key) != base.version:
            return base  # changed by the previous batch: its copy is the latest
        try:
            cached = cast(LedgerAggregate, cache.get(base.id))
        except KeyError:
            return base
        return cached if cached.version > base.version else base

    def taken(self, kind: type[A], key: Any) -> bool:
        return self._get(kind.id_for(key), kind) is not None

    def add(self, aggregate: A) -> A:
        key = aggregate.id.int
        holder = self.aggregates.get(key)
        if holder is not None and not isinstance(holder, type(aggregate)):
            # Found under another kind: the store would refuse the creation on every attempt.
            raise id_held_by_another_kind(aggregate, holder)
        aggregate.as_of = self.now
        self.aggregates[key] = aggregate
        self.taken_versions.setdefault(key, 0)
        self.touched.append(key)
        return aggregate

    def find(self, kind: type[A], key: Any) -> A | None:
        aggregate = self._get(kind.id_for(key), kind)
        return aggregate if isinstance(aggregate, kind) else None

    def get(self, kind: type[A], key: Any) -> A:
        aggregate = self._get(kind.id_for(key), kind)
        if not isinstance(aggregate, kind):
            raise kind.not_found(key)
        return aggregate

    def written(self) -> list[LedgerAggregate]:
        """The aggregates this batch changes or creates."""
        taken = self.taken_versions
        return [a for key, a in self.aggregates.items() if a.version != taken.get(key, -1)]

    def collect(self) -> list[LedgerAggregate.Event]:
        events: list[LedgerAggregate.Event] = []
        confirmed: Collection[int] = ()
        if self._confirmed:
            # Read by a refusal the command caught (a saga step that failed out of stock),
            # judged on the latest state then, and not read again after it.
            confirmed = set(self.touched[: self._confirmed]).difference(
                self.touched[self._confirmed :]
            )
            self._confirmed = 0
        for key in dict.fromkeys(self.touched):
            aggregate = self.aggregates.get(key)
            if aggregate is not None:  # None: looked for and not found (nothing to collect)
                new = aggregate.collect_events()
                if new:
                    events.extend(new)  # type: ignore[arg-type]
                elif not aggregate.write_once and key not in confirmed:
                    self.read_only.append(key)  # (a write-once aggregate never changes)
        self.touched.clear()
        self._loaded_now.clear()
        return events

    def reads(self) -> list[Read]:
        """The aggregates accepted commands judged without changing them, which the batch
        does not change either, each with the version they were judged at and the topics
        of the events that would make that judgement stale (``changes_for_readers``): the
        commit refuses the batch (``VersionConflict``) if one of those was recorded since.
        Any other change (a merchant credited by another writer meanwhile) refuses nothing:
        a busy account read by many commands is no contention."""
        if not self.read_only:
            return []
        taken = self.taken_versions
        found: dict[int, Read] = {}
        for key in self.read_only:
            aggregate = self.aggregates[key]
            if aggregate.version == taken[key]:  # else the batch changes it: checked anyway
                found[key] = (aggregate.id, aggregate.version, reader_topics(type(aggregate)))
        return list(found.values())

    def seal(self) -> None:
        """No more commands will be applied: let go of the batch this one built on."""
        self._base = None

    def check_refusal(self) -> None:
        """A refused command must have changed nothing, and must have been judged on the
        latest committed state: a cached aggregate may be behind another process's writes,
        and a refusal (unlike an acceptance) would never meet a version conflict to show it."""
        for key in dict.fromkeys(self.touched):
            aggregate = self.aggregates.get(key)
            if aggregate is not None and aggregate.pending_events:
                msg = f"a refused command changed aggregate {aggregate.id}"
                raise RuntimeError(msg)
        self.confirm_refusal()
        self.touched.clear()
        self._loaded_now.clear()
        self._confirmed = 0

    def catch_up_for_refusal(self) -> bool:
        """Before a refusal stands: bring up to date, from the store, what the refused
        command touched that an earlier command of the batch read there (or found absent)
        and that the batch has not changed. Such a copy is as old as that earlier command,
        and neither the commit nor the cache's check (``read_versions``) would see another
        writer's change to it since. True if one moved: the command is judged again.

        A copy an accepted command of the batch only read is brought up to date too, unless
        what changed it is what that command's judgement rests on: then the commit refuses
        the batch (``reads``), and this command is judged again with it on fresh state.

        Not for a command that changed something before it refused (``check_refusal``
        fails it): judged again, it would record its changes twice."""
        touched = dict.fromkeys(self.touched)
        earlier = [
            key for key in touched if key in self._from_store and key not in self._loaded_now
        ]
        if not earlier:
            return False
        aggregates = self.aggregates
        if any(key in aggregates and aggregates[key].pending_events for key in touched):
            return False
        read_by_accepted = set(self.read_only)
        moved = False
        absent = []
        copies: dict[UUID, LedgerAggregate] = {}
        for key in earlier:
            aggregate = aggregates.get(key)
            if aggregate is None:
                if key in self._absent:
                    absent.append(UUID(int=key))
            elif aggregate.write_once:
                continue  # never changes once written
            elif aggregate.version == self.taken_versions.get(key):
                copies[aggregate.id] = aggregate
            # (else changed by the batch: its commit meets any other writer's change)
        # One question to the store for all of them (and the absent ones): which moved.
        latest = self._service.latest_versions([*copies, *absent]) if copies or absent else {}
        for aggregate_id, aggregate in copies.items():
            if latest.get(aggregate_id, 0) <= aggregate.version:
                continue
            newer = list(self._service.events.get(aggregate_id, gt=aggregate.version))
            key = aggregate_id.int
            if key in read_by_accepted and _matter_to_readers(aggregate, newer):
                # What an accepted command judged of it changed: left as it is, the commit
                # refuses the batch (``reads``), and the commands connected to it, this one
                # among them, are judged again on fresh state.
                continue
            for event in newer:
                cast(LedgerAggregate.Event, event).mutate(aggregate)
            # What the commit checks an accepted reader against from now on: the changes
            # up to here did not matter to it (``reads``).
            self.taken_versions[key] = aggregate.version
            moved = True
        for found in absent:
            if found in latest:
                self._absent.discard(found.int)
                moved = True
        self._loaded_now.update(earlier)  # fresh now: not caught up again for this command
        return moved

    def confirm_refusal(self) -> None:
        """Raise ``StaleCache`` unless what the command touched so far was read at the
        latest committed state. For a refused command (``check_refusal``), and for a
        refusal a command caught and records as its outcome (a saga step that failed):
        judged again at once, rather than when its commit meets the aggregates it only
        read moved (``reads``). A copy an earlier command of the batch read from the store
        is brought up to date, and the command judged again (``Rejudge``)."""
        if self.catch_up_for_refusal():
            raise Rejudge
        for key in dict.fromkeys(self.touched):
            aggregate = self.aggregates.get(key)
            version = self.read_versions.get(key)
            if aggregate is not None and version is not None:
                newer = self._service.events.get(aggregate.id, gt=version, limit=1)
                if next(iter(newer), None) is not None:
                    raise StaleCache
        self._check_assumed_absent()
        self._confirmed = len(self.touched)

    def check_acceptance(self) -> None:
        """An accepted command that relied on a write-once aggregate being absent, without
        creating it (the store would have checked that), must have been right."""
        if self.assumed_absent:
            self._check_assumed_absent()

    def _check_assumed_absent(self) -> None:
        assumed = self.assumed_absent
        unchecked = [
            assumed[key]
            for key in dict.fromkeys(self.touched)
            if key in assumed and key not in self.aggregates
        ]
        if unchecked and self._service.latest_versions(unchecked):
            raise StaleCache


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
    #: Commands that carried an unknown outcome whose attempts this batch looked up: resolved
    #: once it commits (``_UNKNOWN``). Rare: the commit walks these only, not every command.
    resolving: list[Command] = field(default_factory=list)
    #: index -> the aggregates (``UUID.int``) the command read or changed
    touched: dict[int, frozenset[int]] = field(default_factory=dict)
    committed: bool = False
    #: When (the retention clock) its first command was applied.
    applied_at: float | None = None
    #: The batch token recorded for its accepted commands with generated request ids (see
    #: ``daybook.infrastructure.ledger.requests``); None while it has none.
    token: str | None = None


@dataclass(frozen=True)
class Attempt:
    """A batch whose commit failed in a way that leaves open whether it happened (a lost
    connection): its token, and for each generated request id it accepted, the receipt it
    would have given and the command's last event (aggregate id, version)."""

    token: str
    receipts: dict[str, tuple[dict[str, Any], UUID, int]]

    @classmethod
    def of(cls, prepared: PreparedBatch) -> Attempt | None:
        """None if the batch has no token: its commands all have records of their own."""
        if prepared.token is None:
            return None
        receipts: dict[str, tuple[dict[str, Any], UUID, int]] = {}
        for index, (receipt, last) in prepared.receipts.items():
            command = prepared.commands[index]
            if not command.caller_request_id:
                event = prepared.stored[last]
                # The mapper keeps the domain event's UUID (eventsourcing types it wider).
                originator_id = cast(UUID, event.originator_id)
                receipts[command.request_id] = (receipt, originator_id, event.originator_version)
        return cls(prepared.token, receipts)


class LedgerService(Application[UUID]):
    """Aggregates on an append-only event store, with idempotent commands applied in batches."""

    name = "daybook"
    env: ClassVar[dict[str, str]] = {
        "AGGREGATE_CACHE_MAXSIZE": "100000",
        # The repository loads the latest snapshot and the events after it; the ledger
        # writes snapshots itself, with the batch that reaches them (see ``commit``).
        "IS_SNAPSHOTTING_ENABLED": "y",
        # Commands rely on optimistic concurrency to catch a stale cache (see UnitOfWork),
        # so the write path needs no fast-forward query; reads fast-forward explicitly.
        "AGGREGATE_CACHE_FASTFORWARD": "n",
    }
    #: How often a batch is re-run after a version conflict (a quarter of it after a lost
    #: connection).
    max_attempts: ClassVar[int] = 40
    #: How long (seconds, from its first attempt) a batch is re-run after lost connections
    #: before its callers are answered ``unavailable``: a database restart of a few seconds
    #: is ridden through, and a longer outage is told within about this much plus one
    #: attempt's wait. An attempt may wait the pool's whole ``connect_timeout`` (10 s) for
    #: a server that refuses connections: counted in attempts alone, ten of them made a
    #: caller wait 100 s, longer than HTTP clients and proxies wait.
    outage_budget: ClassVar[float] = 15.0

    def construct_snapshot_store(self) -> EventStore[UUID]:
        """eventsourcing's store, skipping snapshots their contract no longer trusts."""
        store = super().construct_snapshot_store()
        return Snapshots(mapper=store.mapper, recorder=store.recorder, log=self.recorder)

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        retention: float = DEFAULT_RETENTION,
        committer: Callable[[LedgerService], Committer] | None = None,
    ) -> None:
        #: What time it is: commands and reads are judged at its reading (holds expire by
        #: it), and request records are kept by it. Injectable, so tests can move time.
        # A clock that gives naive readings is refused here, before the store is opened
        # (created, or migrated), not at a command.
        self.clock: Callable[[], datetime] = aware_clock(clock) if clock else _utc_now
        super().__init__(env)
        #: How long request records of caller-chosen ids are kept (seconds), on that clock.
        self.retention = Retention(
            retention, clock=lambda: self.clock().timestamp(), system_clock=clock is None
        )
        #: Snapshot an aggregate whenever its version passes a multiple of this (0: never).
        self.snapshot_interval = 100
        #: Measures ``outage_budget`` (injectable: tests count attempts, not seconds).
        self.monotonic: Callable[[], float] = time.monotonic
        #: The outage a batch is retrying now, if one is (the committer is RETRYING).
        self._outage_error: str | None = None
        #: When the outage under way began (``monotonic``; None: none known), and when it
        #: was last met: ``outage_budget`` counts from its beginning for every batch that
        #: meets it, so a batch queued behind one that retried does not start a budget of
        #: its own. A commit that goes through ends it; so does a pause of ``outage_budget``
        #: without a failure (the next failure is a new outage).
        self._outage_since: float | None = None
        self._outage_seen = 0.0
        self._snapshot_failures: set[type[LedgerAggregate]] = set()
        #: Tells this ledger's receipts on command objects from another's (see ``_DONE``).
        self._identity = object()
        #: Set by ``close``: a read that fails then says the ledger is closed.
        self._closed = False
        #: The process that opened it; ``forked``: this is a child forked after that.
        self.opened_in = os.getpid()
        self.forked = False
        _open_services.add(self)
        if not isinstance(self.recorder, RequestLog):
            msg = (
                f"{type(self.recorder).__name__} keeps no idempotency records; "
                "open the ledger with daybook.open_ledger(url)"
            )
            raise TypeError(msg)
        self._requests: RequestLog = self.recorder
        #: Deletes expired request records (started by ``bootstrap`` unless disabled).
        self.request_purge = RequestPurge(
            self._requests, self.retention, guard=self.refuse_if_forked
        )
        #: How commands reach ``execute``: one at a time (the default), or ``committer``
        #: (``GroupCommitter``), built here rather than installed over a started default,
        #: whose stopped service would stay in the metrics as a part that is down.
        self.committer: Committer = (committer or DirectCommitter)(self)
        self.committer.start()

    # -- reads (strongly consistent, straight from the log) ---------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A read through the ledger. Once it is closed its store is released (SQLite,
        PostgreSQL): the store's driver then fails without a message, which becomes
        ``LedgerClosed``, with its code. (In memory the log stays readable.) In a child
        forked after the ledger was opened, refused (``refuse_if_forked``)."""
        self.refuse_if_forked()
        try:
            yield
        except Exception as error:
            if self._closed and not isinstance(error, DomainError):
                msg = "the ledger is closed; open a new one to read from it"
                raise LedgerClosed(msg) from error
            if isinstance(error, OperationalError | InterfaceError) and (
                is_transient(error) or storage_full(error)
            ):
                # The store did not answer (its retries, the pool's wait, spent), or is out
                # of disk space: coded, as a command meeting the same is. Another error of
                # the store (a table missing, a closed pool) is no outage, and stays as is.
                raise unavailable(error, reading=True) from error
            raise

    def read(self, kind: type[A], key: Any) -> A:
        """The current state of the ``kind`` aggregate with ``key``, fast-forwarded from the
        store (the cache may be behind other processes' writes)."""
        with self._reading():
            aggregate = self._read(kind.id_for(key))
        if not isinstance(aggregate, kind):
            raise kind.not_found(key)
        return aggregate

    def view(self, kind: type[LedgerAggregate], key: Any) -> Any:
        """The current view of the ``kind`` aggregate with ``key`` (``view_given``: one
        whose state another aggregate can settle reads that one too)."""
        return self.read(kind, key).view_given(self.read)

    def head(self) -> int:
        """The log position of the newest event (0 for an empty log)."""
        with self._reading():
            return self.recorder.max_notification_id() or 0

    def latest_versions(self, aggregate_ids: Sequence[UUID]) -> dict[UUID, int]:
        """The newest stored version of each aggregate that exists."""
        return self._requests.latest_versions(aggregate_ids) if aggregate_ids else {}

    def _read(self, aggregate_id: UUID) -> LedgerAggregate | None:
        try:
            aggregate: LedgerAggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        # The cache may be behind other processes' writes: fast-forward from the store.
        self._fast_forward(aggregate)
        aggregate.as_of = self.clock()
        return aggregate

    def _fast_forward(self, aggregate: LedgerAggregate) -> None:
        """Apply to ``aggregate``, in place, the stored events newer than its version."""
        for event in self.events.get(aggregate.id, gt=aggregate.version):
            cast(LedgerAggregate.Event, event).mutate(aggregate)

    # -- the command path -------------------------------------------------------------------

    def execute(
        self,
        batch: Sequence[Command],
        *,
        attempt: PreparedBatch | None = None,
        fresh: bool = False,
    ) -> list[Result]:
        """Apply ``batch`` in order and commit its events, in as few transactions as the
        other writers allow.

        Returns one result per command: its receipt, the refusal it met, or the error that
        stopped it; it raises nothing for one command's trouble, so no caller has to guess
        which commands committed. Nothing is reported before its transaction has committed.
        When the store refuses the write:

        - another writer changed some of the batch's aggregates first (``VersionConflict``):
          the batch is split. The commands connected to those aggregates (directly, or
          through an aggregate they share with such a command, so their order holds) are
          applied again on fresh state, after a jittered backoff; the others are committed
          at once. Only a command still meeting changes after ``max_attempts`` tries gets
          ``concurrency_conflict``. If none moved, the batch conflicts with itself: each
          command is run alone, as for any other integrity error;
        - a request id or a batch token was recorded meanwhile (``DuplicateRequest``):
          applied again, now looking it up, which replays it;
        - the connection was lost (the commit may or may not have happened): applied again,
          looking up the request ids and the batch tokens of every attempt whose outcome is
          unknown, so whatever did commit is replayed, never applied twice (and an attempt
          still on its way is fenced off: see ``prepare``); after a few such failures, the
          error is the result of those commands;
        - any other integrity error: nothing was written; each command is run alone, and the
          error is the result of the one it belongs to;
        - any other exception (a bug in one command, or in the store after sending): as for
          a lost connection, then each command is run alone.

        ``attempt``: a batch of these commands whose commit already failed elsewhere, perhaps
        after it happened (looked up and fenced as above); ``fresh`` looks write-once
        aggregates up from the first attempt (for a batch that already met a version
        conflict elsewhere: assuming them absent again would meet it again).
        """
        outcomes: list[Result | None] = [None] * len(batch)
        attempts: list[Attempt] = []
        earlier = Attempt.of(attempt) if attempt is not None else None
        if earlier is not None:
            attempts.append(earlier)
        self._execute_part(batch, list(range(len(batch))), outcomes, attempts, fresh=fresh)
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    def _execute_part(
        self,
        batch: Sequence[Command],
        indices: list[int],
        outcomes: list[Result | None],
        attempts: list[Attempt],
        *,
        fresh: bool = False,
    ) -> None:
        """``execute`` for ``batch[i]`` for each ``i`` in ``indices``, into ``outcomes``.
        ``attempts``: the batches of these commands whose outcome is unknown, shared by
        every part (one part's lost commit is another's to look up)."""
        started = self.monotonic()
        try:
            self._execute_attempts(batch, indices, outcomes, attempts, fresh, started)
        finally:
            if self._outage_error is not None:
                # Retried an outage: through it now, or gave up on it (the callers were
                # told ``unavailable``, and the next batch meets the database afresh).
                self._outage_error = None
                through = all(
                    not isinstance(o, OperationalError | InterfaceError) for o in outcomes
                )
                self._committer_moves(ServiceState.RUNNING, None, recovery=through)

    def _execute_attempts(
        self,
        batch: Sequence[Command],
        indices: list[int],
        outcomes: list[Result | None],
        attempts: list[Attempt],
        fresh: bool,
        started: float,
    ) -> None:
        conflicts = outages = duplicates = 0

        def again_after_contention() -> bool:
            """Count a contention (a version conflict, a deadlock); False once the commands
            at ``indices`` were answered ``concurrency_conflict`` (``max_attempts`` spent)."""
            nonlocal conflicts, fresh
            conflicts += 1
            if conflicts >= self.max_attempts:
                self._give_up_contended(batch, indices, outcomes, attempts)
                return False
            fresh = True
            _backoff(conflicts)
            return True

        while indices:
            prepared: PreparedBatch | None = None
            attempt_started = self.monotonic()
            try:
                prepared = self.prepare([batch[i] for i in indices], fresh=fresh, attempts=attempts)
                try:
                    results = self.commit(prepared)
                except IntegrityError:
                    raise  # refused by the store: nothing was written
                except Exception:
                    # The commit may have happened: remember the batch, to look it up.
                    sent = Attempt.of(prepared)
                    if sent is not None:
                        attempts.append(sent)
                    raise
            except DuplicateRequest as error:
                # One of our ids was recorded after we looked: a caller's request retried
                # through another writer, or a batch token of ours (an earlier attempt that
                # committed after all, or a fence another part wrote). The next lookup finds
                # it. Not a contention: no backoff, no attempt spent.
                duplicates += 1
                if duplicates > len(indices) + len(attempts):
                    for index in indices:
                        outcomes[index] = error
                    self._keep_unknown([batch[i] for i in indices], attempts)
                    return
                continue
            except (VersionConflict, StaleCache) as error:
                if isinstance(error, VersionConflict) and not error.stale and len(indices) > 1:
                    # No other writer moved any of the batch's aggregates: the batch conflicts
                    # with itself (two commands creating one aggregate), and would again on
                    # every attempt. Find whose it is by running each alone, looking
                    # write-once aggregates up, as for a constraint the ledger does not know.
                    for index in indices:
                        self._execute_part(batch, [index], outcomes, attempts, fresh=True)
                    return
                contended = list(range(len(indices)))
                if isinstance(error, VersionConflict) and prepared is not None:
                    contended = _contended(prepared, {i.int for i in error.stale})
                    clean = set(range(len(indices))) - set(contended)
                    if clean:
                        # Untouched by the other writer: commit them now, on the state
                        # they were judged on (still the latest). Still looking every id up
                        # if an earlier attempt may have committed (a lost connection).
                        self._execute_part(
                            batch, [indices[k] for k in sorted(clean)], outcomes, attempts
                        )
                indices = [indices[k] for k in contended]
                if not again_after_contention():
                    return
                continue
            except (OperationalError, InterfaceError) as error:
                if rolled_back(error):
                    # A deadlock or a serialization failure: the server answered, and rolled
                    # the transaction back (nothing committed). Writers contending, not an
                    # outage: tried again as after a version conflict, without the committer
                    # saying it retries (/health 503) or spending the outage budget, and
                    # answered ``concurrency_conflict``, not ``unavailable``, if it lasts.
                    if not again_after_contention():
                        return
                    continue
                outages += 1
                if self._outage_error is None:
                    # /health and daybook_service_retrying say so while it lasts.
                    self._outage_error = first_line(error)
                    self._committer_moves(ServiceState.RETRYING, self._outage_error)
                spent = self._in_outage(started)
                # A batch's first attempt that failed at once is tried again, whatever the
                # outage before it lasted: a connection that died in a restart fails at once,
                # and a fresh one works. One that waited (for a pool that gets no
                # connection) is not: callers queued behind each other would each wait it
                # twice.
                at_once = self.monotonic() - attempt_started < AT_ONCE
                # The server ended the session (a restart, its idle_session_timeout): every
                # connection the pool kept idle is as dead, and each would cost an attempt.
                discard_ended_connections(self.recorder, error)
                over = spent >= self.outage_budget and not (outages == 1 and at_once)
                if outages > self.max_attempts // 4 or over:
                    for index in indices:
                        outcomes[index] = unavailable(error)
                    self._keep_unknown([batch[i] for i in indices], attempts)
                    return
                # The commit may have happened: the next attempt looks it up (``attempts``).
                fresh = True
                _backoff(outages)
                continue
            except Exception as error:
                # A constraint the ledger does not know, or a bug in a command: the same
                # batch would fail the same way. Find whose it is by running each alone
                # (looking up any attempt that may have been written after all).
                if len(indices) == 1:
                    outcomes[indices[0]] = error
                    # Sent perhaps (a failure after sending): as for an outage.
                    self._keep_unknown([batch[indices[0]]], attempts)
                    return
                for index in indices:
                    self._execute_part(batch, [index], outcomes, attempts)
                return
            for index, outcome in zip(indices, results, strict=True):
                outcomes[index] = outcome
            return

    def _give_up_contended(
        self,
        batch: Sequence[Command],
        indices: list[int],
        outcomes: list[Result | None],
        attempts: list[Attempt],
    ) -> None:
        """Answer the commands at ``indices`` ``concurrency_conflict`` (or the replay of an
        earlier attempt that committed after all), having tried ``max_attempts`` times."""
        message = (
            f"gave up after {self.max_attempts} attempts: other writers kept "
            "changing the same accounts or SKUs; retry the request"
        )
        answers = self._give_up([batch[i] for i in indices], attempts, ConcurrencyConflict(message))
        for index, answer in zip(indices, answers, strict=True):
            outcomes[index] = answer

    def outage_outlasted(self, started: float, error: BaseException) -> bool:
        """After a read that began at ``started`` (nothing sent) failed with ``error``:
        whether that is an outage that has lasted ``outage_budget`` already, and the read
        did not fail at once (a dead pooled connection, which a fresh one cures)."""
        if rolled_back(error):
            return False
        at_once = self.monotonic() - started < AT_ONCE
        return self._in_outage(started) >= self.outage_budget and not at_once

    def _in_outage(self, started: float) -> float:
        """Seconds the outage under way has lasted, counted from the start of the attempt
        that first met it (``started``, for a batch that is the first to)."""
        now = self.monotonic()
        since = self._outage_since
        if since is None or now - self._outage_seen > self.outage_budget:
            since = now
        since = self._outage_since = min(since, started)
        self._outage_seen = now
        return now - since

    def _committer_moves(
        self, state: ServiceState, error: str | None, *, recovery: bool = True
    ) -> None:
        supervisor: Supervisor | None = getattr(self.committer, "supervisor", None)
        if supervisor is not None:
            supervisor.move(state, error, recovery=recovery)

    def prepare(
        self,
        batch: Sequence[Command],
        *,
        after: PreparedBatch | None = None,
        fresh: bool = False,
        attempts: Sequence[Attempt] = (),
    ) -> PreparedBatch:
        """Apply ``batch`` in memory, on copies of the aggregates; nothing is written.

        Commands whose caller chose the request id are first looked up in the store, so
        that a request already recorded is replayed. With ``after``, see ``new_batch``.
        ``fresh``: a previous attempt met another writer's changes.

        ``attempts``: earlier batches of these commands whose commit may or may not have
        happened. Each one's token is looked up: recorded as a batch, it committed, and its
        commands with generated ids are replayed; recorded as fenced, it never will. Not
        recorded, it may still be on its way to the store (a statement whose connection
        broke can commit after the error): this batch then records it as fenced, in its own
        transaction, so that of the two exactly one commits, and a conflict on the token
        sends this one back to look again.

        Raises ``StaleCache`` if a refusal was judged on a cached aggregate that another
        writer has since changed.
        """
        prepared = self.new_batch(after=after, fresh=fresh)
        looked_up = self._with_kept(attempts, batch)
        known, fences = self._look_up(batch, looked_up)
        prepared.pending.extend(fences)
        self.apply(prepared, batch, known=known, looked_up={a.token for a in looked_up})
        return prepared

    def lookup(self, batch: Sequence[Command]) -> dict[str, RequestRecord]:
        """The recorded requests among ``batch``: those whose caller chose the id (only
        those are recorded one by one)."""
        wanted = [c.request_id for c in batch if c.caller_request_id]
        if not wanted:
            return {}
        return self._requests.select_requests(wanted, self.retention.clock())

    def _give_up(
        self, commands: Sequence[Command], attempts: Sequence[Attempt], answer: Result
    ) -> list[Result]:
        """The answers of commands that will not be tried again: ``answer`` ("not applied:
        retry"), unless an earlier attempt of theirs committed after all (then its replay:
        looked up by caller-chosen id, and by batch token). Attempts whose outcome is still
        unknown are fenced first, in a transaction of their own, so that none can commit
        after the answer and make it false; if that fails, the error is the answer for the
        commands not found (their outcome is unknown, and the answer says so). A caller-chosen
        id needs no fence: retried with the same id, the request replays whatever happened.
        """
        # Those kept from an earlier unknown outcome too: the answer must stay true of them.
        attempts = self._with_kept(attempts, commands)
        known: dict[str, RequestRecord] = {}
        outage: BaseException | None = None
        settled = False  # every attempt found or fenced: the answers are true
        for _ in range(len(attempts) + 1):
            try:
                known, fences = self._look_up(commands, attempts)
                if fences:
                    fence = self.new_batch()
                    fence.pending.extend(fences)
                    self.commit(fence)
                settled = True
            except DuplicateRequest:
                continue  # one of them committed meanwhile: look again
            except (OperationalError, InterfaceError) as error:
                outage = error  # coded, as any outage a command ends in: one each
            except Exception as error:
                answer = error
            break
        answers: list[Result] = []
        for command in commands:
            record = known.get(command.request_id)
            if record is None:
                answers.append(answer if outage is None else unavailable(outage))
                if not settled:  # its attempts may still be on their way
                    self._keep_unknown([command], attempts)
                continue
            outcome = _replay(record, command)
            self._keep_done(command, outcome)
            answers.append(outcome)
        return answers

    def _keep_unknown(self, commands: Sequence[Command], attempts: Sequence[Attempt]) -> None:
        """Keep, on each command with a generated id answered "outcome unknown", the attempts
        that accepted it and may have committed (see ``_UNKNOWN``), with those it kept from
        an earlier unknown outcome (still unresolved: this answer resolved nothing)."""
        for command in commands:
            if command.caller_request_id:
                continue  # its own record answers a retry
            kept = _kept(command)
            if kept is None:
                kept = _Unknown(self.retention.clock(), self.monotonic(), ())
            found = {a.token: a for a in kept.attempts}
            found.update((a.token, a) for a in attempts if command.request_id in a.receipts)
            if found:
                command.__dict__[_UNKNOWN] = kept._replace(attempts=tuple(found.values()))

    def _with_kept(self, attempts: Sequence[Attempt], batch: Sequence[Command]) -> list[Attempt]:
        """``attempts``, and those kept on ``batch``'s commands by ``_keep_unknown`` that can
        still be looked up (``_too_late``), each once (by token)."""
        found = {attempt.token: attempt for attempt in attempts}
        for command in batch:
            kept = _kept(command)
            if kept is not None and not self._too_late(kept):
                for attempt in kept.attempts:
                    found.setdefault(attempt.token, attempt)
        return list(found.values())

    def _too_late(self, kept: _Unknown) -> bool:
        """Whether the batch tokens a marker's attempts are looked up by may be gone: they
        are kept ``retention.generated`` seconds after their batch was sent, a little before
        the marker was first set; half of it leaves the retries that led to the answer more
        than enough. Past it the ledger cannot tell what happened, and says so for good.
        Measured on both clocks, the longer counting: the wall clock stepped back (NTP) after
        the answer would otherwise have the tokens, purged meanwhile, looked up as if they
        could still be there, and the lost commit taken for one that never landed."""
        waited = max(self.retention.clock() - kept.since, self.monotonic() - kept.since_monotonic)
        return waited > self.retention.generated / 2

    def _keep_done(self, command: Command, outcome: Outcome) -> None:
        """Keep the receipt of a command with a generated id on the command (see ``_DONE``)."""
        if isinstance(outcome, Receipt) and not command.caller_request_id:
            command.__dict__[_DONE] = (self._identity, outcome)
            command.__dict__.pop(_UNKNOWN, None)  # known now

    def _look_up(
        self, batch: Sequence[Command], attempts: Sequence[Attempt]
    ) -> tuple[dict[str, RequestRecord], list[PendingRequest]]:
        """What ``prepare`` and ``_give_up`` learn before they answer: the records of
        ``batch``'s caller-chosen ids (``lookup``) and of its generated ids that an earlier
        attempt committed (with their positions), and a fence for each attempt whose
        outcome is still unknown."""
        known = self.lookup(batch)
        if not attempts:
            return known, []
        tokens = self._requests.select_requests([a.token for a in attempts], self.retention.clock())
        generated = [c.request_id for c in batch if not c.caller_request_id]
        fences: list[PendingRequest] = []
        for attempt in attempts:
            token = tokens.get(attempt.token)
            if token is None:
                fences.append(PendingRequest(token_record(attempt.token, FENCED_TOKEN), None))
                continue
            if token.command != BATCH_TOKEN:
                continue  # fenced: it never committed
            ours = {i: attempt.receipts[i] for i in generated if i in attempt.receipts}
            positions = self._requests.positions([(oid, v) for _, oid, v in ours.values()])
            for request_id, (receipt, originator_id, version) in ours.items():
                outcome = {"receipt": dict(receipt, position=positions[originator_id, version])}
                known[request_id] = RequestRecord(
                    request_id, receipt["command"], "", outcome, caller=False
                )
        return known, fences

    def claim(self, record: RequestRecord) -> RequestRecord | None:
        """Write ``record`` alone, in a transaction of its own: a claim on its request id
        that no command of the ledger makes (an HTTP batch's key, which its items' ids are
        made from). None once written; the record that holds the id, if one does."""
        while True:
            claim = self.new_batch()
            claim.pending.append(PendingRequest(record, None))
            try:
                self.commit(claim)
                return None
            except DuplicateRequest:
                taken = self.recorded([record.request_id]).get(record.request_id)
                if taken is not None:
                    return taken
                # Expired meanwhile: the next commit deletes it before writing.

    def recorded(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        """The request records (not expired) of these ids, whether or not they are known."""
        self.refuse_if_forked()
        if not request_ids:
            return {}
        return self._requests.select_requests(list(request_ids), self.retention.clock())

    def new_batch(
        self, *, after: PreparedBatch | None = None, fresh: bool = False
    ) -> PreparedBatch:
        """An empty batch to ``apply`` commands to.

        With ``after``, the batch builds on the state ``after`` leaves behind, before
        ``after`` has committed (so a group committer can prepare one batch while the
        previous one commits). Such a batch may only be committed once ``after`` committed;
        if ``after`` fails, it must be discarded and its commands applied again.
        ``fresh``: see ``prepare``.
        """
        base = after.uow if after else None
        return PreparedBatch(UnitOfWork(self, base=base, fresh=fresh), after=after)

    def apply(
        self,
        prepared: PreparedBatch,
        batch: Sequence[Command],
        *,
        known: dict[str, RequestRecord] | None = None,
        looked_up: set[str] | None = None,
    ) -> None:
        """Run ``batch`` in memory after the commands already in ``prepared``.

        ``known`` holds the request records found in the store for these commands (see
        ``lookup``): those are replayed, not run. A command whose id was recorded by
        another writer after the lookup runs, and its batch then fails to commit with
        ``DuplicateRequest``. On an exception other than a refusal the batch is unusable:
        discard it. ``looked_up``: the tokens of the attempts looked up into ``known`` (and
        fenced) by ``prepare``, the attempts kept on commands whose outcome was unknown
        (``_keep_unknown``) among them; without it, such a command raises ``MustLookUp``,
        for the caller to ``prepare`` it. One whose kept attempts were not all looked up
        (too late to tell) is refused ``UnknownOutcome``.
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
                outcome = prepared.outcomes[index] = _replay(known[request_id], command)
                self._keep_done(command, outcome)
                continue
            done = command.__dict__.get(_DONE)
            if done is not None and done[0] is self._identity:
                # This very command, with its generated id, committed here already.
                prepared.outcomes[index] = replace(done[1], replayed=True)
                continue
            kept = _kept(command)
            if kept is not None:
                # Answered "outcome unknown" before: an attempt of it may have committed.
                if looked_up is None:
                    raise MustLookUp(request_id)
                if self._too_late(kept) or any(a.token not in looked_up for a in kept.attempts):
                    prepared.outcomes[index] = UnknownOutcome(
                        f"command {request_id} may have been applied (its answer was lost in "
                        "an outage, and its record has expired since): daybook cannot tell "
                        "any more; check the accounts it touches, and give the next attempt a "
                        "request id of your own to retry it safely"
                    )
                    continue
                prepared.resolving.append(command)
            if command.caller_request_id and is_generated_request_id(request_id):
                prepared.outcomes[index] = IdempotencyConflict(
                    f"request id {request_id!r} was generated by the ledger for another "
                    "request; choose request ids of your own",
                    request_id=request_id,
                )
                continue
            if (
                after is not None
                and request_id in after.first_use
                and not self._outlived(after, command)
            ):
                prepared.repeats[index] = (after, after.first_use[request_id])
                continue
            if request_id in prepared.first_use:
                prepared.repeats[index] = (prepared, prepared.first_use[request_id])
                continue
            prepared.first_use[request_id] = index
            uow.now = self.clock()
            if prepared.applied_at is None:
                prepared.applied_at = uow.now.timestamp()
            with metadata_scope(command.metadata):
                try:
                    fields = _judge(command, uow)
                except StaleCache:
                    # A refusal the command caught, to record it as its outcome, was judged
                    # on a stale cache (``UnitOfWork.confirm_refusal``): run it again fresh.
                    self._evict(uow)
                    raise
                except DomainError as refusal:
                    prepared.touched[index] = frozenset(uow.touched)
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
            prepared.touched[index] = frozenset(uow.touched)
            # Checked before anything is written: once committed, a receipt that cannot be
            # built would leave the caller answered with the error (or, looked up again,
            # told ``replayed``), for a command applied once.
            _check_receipt_fields(command, fields)
            uow.check_acceptance()
            collected = uow.collect()
            if not collected:
                # Its receipt would have no position and its request record no change of
                # its own (``last`` would name the event of the command before it).
                msg = (
                    f"command {command.name} was accepted but recorded no event: a command "
                    "records at least one event, or refuses"
                )
                raise TypeError(msg)
            prepared.events.extend(collected)
            last = len(prepared.events) - 1
            receipt = {"command": command.name, "request_id": request_id, **fields}
            prepared.receipts[index] = (receipt, last)
            if command.caller_request_id:
                prepared.pending.append(
                    PendingRequest(_record(command, {"receipt": receipt}), last)
                )
            elif prepared.token is None:
                # One record for all of the batch's generated ids (see ``prepare``).
                prepared.token = new_request_id()
                prepared.pending.append(
                    PendingRequest(token_record(prepared.token, BATCH_TOKEN), None)
                )
        to_stored_event = self.mapper.to_stored_event
        prepared.stored.extend(to_stored_event(event) for event in prepared.events[mapped:])

    def _outlived(self, earlier: PreparedBatch, command: Command) -> bool:
        """Whether the record ``earlier`` keeps of ``command``'s request id has expired by
        now: then the id is new, as the lookup of a committed record would say. (With a
        clock that moves only in tests, the batch built on may be days old on it.)"""
        if earlier.applied_at is None or not command.caller_request_id:
            return False
        return earlier.applied_at + self.retention.caller <= self.retention.clock()

    def commit(self, prepared: PreparedBatch, *, remember: bool = True) -> list[Outcome]:
        """Write a prepared batch's events and request records in one transaction and
        return its outcomes. On failure the batch's aggregates are evicted from the cache
        and the error is raised: nobody has been told anything, and ``execute`` can retry.

        With ``remember=False`` the cache is not updated: call ``remember`` afterwards (a
        group committer answers its callers first; the next batch builds on this one's
        state directly, not on the cache).

        Observed once per transaction that commits (``daybook_commit_duration_seconds``,
        ``daybook_commit_batch_size``, and a ``daybook.commit`` span): a batch with nothing
        to write (only replays) is not a commit, and an attempt that fails is not observed
        in the histograms (its span ends with the error); its retry, which ``execute`` may
        split, is observed as the batches that do commit."""
        if prepared.after is not None and not prepared.after.committed:
            # Not an ``assert`` (``python -O`` removes those): its events would follow
            # events the log does not hold.
            raise BatchOutOfOrder(
                "a batch built on one that has not committed cannot commit (commit batches "
                "in order)"
            )
        prepared.uow.seal()
        prepared.after = None
        if prepared.pending:
            try:
                with _commit_span(prepared):
                    started = time.perf_counter()
                    positions = self.recorder.insert_events(
                        prepared.stored,
                        requests=prepared.pending,
                        expiry=self.retention.expiry(),
                        snapshots=self._snapshots(prepared.uow),
                        reads=prepared.uow.reads(),
                    )
                    metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
                    metrics.COMMIT_BATCH.observe(len(prepared.commands))
            except VersionConflict as conflict:
                conflict.stale = self._moved(prepared.uow)
                raise
            except IntegrityError:
                raise  # nothing was written, and the cache is right: the batch was not
            except BaseException as error:
                self._evict(prepared.uow)  # it may have been written after all
                if isinstance(error, OperationalError | InterfaceError):
                    self._in_outage(self.monotonic())  # (a group commit's first attempt)
                raise
            self._outage_since = None  # through: an outage, if there was one, is over
            assert positions is not None
            commands = prepared.commands
            for index, (receipt, last) in prepared.receipts.items():
                # The fields are this process's own values (UUIDs, not their JSON strings).
                done = prepared.outcomes[index] = Receipt(position=positions[last], **receipt)
                self._keep_done(commands[index], done)
            if remember:
                self.remember(prepared)
        for index, (source, first) in prepared.repeats.items():
            prepared.outcomes[index] = _repeat(
                source.commands[first], source.outcomes[first], prepared.commands[index]
            )
        prepared.repeats.clear()  # they name earlier batches: keep none of them alive
        for command in prepared.resolving:
            # Its kept attempts were looked up for this batch (``prepare``), which fenced
            # those still unknown: resolved now, whichever way (see ``_keep_unknown``).
            command.__dict__.pop(_UNKNOWN, None)
        prepared.resolving.clear()
        prepared.committed = True
        assert all(outcome is not None for outcome in prepared.outcomes)
        return prepared.outcomes  # type: ignore[return-value]

    def _snapshots(self, uow: UnitOfWork) -> list[StoredEvent]:
        """Snapshots of the aggregates whose version this batch takes past a multiple of
        ``snapshot_interval``, as they will be once it commits (written with it, in the
        same transaction: a snapshot never gets ahead of the events)."""
        interval = self.snapshot_interval
        if not interval:
            return []
        taken = uow.taken_versions
        due = []
        for key, aggregate in uow.aggregates.items():
            if aggregate.version // interval > taken.get(key, 0) // interval:
                contract = snapshot_class(type(aggregate))
                if contract is None:
                    continue
                try:
                    due.append(self.mapper.to_stored_event(contract.take(aggregate)))
                except Exception:
                    # A snapshot only saves replaying: never fail a commit for one. Said
                    # once per kind: the same mismatch would repeat on every batch.
                    if type(aggregate) not in self._snapshot_failures:
                        self._snapshot_failures.add(type(aggregate))
                        _log.exception("no snapshot of %s: it could not be taken", aggregate.id)
        return due

    def remember(self, prepared: PreparedBatch) -> None:
        """Put a committed batch's aggregates in the cache. Not write-once ones: a marker
        like a reservation claim is read only when something is repeated or unknown, and
        its absence from the cache is already handled (``LedgerAggregate.write_once``);
        cached, every one would push a live aggregate out, and memory would follow their
        count until the cache is full."""
        cache = self.repository.cache
        if cache is not None and prepared.pending:
            moved = self._moved_on(prepared.uow.reads())
            for aggregate in prepared.uow.aggregates.values():
                if aggregate.write_once:
                    continue
                if aggregate.id in moved:
                    caught_up = self._caught_up(aggregate)
                    if caught_up is None:
                        with contextlib.suppress(KeyError):
                            cache.get(aggregate.id, evict=True)
                        continue
                    aggregate = caught_up
                cache.put(aggregate.id, aggregate)

    def _moved_on(self, reads: list[Read]) -> set[UUID]:
        """Of the aggregates a batch only read, those another writer has moved on since (one
        query for them all; all of them if the store cannot say)."""
        if not reads:
            return set()
        try:
            latest = self.latest_versions([read[0] for read in reads])
        except Exception:
            return {read[0] for read in reads}
        return {i for i, version, _ in reads if latest.get(i, version) != version}

    def _caught_up(self, aggregate: LedgerAggregate) -> LedgerAggregate | None:
        """A copy of an aggregate the batch only read, brought up to the store's latest
        version (None if the store could not say). Nothing this process writes moves it on,
        while others may (a merchant credited elsewhere): kept at the version first cached,
        each commit that reads it would check every event since then (``UnitOfWork.reads``),
        under the lock every writer takes, and more with every credit. A copy: the batch
        built on this one may be copying the original in another thread right now. (Only
        called for one another writer has moved on: there is always something to apply.)"""
        copy = aggregate.clone()
        try:
            self._fast_forward(copy)
        except Exception:  # the store went away after the commit: read it fresh next time
            return None
        return copy

    def _evict(self, uow: UnitOfWork, only: Collection[UUID] | None = None) -> None:
        if self.repository.cache is None:
            return
        for aggregate in uow.aggregates.values():
            if only is None or aggregate.id in only:
                with contextlib.suppress(KeyError):
                    self.repository.cache.get(aggregate.id, evict=True)

    def _moved(self, uow: UnitOfWork) -> frozenset[UUID]:
        """After a version conflict: the aggregates of ``uow`` it writes that another writer
        changed since it took them. Those, and the ones it only read that changed, are
        evicted from the cache, so the next attempt reads them fresh. (One only read is not
        named: most of its changes refuse nothing, and naming it would retry every command
        that read it. A conflict that came from one, an account closed, names none: every
        command of the batch is tried again, alone.)"""
        written = [a.id for a in uow.written()]
        checked = written + [read[0] for read in uow.reads()]
        try:
            latest = self.latest_versions(checked)
        except Exception:  # the store is unreachable: assume they all moved
            changed = set(checked)
        else:
            taken = uow.taken_versions
            changed = {i for i in checked if latest.get(i, 0) != taken.get(i.int, 0)}
        self._evict(uow, changed)
        return frozenset(i for i in written if i in changed)

    def install_committer(self, factory: Callable[[LedgerService], Committer]) -> None:
        """Replace how commands reach ``execute`` (see ``group_commit``)."""
        old, self.committer = self.committer, factory(self)
        old.close()
        metrics.forget_service(old.health().name)  # replaced, not down
        self.committer.start()

    def refuse_if_forked(self) -> None:
        """``LedgerForked`` in a child forked after this ledger was opened."""
        if self.forked:
            raise LedgerForked(self._forked())

    def _forked(self) -> str:
        return (
            f"this ledger was opened in process {self.opened_in}, which then forked "
            f"this one ({os.getpid()}): its threads and connections stay the parent's; "
            "open the ledger in each process after the fork (gunicorn without "
            "--preload, or in its post_fork hook; multiprocessing's spawn start method)"
        )

    def health(self) -> Health:
        """The committer's health; failed in a forked child, where the committer's thread
        does not exist (a copy of the parent's health would say it runs)."""
        health = self.committer.health()
        if self.forked:
            return replace(health, state=ServiceState.FAILED, error=self._forked())
        return health

    def close(self) -> None:
        if self.forked:
            # The connections are the parent's: closing them here would end its sessions.
            self._closed = True
            return
        self.request_purge.stop()
        self.committer.close()
        self._closed = True
        super().close()


def outcome_label(outcome: Outcome | BaseException) -> str:
    """What ``daybook_commands_total`` calls an outcome: ``ok``, ``replayed``, the refusal's
    code, or ``error`` (the error that stopped the command: the store unreachable, a bug)."""
    if isinstance(outcome, Receipt):
        return "replayed" if outcome.replayed else "ok"
    if isinstance(outcome, DomainError):
        return outcome.code
    return "error"


def count_outcomes(
    commands: Sequence[Command], outcomes: Sequence[Outcome | BaseException]
) -> None:
    """Count answered commands in ``daybook_commands_total``, once per (command, outcome)
    pair of the batch: the counter's lock is taken per pair, not per command."""
    counts: dict[tuple[str, str], int] = {}
    for command, outcome in zip(commands, outcomes, strict=True):
        key = (command.name, outcome_label(outcome))
        counts[key] = counts.get(key, 0) + 1
    for (name, label), count in counts.items():
        metrics.COMMANDS.labels(name, label).inc(count)


def count_refused(command: str, code: str) -> None:
    """Count in ``daybook_commands_total`` a ``command`` refused with ``code`` before a
    ledger saw it: a caller's input that could not be made into the command, or (over HTTP)
    a key the command cannot have."""
    metrics.COMMANDS.labels(command, code).inc()


@contextlib.contextmanager
def refusal_counted(command: str) -> Iterator[None]:
    """Count a refusal raised while the caller's values are made into ``command`` (its
    registered name), by command and code (``count_refused``). Wraps only the building: a
    ledger counts the refusals it answers itself, and counting those here too would count
    them twice."""
    try:
        yield
    except DomainError as refused:
        count_refused(command, refused.code)
        raise


@contextlib.contextmanager
def _commit_span(prepared: PreparedBatch) -> Iterator[None]:
    """The ``daybook.commit`` span of one batch's transaction: a child of its command's span
    when one traced command is in it, else linked to each traced command's span (from the
    ``traceparent`` of their envelopes). Nothing at all when no tracing SDK is installed."""
    if not tracing.enabled():
        yield
        return
    traced = list(dict.fromkeys(c.traceparent for c in prepared.commands if c.traceparent))
    attributes = {
        "daybook.batch_size": len(prepared.commands),
        "daybook.events": len(prepared.stored),
    }
    if len(traced) == 1:
        with tracing.span("daybook.commit", parent=traced[0], attributes=attributes):
            yield
    else:
        with tracing.span("daybook.commit", links=tracing.links_to(traced), attributes=attributes):
            yield


def _utc_now() -> datetime:
    return datetime.now(UTC)


def aware_clock(clock: Callable[[], datetime]) -> Callable[[], datetime]:
    """``clock``, refusing a reading without a time zone (``datetime.now``, say). Written
    into a hold's or a reservation's expiry, one made every process with a correct clock
    fail on that account or SKU (naive and aware times do not compare), for good. Every
    clock a caller gives daybook (the ledger's, a saga processor's, an expiry sweeper's)
    goes through it; read once here, so that one that gives naive readings is refused when
    it is given, not at a command."""

    def reading() -> datetime:
        now = clock()
        if now.utcoffset() is None:
            msg = (
                f"the ledger's clock gave {now!r}, a time without a time zone; give a clock "
                "that returns an aware datetime, such as lambda: datetime.now(UTC)"
            )
            raise TypeError(msg)
        # In UTC: timeouts and deadlines are added to it as timedeltas, and on a time in a
        # named zone (``datetime.now(ZoneInfo("Europe/Berlin"))``) Python adds wall-clock
        # time, so a day-long hold placed before a DST change lasted 23 or 25 hours (and
        # two times of one zone compare by wall clock, ignoring ``fold``).
        return now.astimezone(UTC)

    reading()
    return reading


#: What a handler may return (``Command.handle``): the fields of a receipt it fills itself.
_RECEIPT_FIELDS = frozenset(Receipt.__dataclass_fields__) - {
    "command",
    "request_id",
    "position",
    "replayed",
    "linked",
}


def _check_receipt_fields(command: Command, fields: object) -> None:
    """``TypeError`` unless ``fields`` (what ``command``'s handler returned) names only
    receipt fields: a mapping, and for a linked list (``linked``) each of its commands'
    own, in turn."""
    if not isinstance(fields, Mapping):
        msg = (
            f"command {command.name}'s handler returned {type(fields).__name__}, not a "
            "mapping of receipt fields (return {} for none)"
        )
        raise TypeError(msg)
    linked = isinstance(command, Atomic)
    unnamed = fields.keys() - _RECEIPT_FIELDS - ({"linked"} if linked else set())
    if unnamed:
        msg = (
            f"command {command.name} returned {', '.join(sorted(unnamed))}, which a receipt "
            f"does not name (a receipt names {', '.join(sorted(_RECEIPT_FIELDS))})"
        )
        raise TypeError(msg)
    if linked:
        for inner, part in zip(cast(Atomic, command).commands, fields["linked"], strict=True):
            own = dict(part)
            # Set by the list for each of its commands; one its handler returned itself
            # replaced them (a field of its own, like any other no receipt lets it name).
            if (own.pop("command", None), own.pop("request_id", None)) != (
                inner.name,
                command.request_id,
            ):
                msg = (
                    f"command {inner.name} returned command or request_id, which a receipt "
                    "does not let a command name"
                )
                raise TypeError(msg)
            _check_receipt_fields(inner, own)


def _judge(command: Command, uow: UnitOfWork) -> Any:
    """``command.handle(uow)``; a refusal (raised, or caught by the command and confirmed:
    ``Rejudge``) judged on a copy an earlier command of the batch read from the store is
    judged again once that copy is brought up to date. Each catch-up reads the store's
    latest and marks what it read fresh for the command, so this ends; past a few rounds
    (other writers racing each), the batch is run again on fresh state."""
    for _ in range(3):
        try:
            return command.handle(uow)
        except Rejudge:
            continue
        except DomainError:
            if not uow.catch_up_for_refusal():
                raise
        except Exception:
            raise
        except BaseException as error:
            # A handler's ``SystemExit`` (a helper calling ``sys.exit``), ``GeneratorExit``...:
            # its command's failure, like any other exception of its handler. Raised as is, it
            # passed every ``except Exception`` and stopped the group commit writer, closing
            # the ledger for every caller. A ``KeyboardInterrupt`` in the main thread may be
            # the user's Ctrl-C (the direct committer runs handlers in the caller's thread):
            # it goes on as it came; in any other thread no signal raises it, so the handler
            # did.
            if isinstance(error, KeyboardInterrupt) and (
                threading.current_thread() is threading.main_thread()
            ):
                raise
            msg = f"command {command.name}'s handler raised {error!r}"
            raise RuntimeError(msg) from error
    raise StaleCache


def _backoff(attempt: int) -> None:
    """A jittered pause before attempt ``attempt + 1``, so that competing writers stop
    colliding."""
    time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


def _contended(prepared: PreparedBatch, moved: set[int]) -> list[int]:
    """The commands of a batch that met a version conflict which must be applied again:
    those that touched an aggregate in ``moved``, and every command connected to one of them
    through an aggregate they both touched that the batch changes, or a request id they
    share (so that, applied again, they keep their order relative to each other). All of
    them if none touched one.

    An aggregate no command of the batch changes connects nothing: what the others did
    does not change it, and a change by another writer that matters to a command that read
    it is the commit's read check's to refuse (a refused command's catch-up may have moved
    the batch's copy of it forward meanwhile: each command that read it is still judged
    again from scratch when it is retried). (Two holds toward one merchant, from two
    customers, are not retried together because another writer keeps moving one of the
    customers.)
    """
    count = len(prepared.commands)
    parent = list(range(count))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    changed = {event.originator_id.int for event in prepared.events}
    first_toucher: dict[int, int] = {}
    for index, keys in prepared.touched.items():
        for key in keys & changed:
            other = first_toucher.setdefault(key, index)
            parent[root(index)] = root(other)
    for index, (source, first) in prepared.repeats.items():
        if source is prepared:
            parent[root(index)] = root(first)
    roots = {root(first_toucher[key]) for key in moved if key in first_toucher}
    if not roots:
        return list(range(count))
    return [index for index in range(count) if root(index) in roots]


#: Where a command with a generated request id keeps its receipt once committed. Its id has
#: no record of its own (one token per batch), so a caller that sends the very same command
#: object again (a retry loop, the same object twice in a submission), or a retry of the
#: ledger's that runs it again after its commit was answered, finds it here and replays it:
#: kept as long as the caller keeps the command, and no longer. (Set in the frozen
#: dataclass's ``__dict__``, as ``fingerprint`` caches itself; with the ledger's identity, so
#: the same object sent to another ledger is applied there.)
_DONE = "_daybook_receipt"
#: Where a command with a generated request id keeps the attempts that accepted it when it
#: was answered "outcome unknown" (the store went away as they committed, and stayed away
#: through the ledger's retries): sent again (the same object later in a submission, or a
#: caller's retry loop), it is not run until those attempts are looked up, so that one that
#: did commit is replayed, and one that did not is fenced off, never applied twice. By
#: any ledger (unlike ``_DONE``): one reopened on the same store must look them up too (on
#: another store they are simply not found, and fenced there harmlessly). Gone once a batch
#: holding it commits, or its outcome is known.
_UNKNOWN = "_daybook_unknown"


class _Unknown(NamedTuple):
    """The ``_UNKNOWN`` marker: when the command was first answered "outcome unknown", and
    the attempts that may have applied it."""

    #: The retention clock's seconds (``Retention.clock``), and the monotonic clock's
    #: (``LedgerService.monotonic``): a step of the wall clock moves only the first.
    since: float
    since_monotonic: float
    attempts: tuple[Attempt, ...]


def _kept(command: Command) -> _Unknown | None:
    """The ``_UNKNOWN`` marker on ``command``, if it has one."""
    kept: _Unknown | None = command.__dict__.get(_UNKNOWN)
    return kept


class BatchOutOfOrder(RuntimeError):
    """A batch was committed before the batch it was built on (a defect of its caller)."""


class MustLookUp(Exception):
    """A command answered "outcome unknown" before reached ``apply`` without its attempts
    looked up: ``prepare`` it (the careful path) instead."""


def _record(command: Command, outcome: dict[str, Any]) -> RequestRecord:
    """The record of a request whose caller chose its id."""
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
    if not record.caller:
        if command.caller_request_id:  # a caller chose an id the ledger generated
            return IdempotencyConflict(
                f"request id {command.request_id!r} was generated by the ledger for another "
                "request; choose request ids of your own",
                request_id=command.request_id,
                original_command=record.command,
            )
    elif record.fingerprint != command.fingerprint:
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
