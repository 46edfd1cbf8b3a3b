"""Callers are isolated from each other's trouble.

A command on an aggregate another writer keeps changing may end in ``concurrency_conflict``;
the commands it happened to share a batch with may not. A retried request is replayed
without failing the batch it arrived in. A version conflict, a duplicate request id and any
other integrity error are told apart, and each takes its own path.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, OperationalError

from daybook import ConcurrencyConflict, Ledger, Receipt, open_ledger
from daybook.domain.accounts import Account, Deposit, OpenAccount, Transfer, Withdraw
from daybook.domain.commands import Command
from daybook.domain.errors import DomainError, UnknownOutcome
from daybook.domain.holds import PlaceHold
from daybook.infrastructure.ledger.application import LedgerService, PreparedBatch
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, VersionConflict
from daybook.infrastructure.ledger.group_commit import GroupCommitter
from daybook.infrastructure.ledger.requests import PendingRequest
from daybook.infrastructure.topics import reader_topics
from daybook.infrastructure.urls import postgres_params, sqlite_path

#: Largest stored event state the test constraint allows: ordinary events are smaller, an
#: account opened for a 200-character owner is not.
STATE_LIMIT = 400


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


def limit_event_size(url: str) -> None:
    """A real constraint the ledger knows nothing about: big events are refused."""
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            conn.execute(
                "CREATE TRIGGER limit_event_size BEFORE INSERT ON stored_events "
                f"WHEN length(NEW.state) > {STATE_LIMIT} "
                "BEGIN SELECT RAISE(ABORT, 'event too large'); END"
            )
        return
    with psycopg.connect(postgres_params(url).conninfo(), autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE daybook_events ADD CONSTRAINT limit_event_size "
            f"CHECK (octet_length(state) <= {STATE_LIMIT})"
        )


def hold_commits(service: LedgerService) -> tuple[threading.Event, threading.Event]:
    """Make the next commit wait until released, so that the commands sent meanwhile are
    gathered into one batch. Returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    commit = service.commit

    def held(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        if not release.is_set():
            entered.set()
            release.wait(10)
        return commit(prepared, **options)

    service.commit = held  # type: ignore[method-assign]
    return entered, release


def in_one_batch(ledger: Ledger, calls: list[Any]) -> list[Receipt | BaseException]:
    """Run ``calls`` (functions of nothing) from threads of their own, all in one group
    commit batch (behind a held commit), and return their outcomes in order."""
    # Applied as each arrives (not four at a time), so all join the batch behind the held one.
    ledger.service.install_committer(lambda service: GroupCommitter(service, apply_every=1))
    committer = ledger.service.committer
    assert isinstance(committer, GroupCommitter)
    spacer = ledger.open_account("spacer", "EUR").account_id
    entered, release = hold_commits(ledger.service)
    opener = threading.Thread(target=ledger.deposit, args=(spacer, 1))
    opener.start()
    assert entered.wait(10)
    outcomes: list[Receipt | BaseException | None] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except BaseException as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    while (building := committer._building) is None or len(building.items) < len(calls):
        threading.Event().wait(0.001)  # the writer applies them to the batch behind
    release.set()
    for thread in [opener, *threads]:
        thread.join()
    assert all(outcome is not None for outcome in outcomes)
    return outcomes  # type: ignore[return-value]


def test_recorders_tell_version_conflicts_from_duplicate_request_ids(ledger: Ledger) -> None:
    service = ledger.service
    account = ledger.open_account("a", "EUR").account_id
    first = service.prepare([Deposit(account, 1, request_id="first")])
    second = service.prepare([Deposit(account, 2, request_id="second")])  # same version
    service.commit(first)
    with pytest.raises(VersionConflict):
        service.recorder.insert_events(second.stored, requests=second.pending)
    again = service.prepare([Deposit(account, 3, request_id="third")])  # the next version
    (pending,) = again.pending
    reused = PendingRequest(replace(pending.record, request_id="first"), pending.last_event_index)
    with pytest.raises(DuplicateRequest):
        service.recorder.insert_events(again.stored, requests=[reused])
    assert ledger.account(account).balance == 1


def test_recorders_refuse_a_batch_whose_only_read_aggregate_was_closed(ledger: Ledger) -> None:
    """A batch carries the aggregates its commands only read, at the versions they were
    judged at, with what would make that judgement stale: an account closed since makes it
    a version conflict, and nothing of it is written; an account credited since does not
    (a busy merchant read by many holds is no contention)."""
    service = ledger.service
    payer = ledger.open_account("payer", "EUR").account_id
    shop = ledger.open_account("shop", "EUR").account_id
    ledger.deposit(payer, 100)
    hold = service.prepare([PlaceHold(payer, 10, destination=shop, timeout=60)])
    reads = hold.uow.reads()  # the hold reads its destination, changes it not
    assert reads == [(shop, 1, reader_topics(Account))]
    ledger.deposit(shop, 1)  # credited meanwhile: the hold's judgement stands
    service.recorder.insert_events(hold.stored, requests=hold.pending, reads=reads)
    assert ledger.account(payer).held == 10
    again = service.prepare([PlaceHold(payer, 20, destination=shop, timeout=60)])
    ledger.withdraw(shop, 1)
    ledger.close_account(shop)
    with pytest.raises(VersionConflict):
        service.recorder.insert_events(
            again.stored, requests=again.pending, reads=again.uow.reads()
        )
    assert ledger.account(payer).held == 10


def test_an_unrelated_command_never_sees_a_concurrency_conflict(shared_store_url: str) -> None:
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    hot = ours.open_account("hot", "EUR").account_id
    calm = ours.open_account("calm", "EUR").account_id
    other = ours.open_account("other", "EUR").account_id
    ours.deposit(calm, 100)
    recorder = ours.service.recorder
    insert = recorder.insert_events
    attempts_on_hot = 0

    def contended_insert(stored: Any, **options: Any) -> Any:
        nonlocal attempts_on_hot
        if any(event.originator_id == hot for event in stored):
            attempts_on_hot += 1
            theirs.deposit(hot, 1)  # the other writer gets there first, every time
        return insert(stored, **options)

    recorder.insert_events = contended_insert  # type: ignore[method-assign]
    outcomes = ours.service.execute(
        [
            Deposit(hot, 5, request_id="on-the-hot-account"),
            Deposit(calm, 7, request_id="unrelated-1"),
            Transfer(calm, other, 10, request_id="unrelated-2"),
        ]
    )
    hot_outcome, deposit, transfer = outcomes
    assert isinstance(hot_outcome, ConcurrencyConflict)
    assert isinstance(deposit, Receipt) and isinstance(transfer, Receipt)
    assert attempts_on_hot == LedgerService.max_attempts
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert ours.account(calm).balance == 100 + 7 - 10
    assert ours.account(other).balance == 10
    assert ours.account(hot).balance == LedgerService.max_attempts  # theirs, none of ours
    ours.close()
    theirs.close()


def test_commands_that_only_read_the_same_account_are_not_retried_together(
    shared_store_url: str,
) -> None:
    """Two holds toward one merchant, from two customers: the merchant is only read (open,
    same currency), so the holds do not depend on each other. Another writer keeps moving
    the first customer; the second customer's hold commits. Before, the shared merchant
    tied them together, and both were retried until both were refused
    ``concurrency_conflict``, the unrelated customer's included."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    hot = ours.open_account("hot customer", "EUR").account_id
    calm = ours.open_account("calm customer", "EUR").account_id
    merchant = ours.open_account("merchant", "EUR").account_id
    ours.deposit(hot, 100)
    ours.deposit(calm, 100)
    recorder = ours.service.recorder
    insert = recorder.insert_events

    def contended_insert(stored: Any, **options: Any) -> Any:
        if any(event.originator_id == hot for event in stored):
            theirs.deposit(hot, 1)  # the other writer gets there first, every time
        return insert(stored, **options)

    recorder.insert_events = contended_insert  # type: ignore[method-assign]
    hot_hold, calm_hold = ours.service.execute(
        [
            PlaceHold(hot, 10, destination=merchant, timeout=60, request_id="hot-hold"),
            PlaceHold(calm, 20, destination=merchant, timeout=60, request_id="calm-hold"),
        ]
    )
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert isinstance(hot_hold, ConcurrencyConflict)
    assert isinstance(calm_hold, Receipt), calm_hold
    assert ours.account(calm).available == 100 - 20
    assert ours.account(hot).available == 100 + LedgerService.max_attempts  # none of ours
    ours.close()
    theirs.close()


def test_an_integrity_error_that_is_no_conflict_fails_its_command_alone(
    shared_store_url: str,
) -> None:
    ledger = open_ledger(shared_store_url)
    account = ledger.open_account("a", "EUR").account_id
    limit_event_size(shared_store_url)
    tries = 0  # writes that carried the event too large
    insert = ledger.service.recorder.insert_events

    def counting_insert(stored: Any, **options: Any) -> Any:
        nonlocal tries
        tries += any(p.record.request_id == "too-big" for p in options.get("requests", ()))
        return insert(stored, **options)

    ledger.service.recorder.insert_events = counting_insert  # type: ignore[method-assign]
    too_big, fine = in_one_batch(
        ledger,
        [
            lambda: ledger.execute(OpenAccount("x" * 200, "EUR", request_id="too-big")),
            lambda: ledger.deposit(account, 5, request_id="fine"),
        ],
    )
    assert isinstance(too_big, IntegrityError) and not isinstance(
        too_big, VersionConflict | DuplicateRequest
    )
    assert "too large" in str(too_big) or "limit_event_size" in str(too_big)
    assert isinstance(fine, Receipt) and not fine.replayed
    # In the batch, then alone: no retries of a write that can never succeed.
    assert tries == 2, f"the write that breaks the constraint was tried {tries} times"
    assert ledger.account(account).balance == 5
    ledger.close()


def test_a_retried_request_replays_without_failing_its_batch(ledger: Ledger) -> None:
    account = ledger.open_account("a", "EUR").account_id
    original = ledger.deposit(account, 5, request_id="retried")
    ledger.open_account("in between", "EUR")  # so the retry is not in the last batch
    failed_commits = 0
    careful = 0
    commit, execute = ledger.service.commit, ledger.service.execute

    def counting_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        nonlocal failed_commits
        try:
            return commit(prepared, **options)
        except Exception:
            failed_commits += 1
            raise

    def counting_execute(batch: Any, **options: Any) -> Any:
        nonlocal careful
        careful += 1
        return execute(batch, **options)

    ledger.service.execute = counting_execute  # type: ignore[method-assign]
    ledger.service.commit = counting_commit  # type: ignore[method-assign]
    retry, fresh = in_one_batch(
        ledger,
        [
            lambda: ledger.deposit(account, 5, request_id="retried"),
            lambda: ledger.deposit(account, 6, request_id="fresh"),
        ],
    )
    assert isinstance(retry, Receipt) and retry == replace(original, replayed=True)
    assert isinstance(fresh, Receipt) and not fresh.replayed
    assert (failed_commits, careful) == (0, 0)
    assert ledger.account(account).balance == 5 + 6


def test_the_contended_part_of_a_batch_keeps_its_order(shared_store_url: str) -> None:
    """Split after a conflict, commands that share an aggregate stay together and in order:
    a credit and the debit that needs it are never separated."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    hot = ours.open_account("hot", "EUR").account_id
    middle = ours.open_account("middle", "EUR").account_id
    calm = ours.open_account("calm", "EUR").account_id
    ours.deposit(hot, 100)
    theirs.deposit(hot, 1)  # our cache is now behind on the hot account, once
    outcomes = ours.service.execute(
        [
            Transfer(hot, middle, 50, request_id="credit-middle"),
            Transfer(middle, calm, 50, request_id="needs-the-credit"),
            Deposit(calm, 1, request_id="unrelated"),
        ]
    )
    assert all(isinstance(outcome, Receipt) for outcome in outcomes), outcomes
    balances = [ours.account(a).balance for a in (hot, middle, calm)]
    assert balances == [51, 0, 51]
    ours.close()
    theirs.close()


def test_a_lost_commit_that_lands_after_the_retry_looked_is_not_applied_twice(
    shared_store_url: str,
) -> None:
    """The first attempt's answer is lost and the statement commits later, after the retry
    has looked its request ids up and found nothing: the retry then meets a version conflict
    and must look the ids up again (they are generated: only their records can tell), so the
    commands are replayed rather than applied a second time."""
    from eventsourcing.persistence import OperationalError

    ledger = open_ledger(shared_store_url)
    hot = ledger.open_account("hot", "EUR").account_id
    calm = ledger.open_account("calm", "EUR").account_id
    recorder = ledger.service.recorder
    insert = recorder.insert_events
    calls: list[tuple[Any, dict[str, Any]]] = []

    def scripted_insert(stored: Any, **options: Any) -> Any:
        calls.append((stored, options))
        if len(calls) == 1:  # sent, but the answer is lost: it will commit later
            raise OperationalError("server closed the connection unexpectedly")
        if len(calls) == 2:  # the orphan commits now, after the retry's lookups
            insert(calls[0][0], **calls[0][1])
        return insert(stored, **options)

    recorder.insert_events = scripted_insert  # type: ignore[method-assign]
    outcomes = ledger.service.execute([Deposit(hot, 10), Deposit(calm, 20)])  # generated ids
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert all(isinstance(o, Receipt) and o.replayed for o in outcomes), outcomes
    assert len(calls) == 2, "the scripted failures happened"
    assert (ledger.account(hot).balance, ledger.account(calm).balance) == (10, 20)
    ledger.close()


@contextlib.contextmanager
def inserting_with(service: LedgerService, insert_events: Callable[..., Any]) -> Iterator[None]:
    """The store's appends go to ``insert_events`` (an outage, scripted) inside the block."""
    recorder = service.recorder
    real = recorder.insert_events
    recorder.insert_events = insert_events  # type: ignore[method-assign]
    try:
        yield
    finally:
        recorder.insert_events = real  # type: ignore[method-assign]


def submitted_as_one_batch(ledger: Ledger, commands: list[Command]) -> list[Any]:
    """``commands`` applied as one batch: a submission, under group commit; without it (a
    submission's commands then commit one by one), the service's ``execute`` of them all."""
    if ledger.settings.group_commit:
        return ledger.submit(commands)
    return ledger.service.execute(commands)


@contextlib.contextmanager
def first_commit_lost_then_landing(ledger: Ledger) -> Iterator[list[str]]:
    """The first commit's answer is lost, and its statement commits later: just after the
    retry has looked its batch token up (and found nothing), before the retry reads any
    aggregate. Yields a list that holds one item once that happened."""
    from eventsourcing.persistence import OperationalError

    recorder = ledger.service.recorder
    insert, select = recorder.insert_events, recorder.select_requests
    lost: list[tuple[Any, dict[str, Any]]] = []
    landed: list[str] = []

    def losing_insert(stored: Any, **options: Any) -> Any:
        if not lost:  # sent, but the answer is lost: it will commit later
            lost.append((stored, options))
            raise OperationalError("server closed the connection unexpectedly")
        return insert(stored, **options)

    def late_landing(request_ids: Any, *args: Any) -> Any:
        found = select(request_ids, *args)
        tokens = {p.record.request_id for p in lost[0][1]["requests"]} if lost else set()
        if not landed and tokens & set(request_ids):
            insert(lost[0][0], **lost[0][1])  # the lost statement commits now
            landed.append("landed")
        return found

    recorder.insert_events = losing_insert  # type: ignore[method-assign]
    recorder.select_requests = late_landing  # type: ignore[method-assign]
    try:
        yield landed
    finally:
        recorder.insert_events, recorder.select_requests = insert, select  # type: ignore[method-assign]


@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group"])
def test_a_lost_commit_that_lands_before_the_retry_reads_is_fenced_off(
    shared_store_url: str, group_commit: bool
) -> None:
    """The retry sees the lost batch's deposits already in the balances, so it writes no
    conflicting version, and without a fence would apply them a second time. It records
    the lost batch's token as fenced in its own transaction, meets the token the lost batch
    wrote, looks again and replays. (Generated ids have no record each: the token is all a
    retry can find.)"""
    ledger = open_ledger(shared_store_url, group_commit=group_commit)
    hot = ledger.open_account("hot", "EUR").account_id
    calm = ledger.open_account("calm", "EUR").account_id
    with first_commit_lost_then_landing(ledger) as landed:
        # generated ids
        outcomes = submitted_as_one_batch(ledger, [Deposit(hot, 10), Deposit(calm, 20)])
    assert landed, "the lost commit landed between the retry's lookup and its reads"
    assert (ledger.account(hot).balance, ledger.account(calm).balance) == (10, 20)
    assert all(isinstance(o, Receipt) and o.replayed for o in outcomes), outcomes
    positions = [o.position for o in outcomes if isinstance(o, Receipt)]
    assert positions == [ledger.head() - 1, ledger.head()]  # where the lost batch put them
    ledger.close()


@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group"])
def test_a_retry_that_refuses_what_a_lost_commit_did_is_fenced_off_too(
    shared_store_url: str, group_commit: bool
) -> None:
    """The lost batch withdrew everything; the retry, seeing that, refuses the withdrawal.
    A refusal of a generated id writes nothing, so without the fence the caller would be
    told "insufficient funds" for money that left the account. The fence alone makes a
    transaction, meets the lost batch's token, and the withdrawal is answered as done."""
    ledger = open_ledger(shared_store_url, group_commit=group_commit)
    account = ledger.open_account("a", "EUR").account_id
    ledger.deposit(account, 10)
    with first_commit_lost_then_landing(ledger) as landed:
        (outcome,) = ledger.submit([Withdraw(account, 10)])  # a generated id
    assert landed, "the lost commit landed between the retry's lookup and its reads"
    assert isinstance(outcome, Receipt) and outcome.replayed, outcome
    assert ledger.account(account).balance == 0
    ledger.close()


@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group"])
def test_the_same_command_object_sent_again_is_replayed(store_url: str, group_commit: bool) -> None:
    """A command made without a request id carries the one the ledger generated for it;
    sending that very object again (a retry loop, the same object twice in one submission)
    replays it, although generated ids have no record of their own."""
    with open_ledger(store_url, group_commit=group_commit) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        deposit = Deposit(account, 5)
        first = ledger.execute(deposit)
        again = ledger.execute(deposit)
        assert again == replace(first, replayed=True)
        twice = Deposit(account, 7)
        outcomes = ledger.submit([twice, twice])
        assert [o.replayed for o in outcomes if isinstance(o, Receipt)] == [False, True]
        assert ledger.account(account).balance == 12


@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group"])
def test_a_command_repeated_in_a_batch_whose_commit_failed_is_applied_once(
    store_url: str, group_commit: bool
) -> None:
    """The batch's commit fails with an error that says nothing about what was written; its
    commands are then run one by one, and the repeat of a command finds it done."""
    with open_ledger(store_url, group_commit=group_commit) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        recorder = ledger.service.recorder
        insert = recorder.insert_events
        failed: list[int] = []

        def failing_once(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(1)
                raise RuntimeError("the driver failed after sending")
            return insert(*args, **kwargs)

        recorder.insert_events = failing_once  # type: ignore[method-assign]
        deposit = Deposit(account, 5)
        outcomes = submitted_as_one_batch(ledger, [deposit, deposit])
        recorder.insert_events = insert  # type: ignore[method-assign]
        assert failed, "the scripted failure happened"
        assert ledger.account(account).balance == 5, outcomes
        assert [o.replayed for o in outcomes if isinstance(o, Receipt)] == [False, True]


def test_a_repeat_in_the_batch_built_on_a_lost_commit_is_not_applied_again(
    store_url: str,
) -> None:
    """A submission's first batch commits but its answer is lost; the batch the writer built
    on top of it holds a repeat of one of its commands. The lost batch is looked up and
    replayed, the one built on it is applied again, and the repeat is replayed too."""
    from eventsourcing.persistence import OperationalError

    with open_ledger(store_url) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        other = ledger.open_account("b", "EUR").account_id
        recorder = ledger.service.recorder
        insert = recorder.insert_events
        lost: list[int] = []

        def answer_lost_once(*args: Any, **kwargs: Any) -> Any:
            written = insert(*args, **kwargs)
            if not lost:
                lost.append(1)
                raise OperationalError("server closed the connection unexpectedly")
            return written

        recorder.insert_events = answer_lost_once  # type: ignore[method-assign]
        deposit = Deposit(account, 5)
        # Applied 200 at a time: the repeat lands in a later batch than the first use.
        fillers = [Deposit(other, 1) for _ in range(300)]
        outcomes = ledger.submit([deposit, *fillers, deposit])
        recorder.insert_events = insert  # type: ignore[method-assign]
        assert lost, "the scripted failure happened"
        assert ledger.account(account).balance == 5
        assert ledger.account(other).balance == 300
        assert all(isinstance(o, Receipt) for o in outcomes), outcomes
        assert outcomes[-1].replayed  # type: ignore[union-attr]


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "direct"])
def test_a_command_answered_outcome_unknown_is_applied_once_when_sent_again(
    tmp_path: Any, group_commit: bool, committed: bool
) -> None:
    """A submission's first batch is sent and the connection breaks (after it committed, or
    before), and the store stays away through the ledger's retries, which give up: the
    command's outcome is unknown. The very same object later in the submission, and again
    in the caller's retry, waits for its lost attempt to be looked up once the store is
    back: replayed if it committed, applied (once) if it did not, never applied twice."""
    from eventsourcing.persistence import OperationalError

    with open_ledger(f"sqlite:///{tmp_path}/d.db", group_commit=group_commit) as ledger:
        ledger.service.max_attempts = 8  # type: ignore[misc]  # gives up after 2 outages
        account = ledger.open_account("a", "EUR").account_id
        other = ledger.open_account("b", "EUR").account_id
        recorder = ledger.service.recorder
        insert, select = recorder.insert_events, recorder.select_requests
        calls: list[int] = []
        down: list[int] = []
        # Enough failed lookups for the retries of the lost batch to give up (more than
        # 8 // 4 outages; group commit's first failure is not one of its retries').
        outage = 3 if group_commit else 2

        def lost_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                if committed:  # the answer is lost
                    insert(*args, **kwargs)
                raise OperationalError("server closed the connection unexpectedly")
            return insert(*args, **kwargs)

        def down_for_a_while(*args: Any, **kwargs: Any) -> Any:
            if calls and len(down) < outage:
                down.append(1)
                raise OperationalError("could not connect to server")
            return select(*args, **kwargs)

        recorder.insert_events = lost_once  # type: ignore[method-assign]
        recorder.select_requests = down_for_a_while  # type: ignore[method-assign]
        deposit = Deposit(account, 5)
        # Group commit applies 200 commands at a time, the direct committer one: either way
        # the two copies go in different batches.
        fillers = [Deposit(other, 1) for _ in range(1_000)]
        outcomes = ledger.submit([deposit, *fillers, deposit])
        recorder.insert_events, recorder.select_requests = insert, select  # type: ignore[method-assign]
        assert len(down) == outage, "the scripted failures happened"
        assert isinstance(outcomes[0], OperationalError)  # the outcome was unknown
        assert ledger.account(account).balance == 5, outcomes[-1]
        assert isinstance(outcomes[-1], Receipt) and outcomes[-1].replayed is committed
        retried = ledger.submit([deposit])  # the caller's retry of the unknown one
        assert isinstance(retried[0], Receipt) and retried[0].replayed
        assert ledger.account(account).balance == 5


class _Scripted:
    """A recorder whose next inserts lose their answer (``lost``: after writing; ``failed``:
    without writing; ``broken``: after writing, with an error that is no outage) and whose
    next lookups fail (``down``), as a store going away does."""

    def __init__(self, ledger: Ledger) -> None:
        self.recorder = recorder = ledger.service.recorder
        self.insert, self.select = recorder.insert_events, recorder.select_requests
        self.lost = self.failed = self.broken = self.down = 0
        self.held: list[tuple[Any, dict[str, Any]]] = []  # failed inserts, to land later
        recorder.insert_events = self._insert  # type: ignore[method-assign]
        recorder.select_requests = self._select  # type: ignore[method-assign]

    def _insert(self, stored: Any, **options: Any) -> Any:
        if self.failed:
            self.failed -= 1
            self.held.append((stored, options))
            raise OperationalError("server closed the connection unexpectedly")
        written = self.insert(stored, **options)
        if self.lost:
            self.lost -= 1
            raise OperationalError("server closed the connection unexpectedly")
        if self.broken:
            self.broken -= 1
            raise RuntimeError("the driver failed after sending")
        return written

    def _select(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            self.down -= 1
            raise OperationalError("could not connect to server")
        return self.select(*args, **kwargs)


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def answered_unknown(ledger: Ledger, *, landed: bool) -> tuple[_Scripted, UUID, Deposit]:
    """A deposit answered "outcome unknown": its commit breaks (after it ``landed``, or on
    its way, held to land later) and the store stays away through the retries (8 attempts:
    gives up after 2 outages). The scripted store, the account, and the deposit."""
    ledger.service.max_attempts = 8  # type: ignore[misc]
    account = ledger.open_account("a", "EUR").account_id
    store = _Scripted(ledger)
    if landed:
        store.lost = 1
    else:
        store.failed = 1
    store.down = 2
    deposit = Deposit(account, 5)
    assert isinstance(ledger.submit([deposit])[0], OperationalError)
    return store, account, deposit


def test_an_unknown_outcome_met_twice_keeps_both_attempts(tmp_path: Any) -> None:
    """Sent once: its commit breaks on its way (it will land later) and the store stays
    away: outcome unknown. Sent again: that commit is not there yet, and the retry's own
    commits break too: unknown again. Then the first lands: sent a third time, it is
    replayed, not applied again (the second answer kept the first attempt)."""
    with open_ledger(f"sqlite:///{tmp_path}/d.db", group_commit=False) as ledger:
        store, account, deposit = answered_unknown(ledger, landed=False)
        store.failed = 3
        assert isinstance(ledger.submit([deposit])[0], OperationalError)
        first_attempt = store.held[0]
        store.insert(first_attempt[0], **first_attempt[1])  # it lands now
        (third,) = ledger.submit([deposit])
        assert isinstance(third, Receipt) and third.replayed, third
        assert ledger.account(account).balance == 5


def test_an_unknown_outcome_resolved_is_forgotten(tmp_path: Any) -> None:
    """Once the store is back, the command sent again is replayed (its lost commit did
    commit): resolved, with nothing to write. An hour later, the records that told are
    gone, and the same object is still replayed from the receipt it keeps."""
    clock = _Clock()
    with open_ledger(f"sqlite:///{tmp_path}/d.db", group_commit=False, clock=clock) as ledger:
        _store, account, deposit = answered_unknown(ledger, landed=True)
        (second,) = ledger.submit([deposit])
        assert isinstance(second, Receipt) and second.replayed, second
        clock.now += timedelta(minutes=61)
        ledger.request_purge.purge()
        (third,) = ledger.submit([deposit])
        assert isinstance(third, Receipt) and third.replayed, third
        assert ledger.account(account).balance == 5


def test_an_unknown_outcome_sent_again_too_late_to_tell_is_said_so_and_not_run(
    shared_store_url: str,
) -> None:
    """Sent again only after the records that would tell have expired (an outage of more
    than half an hour): daybook cannot tell whether the lost commit landed, and says so,
    for good, rather than risk applying it twice."""
    clock = _Clock()
    with open_ledger(shared_store_url, group_commit=False, clock=clock) as ledger:
        _store, account, deposit = answered_unknown(ledger, landed=True)
        clock.now += timedelta(minutes=31)
        (again,) = ledger.submit([deposit])
        assert isinstance(again, UnknownOutcome), again
        clock.now += timedelta(minutes=30)
        ledger.request_purge.purge()
        (third,) = ledger.submit([deposit])
        assert isinstance(third, UnknownOutcome), third
        with pytest.raises(UnknownOutcome, match="may have been applied"):
            ledger.execute(deposit)
        assert ledger.account(account).balance == 5


def test_an_unknown_outcome_sent_again_after_the_clock_stepped_back_is_not_run_again(
    shared_store_url: str,
) -> None:
    """Whether the records that would tell are gone was judged by the wall clock alone:
    answered "outcome unknown", the deposit's batch record expired and was purged an hour
    later; the host's clock was then stepped back an hour (NTP), and the same object sent
    again found no record, took its lost commit for one that never landed, and was applied
    a second time. The time since the answer is also measured on the monotonic clock,
    which no step moves."""
    clock = _Clock()
    with open_ledger(shared_store_url, group_commit=False, clock=clock) as ledger:
        elapsed = [0.0]
        ledger.service.monotonic = lambda: elapsed[0]  # type: ignore[method-assign]
        _store, account, deposit = answered_unknown(ledger, landed=True)
        clock.now += timedelta(minutes=61)
        elapsed[0] += 61 * 60
        ledger.request_purge.purge()  # the records that would tell are gone
        clock.now -= timedelta(minutes=61)  # stepped back; the monotonic clock goes on
        (again,) = ledger.submit([deposit])
        assert isinstance(again, UnknownOutcome), again
        assert ledger.account(account).balance == 5


def test_an_unknown_outcome_is_looked_up_by_a_ledger_reopened_on_the_store(
    tmp_path: Any,
) -> None:
    """Outcome unknown (the commit landed, its answer was lost), then the application
    reopens its ledger on the same store (or a second ledger shares it) and retries the
    very same object: the new ledger looks the kept attempts up too, and replays it."""
    url = f"sqlite:///{tmp_path}/d.db"
    first = open_ledger(url, group_commit=False)
    _store, account, deposit = answered_unknown(first, landed=True)
    first.close()
    with open_ledger(url, group_commit=False) as second:
        (again,) = second.submit([deposit])
        assert second.account(account).balance == 5, again


def test_an_unknown_outcome_resent_into_a_failure_after_sending_keeps_every_attempt(
    tmp_path: Any,
) -> None:
    """Outcome unknown (A1 failed on its way, not landed). Sent again: A2 (fencing A1 and
    applying the deposit) commits, but the driver then fails with an error that is not an
    outage. That answer keeps A2 with A1: sent a third time, A2 is found, and replayed."""
    with open_ledger(f"sqlite:///{tmp_path}/d.db", group_commit=False) as ledger:
        store, account, deposit = answered_unknown(ledger, landed=False)
        store.broken = 1
        second = ledger.submit([deposit])[0]
        assert isinstance(second, RuntimeError), second
        (third,) = ledger.submit([deposit])
        assert isinstance(third, Receipt) and third.replayed, third
        assert ledger.account(account).balance == 5


def test_a_failure_after_sending_leaves_the_outcome_unknown_and_kept(
    tmp_path: Any,
) -> None:
    """No outage at all: a single command's commit lands, the driver fails after sending
    (an error the ledger treats as "may have happened"), and the error is the answer: its
    attempt is kept on the command, and the same object sent again is replayed."""
    with open_ledger(f"sqlite:///{tmp_path}/d.db", group_commit=False) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        _Scripted(ledger).broken = 1
        deposit = Deposit(account, 5)
        first = ledger.submit([deposit])[0]
        assert isinstance(first, RuntimeError), first
        (again,) = ledger.submit([deposit])
        assert isinstance(again, Receipt) and again.replayed, again
        assert ledger.account(account).balance == 5


def test_giving_up_on_an_unknown_outcome_resent_fences_its_kept_attempts(
    tmp_path: Any,
) -> None:
    """Outcome unknown: A1 failed on its way (it may land later). Sent again, every retry
    meets another writer (version conflicts: nothing written, the fences of A1 that the
    retries carried with them neither), and the ledger gives up with
    ``concurrency_conflict`` ("not applied: retry"): it fences the kept A1 first, so that
    A1 cannot land after the answer and make it false."""
    with open_ledger(f"sqlite:///{tmp_path}/d.db", group_commit=False) as ledger:
        store, account, deposit = answered_unknown(ledger, landed=False)
        recorder = ledger.service.recorder
        scripted = recorder.insert_events

        def contended(stored: Any, **options: Any) -> Any:
            if stored:  # every retry: another writer got there first
                raise VersionConflict("duplicate key value violates unique constraint")
            return store.insert(stored, **options)  # records alone (a fence)

        recorder.insert_events = contended  # type: ignore[method-assign]
        (second,) = ledger.submit([deposit])
        recorder.insert_events = scripted  # type: ignore[method-assign]
        assert isinstance(second, ConcurrencyConflict), second
        lost = store.held[0]
        with pytest.raises(DuplicateRequest):  # the lost statement arrives: fenced off?
            store.insert(lost[0], **lost[1])
        assert ledger.account(account).balance == 0  # as the answer said: not applied


def ledger_that_gives_up(url: str) -> tuple[Ledger, UUID]:
    """A ledger that gives up after 8 version conflicts (and after 8 // 4 = 2 lost
    connections), with an account holding 10."""
    ledger = open_ledger(url, group_commit=False)
    ledger.service.max_attempts = 8  # type: ignore[misc]
    account = ledger.open_account("a", "EUR").account_id
    ledger.deposit(account, 10)
    return ledger, account


def test_a_retry_that_gives_up_fences_off_the_lost_commit_first(shared_store_url: str) -> None:
    """The first commit's answer is lost; every retry then meets another writer's change
    until the ledger gives up and answers ``concurrency_conflict`` ("retry the request").
    That answer must stay true: the lost statement is fenced off before it is given, so
    when it finally reaches the store it fails, and nothing was applied."""
    from eventsourcing.persistence import OperationalError

    ledger, account = ledger_that_gives_up(shared_store_url)
    recorder = ledger.service.recorder
    insert = recorder.insert_events
    lost: list[tuple[Any, dict[str, Any]]] = []

    def scripted(stored: Any, **options: Any) -> Any:
        if not lost:  # sent, but the answer is lost: it may still commit
            lost.append((stored, options))
            raise OperationalError("server closed the connection unexpectedly")
        if stored:  # every retry: another writer got there first
            raise VersionConflict("duplicate key value violates unique constraint")
        return insert(stored, **options)  # a write of records alone (a fence)

    recorder.insert_events = scripted  # type: ignore[method-assign]
    (outcome,) = ledger.submit([Withdraw(account, 10)])  # a generated id
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert isinstance(outcome, ConcurrencyConflict), outcome
    with pytest.raises(DuplicateRequest):  # the lost statement arrives: fenced off
        insert(lost[0][0], **lost[0][1])
    assert ledger.account(account).balance == 10  # as the answer said: not applied
    ledger.close()


def test_a_retry_that_gives_up_replays_what_the_lost_commit_did(shared_store_url: str) -> None:
    """As above, but the lost statement lands during the last retry, after its lookups: the
    commands it carried, one with a generated id and one with the caller's, are answered with
    their replays (looked up by batch token and by request id), not told to retry."""
    from eventsourcing.persistence import OperationalError

    ledger, account = ledger_that_gives_up(shared_store_url)
    recorder = ledger.service.recorder
    insert = recorder.insert_events
    calls: list[tuple[Any, dict[str, Any]]] = []

    def scripted(stored: Any, **options: Any) -> Any:
        calls.append((stored, options))
        if len(calls) == 1:  # sent, but the answer is lost
            raise OperationalError("server closed the connection unexpectedly")
        if len(calls) == 1 + 8:  # the last retry's commit: the lost statement lands first
            insert(calls[0][0], **calls[0][1])
        raise VersionConflict("duplicate key value violates unique constraint")

    recorder.insert_events = scripted  # type: ignore[method-assign]
    withdraw, deposit = Withdraw(account, 3), Deposit(account, 5, request_id="caller-1")
    outcomes = ledger.service.execute([withdraw, deposit])  # one batch
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert len(calls) == 9, "the ledger gave up after the scripted conflicts"
    assert all(isinstance(o, Receipt) and o.replayed for o in outcomes), outcomes
    assert ledger.account(account).balance == 12
    assert ledger.execute(withdraw).replayed  # kept on the command: sent again, replayed
    assert ledger.account(account).balance == 12
    ledger.close()


def test_a_part_that_committed_is_reported_and_never_run_again(shared_store_url: str) -> None:
    """A batch is split after a conflict; its clean part commits; the rest then fails for
    good (the store keeps dropping the connection). Each command gets its own result: the
    one that committed its receipt, as applied (not run again and answered as a replay),
    the other the error."""
    from eventsourcing.persistence import OperationalError

    ours = open_ledger(shared_store_url, group_commit=False)
    theirs = open_ledger(shared_store_url, group_commit=False)
    hot = ours.open_account("hot", "EUR").account_id
    calm = ours.open_account("calm", "EUR").account_id
    recorder = ours.service.recorder
    insert = recorder.insert_events
    calls = 0

    def scripted_insert(stored: Any, **options: Any) -> Any:
        nonlocal calls
        calls += 1
        touches_hot = any(event.originator_id == hot for event in stored)
        if calls == 1:
            theirs.deposit(hot, 1)  # the first attempt meets another writer on hot
        elif touches_hot:
            raise OperationalError("server closed the connection unexpectedly")
        return insert(stored, **options)

    recorder.insert_events = scripted_insert  # type: ignore[method-assign]
    on_hot, on_calm = ours.service.execute([Deposit(hot, 10), Deposit(calm, 20)])  # one batch
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert isinstance(on_hot, OperationalError)
    assert isinstance(on_calm, Receipt) and not on_calm.replayed
    assert (ours.account(hot).balance, ours.account(calm).balance) == (1, 20)
    ours.close()
    theirs.close()


def test_an_outage_is_answered_within_the_outage_budget_not_after_every_attempt(
    ledger: Ledger,
) -> None:
    """Each attempt in an outage may wait the pool's whole connection timeout (10 s) for a
    server that refuses connections: ten attempts made a caller wait 70 to 120 s for its
    ``unavailable``. Attempts stop once ``outage_budget`` has passed since the first."""
    from eventsourcing.persistence import OperationalError

    account = ledger.open_account("ann", "EUR").account_id
    service = ledger.service
    now = [1_000.0]
    service.monotonic = lambda: now[0]  # type: ignore[method-assign]
    tries: list[float] = []
    states: list[str] = []

    def refused(stored: Any, **options: Any) -> Any:
        tries.append(now[0])
        states.append(service.committer.health().state.value)
        now[0] += 10.0  # the pool's wait for a connection it never gets
        raise OperationalError("couldn't get a connection after 10.00 sec")

    with inserting_with(service, refused):
        (outcome,) = service.execute([Deposit(account, 5, request_id="out-1")])
    assert isinstance(outcome, OperationalError), outcome
    assert len(tries) == 2, f"{len(tries)} attempts, {now[0] - 1_000.0:.0f} s"
    assert service.outage_budget == 15.0
    # /health said so while it retried (it said "running" throughout); having given up, the
    # committer waits for the next command, which meets the database afresh.
    assert states == ["running", "retrying"], states
    assert service.committer.health().state.value == "running"
    assert service.committer.health().restarts == 0  # gave up: no recovery
    # A batch that meets the same outage (queued behind that one, say) does not start a
    # budget of its own: its attempt waited as long, and it is answered.
    with inserting_with(service, refused):
        (queued,) = service.execute([Deposit(account, 5, request_id="out-2")])
        assert isinstance(queued, OperationalError) and len(tries) == 3, tries
        # Once nothing has failed for as long as the budget, a failure is a new outage.
        now[0] += 16.0
        (later,) = service.execute([Deposit(account, 5, request_id="out-3")])
        assert isinstance(later, OperationalError) and len(tries) == 5, tries
    # Answered "unavailable", not lost: the retry with its request id applies it once.
    assert ledger.deposit(account, 5, request_id="out-1").replayed is False
    assert ledger.deposit(account, 5, request_id="out-1").replayed
    assert ledger.account(account).balance == 5


def test_a_committer_that_rides_through_an_outage_says_it_retried_then_recovered(
    ledger: Ledger,
) -> None:
    from eventsourcing.persistence import OperationalError

    account = ledger.open_account("ann", "EUR").account_id
    service = ledger.service
    recorder = service.recorder
    insert = recorder.insert_events
    seen: list[str] = []

    def once_down(stored: Any, **options: Any) -> Any:
        seen.append(service.committer.health().state.value)
        if len(seen) <= 2:
            raise OperationalError("server closed the connection unexpectedly")
        return insert(stored, **options)

    with inserting_with(service, once_down):
        (outcome,) = service.execute([Deposit(account, 5)])
    assert isinstance(outcome, Receipt), outcome
    assert seen == ["running", "retrying", "retrying"], seen
    health = service.committer.health()
    assert (health.state.value, health.restarts, health.error) == ("running", 1, None)


def deadlock() -> Exception:
    """A deadlock as eventsourcing raises it: its own error, from psycopg's."""
    from eventsourcing.persistence import OperationalError
    from psycopg.errors import DeadlockDetected

    try:
        raise DeadlockDetected("deadlock detected")
    except DeadlockDetected as cause:
        try:
            raise OperationalError(str(cause)) from cause
        except OperationalError as error:
            return error


def test_a_deadlock_is_contention_tried_again_not_an_outage(ledger: Ledger) -> None:
    """PostgreSQL answered and rolled the transaction back: nothing committed, and the server
    is up. It was taken for an outage: the committer said ``retrying`` (/health 503) and the
    batch spent the outage budget."""
    account = ledger.open_account("ann", "EUR").account_id
    service = ledger.service
    insert = service.recorder.insert_events
    seen: list[str] = []

    def deadlocked_twice(stored: Any, **options: Any) -> Any:
        seen.append(service.committer.health().state.value)
        if len(seen) <= 2:
            raise deadlock()
        return insert(stored, **options)

    with inserting_with(service, deadlocked_twice):
        (outcome,) = service.execute([Deposit(account, 5, request_id="dl-1")])
    assert isinstance(outcome, Receipt), outcome
    assert seen == ["running", "running", "running"], seen
    health = service.committer.health()
    assert (health.state.value, health.restarts, health.error) == ("running", 0, None)
    assert ledger.deposit(account, 5, request_id="dl-1").replayed
    assert ledger.account(account).balance == 5


def test_a_deadlock_every_time_is_answered_concurrency_conflict(ledger: Ledger) -> None:
    """Not ``unavailable`` (a database that did not answer): a conflict, after as many
    attempts as version conflicts get; nothing applied, and the retry applies it once."""
    from daybook.domain.errors import ConcurrencyConflict

    account = ledger.open_account("ann", "EUR").account_id
    service = ledger.service
    tries: list[int] = []

    def deadlocked(stored: Any, **options: Any) -> Any:
        tries.append(1)
        raise deadlock()

    with inserting_with(service, deadlocked):
        (outcome,) = service.execute([Deposit(account, 5, request_id="dl-2")])
    assert isinstance(outcome, ConcurrencyConflict), outcome
    assert len(tries) == service.max_attempts
    assert ledger.account(account).balance == 0
    assert ledger.deposit(account, 5, request_id="dl-2").replayed is False
    assert ledger.account(account).balance == 5


def test_a_dead_connection_met_after_a_long_outage_is_tried_again(ledger: Ledger) -> None:
    """The server is back, and the pool hands out a connection that died with it: that
    fails at once, and a fresh one works. After an outage that used up its budget, such a
    batch was answered unavailable after its one attempt."""
    from eventsourcing.persistence import OperationalError

    account = ledger.open_account("ann", "EUR").account_id
    service = ledger.service
    now = [1_000.0]
    service.monotonic = lambda: now[0]  # type: ignore[method-assign]
    recorder = service.recorder
    insert = recorder.insert_events

    def refused(stored: Any, **options: Any) -> Any:
        now[0] += 10.0
        raise OperationalError("couldn't get a connection after 10.00 sec")

    with inserting_with(service, refused):
        (outcome,) = service.execute([Deposit(account, 5, request_id="out-1")])
    assert isinstance(outcome, OperationalError)
    now[0] += 2.0
    dead = [1]

    def one_dead_connection(stored: Any, **options: Any) -> Any:
        if dead:
            dead.pop()
            raise OperationalError("server closed the connection unexpectedly")
        return insert(stored, **options)

    with inserting_with(service, one_dead_connection):
        (after,) = service.execute([Deposit(account, 7, request_id="after-1")])
    assert isinstance(after, Receipt), after


def test_a_give_up_whose_fence_meets_an_outage_is_answered_unavailable(
    shared_store_url: str,
) -> None:
    """The lost statement must be fenced off before ``concurrency_conflict`` is answered; if
    the fence itself meets an outage, the outcome stays unknown and the outage is the answer:
    coded ``unavailable`` (``daybook.Unavailable``), as every other outage a command ends in
    (it was the driver's bare error). The same command sent again is applied once."""
    from eventsourcing.persistence import OperationalError

    from daybook import Unavailable

    ledger, account = ledger_that_gives_up(shared_store_url)
    recorder = ledger.service.recorder
    insert = recorder.insert_events
    lost: list[tuple[Any, dict[str, Any]]] = []

    def scripted(stored: Any, **options: Any) -> Any:
        if not lost:
            lost.append((stored, options))
            raise OperationalError("server closed the connection unexpectedly")
        if stored:
            raise VersionConflict("duplicate key value violates unique constraint")
        raise OperationalError("server closed the connection unexpectedly")  # the fence

    recorder.insert_events = scripted  # type: ignore[method-assign]
    withdrawal = Withdraw(account, 10)  # a generated id: the lost commit must be fenced
    (outcome,) = ledger.submit([withdrawal])
    recorder.insert_events = insert  # type: ignore[method-assign]
    assert isinstance(outcome, Unavailable), repr(outcome)
    assert outcome.code == "unavailable"
    (again,) = ledger.submit([withdrawal])  # the same command sent again: applied once
    assert isinstance(again, Receipt), again
    assert ledger.account(account).balance == 0
    ledger.close()


def test_a_give_up_answers_each_command_its_own_unavailable(tmp_path: Any) -> None:
    """An outage answers each command its own ``Unavailable``: one instance shared by the
    commands of a contended part would be raised by each group-commit caller in its own
    thread (its traceback growing in each)."""
    from eventsourcing.persistence import OperationalError

    from daybook import Unavailable

    ledger = open_ledger(f"sqlite:///{tmp_path}/s.db", group_commit=False)
    a = ledger.open_account("a", "EUR").account_id
    service: Any = ledger.service

    def look_up(commands: Any, attempts: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    service._look_up = look_up
    outcomes = service._give_up(
        [Withdraw(a, 1), Withdraw(a, 2)], [], ConcurrencyConflict("gave up")
    )
    del service._look_up
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert outcomes[0] is not outcomes[1], "one Unavailable shared by both commands"
    ledger.close()
