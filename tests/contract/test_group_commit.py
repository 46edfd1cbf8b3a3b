"""Group commit: many callers, one transaction, and each caller gets exactly its own outcome."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from daybook import (
    InsufficientFunds,
    Ledger,
    LedgerClosed,
    Receipt,
    SkuNotFound,
    open_async_ledger,
    open_ledger,
)
from daybook.domain.accounts import Account, Deposit, OpenAccount, Withdraw
from daybook.domain.commands import Aggregates
from daybook.domain.errors import ConcurrencyConflict, DomainError, IdempotencyConflict
from daybook.domain.inventory import (
    ReserveStock,
)
from daybook.infrastructure.ledger.application import BatchOutOfOrder, PreparedBatch
from daybook.infrastructure.ledger.group_commit import GroupCommitter


def test_one_batch_with_refusals_replays_and_a_conflict_with_another_writer(
    shared_store_url: str,
) -> None:
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url)  # another process: its own cache and connections
    x = ours.open_account("x", "EUR").account_id
    y = ours.open_account("y", "EUR").account_id
    ours.deposit(x, 100)
    first = ours.deposit(y, 5, request_id="already-done")
    assert ours.account(x).balance == 100  # our cache now holds x at balance 100

    theirs.withdraw(x, 100)  # the other writer empties x behind our cache's back
    head = ours.head()

    outcomes = ours.service.execute(
        [
            Deposit(y, 50, request_id="fresh"),
            Withdraw(x, 80, request_id="stale"),  # accepted on the stale cache...
            Deposit(y, 5, request_id="already-done"),  # a replay
            ReserveStock("SKU-NONE", 1, request_id="no-sku"),  # refused
            Deposit(y, 6, request_id="already-done"),  # same id, other payload
            Deposit(y, 50, request_id="fresh"),  # repeated inside the batch
        ]
    )
    fresh, stale, replay, no_sku, conflict, repeated = outcomes
    assert isinstance(fresh, Receipt) and not fresh.replayed
    # ...but the commit met the other writer's version: re-run on fresh state, refused.
    assert isinstance(stale, InsufficientFunds)
    assert (
        isinstance(replay, Receipt)
        and replay.replayed
        and replay == Receipt(**{**first.__dict__, "replayed": True})
    )
    assert isinstance(no_sku, SkuNotFound)
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(repeated, Receipt) and repeated.replayed
    assert repeated.position == fresh.position
    # Only the fresh deposit was written (PostgreSQL may skip ids of the failed attempt).
    written = ours.service.recorder.select_notifications(head + 1, 100)
    assert [n.id for n in written] == [fresh.position] == [ours.head()]
    assert theirs.account(y).balance == 5 + 50
    assert theirs.account(x).balance == 0
    ours.close()
    theirs.close()


CLIENTS = 12


def run_callers_behind_a_held_commit(
    ledger: Ledger,
) -> tuple[list[list[str | None]], dict[tuple[int, int], Receipt | str], UUID, UUID]:
    """Twelve callers send 25 transfers each, and their first commands all arrive while a
    commit is held open: they are queued (and applied on top of it) before it is let go, so
    a committer that groups them has every chance to, whatever the scheduler does.

    Returns the request ids of every commit, in order, and each caller's outcomes."""
    committed: list[list[str | None]] = []
    rich = ledger.open_account("rich", "EUR").account_id
    poor = ledger.open_account("poor", "EUR").account_id
    assert rich is not None and poor is not None
    ledger.deposit(rich, 1_000_000)
    service = ledger.service
    committer = service.committer
    assert isinstance(committer, GroupCommitter)
    entered, release = threading.Event(), threading.Event()
    commit = service.commit

    def recording_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        request_ids = [c.request_id for c in prepared.commands]
        if request_ids == ["gate"]:
            entered.set()
            assert release.wait(10)
        committed.append(request_ids)
        return commit(prepared, **options)

    service.commit = recording_commit  # type: ignore[method-assign]
    results: dict[tuple[int, int], Receipt | str] = {}

    def client(number: int) -> None:
        for step in range(25):
            source = poor if step % 5 == 0 else rich  # every fifth is refused
            try:
                results[number, step] = ledger.transfer(
                    source, rich if source == poor else poor, 10, request_id=f"{number}-{step}"
                )
            except DomainError as error:
                results[number, step] = error.code

    gate = threading.Thread(target=ledger.deposit, args=(rich, 1), kwargs={"request_id": "gate"})
    gate.start()
    assert entered.wait(10), "the gate's commit started"
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()

    def waiting() -> int:  # queued for the writer, or applied to the batch it builds
        building = committer._building
        return len(committer._inbox._items) + (len(building.items) if building else 0)

    deadline = time.monotonic() + 10
    while waiting() < CLIENTS and time.monotonic() < deadline:
        time.sleep(0.001)
    assert waiting() == CLIENTS, "every caller's first command waits behind the gate"
    release.set()
    for thread in [gate, *threads]:
        thread.join()
    return committed, results, rich, poor


def first_commands_per_commit(committed: list[list[str | None]]) -> list[int]:
    """How many of the callers' first commands (sent while the gate was held) each commit
    carried, for the commits that carried any."""
    firsts = {f"{n}-0" for n in range(CLIENTS)}
    counts = [len(firsts.intersection(ids)) for ids in committed]
    return [c for c in counts if c]


def test_concurrent_callers_share_transactions_and_get_their_own_outcomes(
    store_url: str,
) -> None:
    ledger = open_ledger(store_url)
    committed, results, rich, poor = run_callers_behind_a_held_commit(ledger)

    # The twelve commands that waited behind the gate went out together: in one commit, or
    # two when the writer sent what it had applied the moment the gate's commit ended.
    shared = first_commands_per_commit(committed)
    assert sum(shared) == CLIENTS
    assert len(shared) <= 2 and max(shared) >= CLIENTS // 2, shared

    receipts = [r for r in results.values() if isinstance(r, Receipt)]
    refusals = [r for r in results.values() if isinstance(r, str)]
    assert len(receipts) + len(refusals) == CLIENTS * 25
    assert set(refusals) <= {"insufficient_funds"}
    assert all(
        r.request_id == f"{n}-{s}" for (n, s), r in results.items() if isinstance(r, Receipt)
    )
    assert len({r.position for r in receipts}) == len(receipts)  # each its own position
    total = ledger.account(rich).balance + ledger.account(poor).balance
    assert total == 1_000_000 + 1
    assert ledger.account(poor).balance == 10 * len(
        [r for (n, s), r in results.items() if isinstance(r, Receipt) and s % 5 != 0]
    ) - 10 * len([r for (n, s), r in results.items() if isinstance(r, Receipt) and s % 5 == 0])
    ledger.close()


def test_the_sharing_check_sees_a_committer_that_does_not_group(store_url: str) -> None:
    """The check above is not a formality: with batches of one, the same callers behind the
    same held commit go out in twelve commits, and it would fail."""
    ledger = open_ledger(store_url, group_commit=False)
    ledger.service.install_committer(lambda s: GroupCommitter(s, max_batch=1))
    committed, results, _, _ = run_callers_behind_a_held_commit(ledger)
    assert first_commands_per_commit(committed) == [1] * CLIENTS
    assert all(len(ids) == 1 for ids in committed)
    assert len(results) == CLIENTS * 25
    ledger.close()


def test_the_asyncio_entry_point_uses_group_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        ledger = open_async_ledger(f"sqlite:///{tmp_path}/async.db")
        a = (await ledger.open_account("a", "EUR", request_id="open-a")).account_id
        b = (await ledger.open_account("b", "EUR")).account_id
        assert (await ledger.open_account("a", "EUR", request_id="open-a")).account_id == a
        await ledger.deposit(a, 1_000)
        receipts = await asyncio.gather(
            *(ledger.transfer(a, b, 10, request_id=f"t{i}") for i in range(50))
        )
        assert len({r.position for r in receipts}) == 50
        with pytest.raises(InsufficientFunds):
            await ledger.withdraw(b, 501)
        assert (await ledger.account(b)).balance == 500
        assert (await ledger.account(a)).balance == 500
        await ledger.close()

    asyncio.run(scenario())


def test_without_group_commit_each_command_commits_alone(store_url: str) -> None:
    ledger = open_ledger(store_url, group_commit=False)
    assert not isinstance(ledger.service.committer, GroupCommitter)
    account = ledger.open_account("solo", "EUR").account_id
    assert ledger.deposit(account, 5).position == ledger.head()
    ledger.close()


def test_a_closed_ledger_refuses_new_commands() -> None:
    ledger: Ledger = open_ledger("memory://")
    account = ledger.open_account("a", "EUR").account_id
    ledger.close()
    with pytest.raises(LedgerClosed):
        ledger.deposit(account, 1)


def test_a_batch_prepared_on_a_failed_commit_is_prepared_again(tmp_path: Path) -> None:
    """Pipelining: batch N+1 is applied on N's state while N commits. When N's commit fails,
    N+1 must be thrown away unseen and both must still be applied exactly once."""
    from eventsourcing.persistence import IntegrityError

    ledger = open_ledger(f"sqlite:///{tmp_path}/pipeline.db")
    a = ledger.open_account("a", "EUR").account_id
    b = ledger.open_account("b", "EUR").account_id
    ledger.deposit(a, 10_000)
    commit = ledger.service.commit
    failures = {"left": 3}

    def flaky_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        if failures["left"] and len(prepared.commands) > 1:
            failures["left"] -= 1
            ledger.service._evict(prepared.uow)  # as a real failed commit does
            raise IntegrityError("simulated conflict with another writer")
        return commit(prepared, **options)

    ledger.service.commit = flaky_commit  # type: ignore[method-assign]
    results: dict[str, Receipt] = {}

    def client(number: int) -> None:
        for step in range(40):
            request_id = f"{number}-{step}"
            results[request_id] = ledger.transfer(a, b, 1, request_id=request_id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures["left"] == 0, "the simulated failures happened"
    assert len(results) == 320 and not any(r.replayed for r in results.values())
    assert ledger.account(a).balance == 10_000 - 320
    assert ledger.account(b).balance == 320
    # Every transfer is in the log exactly once, at the position its receipt names.
    positions = sorted(r.position for r in results.values())
    assert len(set(positions)) == 320
    written = ledger.service.recorder.select_notifications(positions[0] - 1, 1000)
    by_request: dict[str | None, int] = {}
    for notification in written:
        event = ledger.service.mapper.to_domain_event(notification)
        request_id = event.meta.request_id  # type: ignore[attr-defined]
        by_request[request_id] = by_request.get(request_id, 0) + 1
    assert all(by_request.get(r) == 2 for r in results)
    ledger.close()


def test_prepare_after_an_uncommitted_batch_sees_its_state() -> None:
    ledger = open_ledger("memory://", group_commit=False)
    a = ledger.open_account("a", "EUR").account_id
    ledger.deposit(a, 100)
    first = ledger.service.prepare([Withdraw(a, 60, request_id="w1")])
    second = ledger.service.prepare(
        [
            Withdraw(a, 60, request_id="w2"),  # refused: the first took 60 of 100
            Withdraw(a, 60, request_id="w1"),  # a repeat of the first batch's request
        ],
        after=first,
    )
    # Not before the batch it builds on: refused by a check that python -O keeps (an
    # assert, it was not), and nothing written.
    with pytest.raises(BatchOutOfOrder):
        ledger.service.commit(second)
    assert ledger.account(a).balance == 100
    (receipt,) = ledger.service.commit(first)
    refused, repeat = ledger.service.commit(second)
    assert isinstance(refused, InsufficientFunds)
    assert isinstance(repeat, Receipt) and repeat.replayed and repeat.position == receipt.position
    assert ledger.account(a).balance == 40
    ledger.close()


def test_commands_applied_on_a_commit_that_fails_are_applied_again(tmp_path: Path) -> None:
    """Deterministic: a command arrives while the batch before it commits, and is applied on
    that batch's uncommitted state; the commit then fails. The waiting command must be
    applied again on fresh state, the failed one re-run, and each written exactly once."""
    from eventsourcing.persistence import IntegrityError

    ledger = open_ledger(f"sqlite:///{tmp_path}/fail.db")
    a = ledger.open_account("a", "EUR").account_id
    b = ledger.open_account("b", "EUR").account_id
    ledger.deposit(a, 1_000)
    entered, release, second_applied = threading.Event(), threading.Event(), threading.Event()
    applied_after: list[bool] = []  # for "second": was it built on an uncommitted batch?
    commit, apply = ledger.service.commit, ledger.service.apply

    def failing_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        if [c.request_id for c in prepared.commands] == ["first"] and not release.is_set():
            entered.set()
            release.wait(10)
            ledger.service._evict(prepared.uow)  # as a real failed commit does
            raise IntegrityError("simulated conflict with another writer")
        return commit(prepared, **options)

    def watching_apply(prepared: PreparedBatch, batch: Any, **options: Any) -> None:
        apply(prepared, batch, **options)
        if any(c.request_id == "second" for c in batch):
            applied_after.append(prepared.after is not None)
            second_applied.set()

    ledger.service.commit = failing_commit  # type: ignore[method-assign]
    ledger.service.apply = watching_apply  # type: ignore[method-assign]
    results: dict[str, Receipt] = {}

    def send(request_id: str, amount: int) -> None:
        results[request_id] = ledger.transfer(a, b, amount, request_id=request_id)

    first = threading.Thread(target=send, args=("first", 10))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=send, args=("second", 20))
    second.start()
    assert second_applied.wait(10)
    release.set()
    first.join(10)
    second.join(10)

    assert applied_after == [True, False], "applied on the failing batch, then again fresh"
    assert not results["first"].replayed and not results["second"].replayed
    assert ledger.account(a).balance == 1_000 - 30
    assert ledger.account(b).balance == 30
    transfers = [
        e
        for n in ledger.service.recorder.select_notifications(1, 100)
        if type(e := ledger.service.mapper.to_domain_event(n)).__name__ == "TransferredOut"
    ]
    assert sorted(e.meta.request_id for e in transfers) == ["first", "second"]  # type: ignore[attr-defined]
    ledger.close()


def test_every_close_returns_once_the_writer_has_ended() -> None:
    """Threads closing one ledger at once (a server's shutdown hooks, say) each return only
    when the queued commands are committed and the writer thread is gone."""
    ledger = open_ledger("memory://")
    account = ledger.open_account("a", "EUR").account_id
    committer = ledger.service.committer
    assert isinstance(committer, GroupCommitter)
    commit = ledger.service.commit

    def slow_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        time.sleep(0.3)
        return commit(prepared, **options)

    ledger.service.commit = slow_commit  # type: ignore[method-assign]
    depositing = threading.Thread(target=ledger.deposit, args=(account, 5))
    depositing.start()
    while not committer._building and not committer._committing:
        time.sleep(0.001)  # the deposit is in the writer's hands
    writer_alive_after_close: list[bool] = []

    def close() -> None:
        ledger.close()
        writer_alive_after_close.append(committer._thread.is_alive())

    closers = [threading.Thread(target=close) for _ in range(4)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join()
    depositing.join()
    assert writer_alive_after_close == [False] * 4
    assert ledger.account(account).balance == 5


def test_callers_are_told_if_the_writer_thread_itself_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the group committer must not leave callers blocked forever."""
    ledger, account, committer = _group_committed()

    def broken(*_: Any) -> None:
        raise AssertionError("a bug in the writer")

    monkeypatch.setattr(committer, "_apply_in_hand", broken)
    # The failed writer's last step (ending its committing thread) made slow: close() must
    # wait for it, however long it takes, so that a closed ledger leaves no thread behind.
    pool = committer._committer
    shutdown = pool.shutdown

    def slow_shutdown(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)
        shutdown(*args, **kwargs)

    monkeypatch.setattr(pool, "shutdown", slow_shutdown)
    with pytest.raises(LedgerClosed, match="group commit stopped"):  # coded: ledger_closed
        ledger.deposit(account, 5)
    with pytest.raises(LedgerClosed):
        ledger.deposit(account, 5)
    assert ledger.account(account).balance == 0
    ledger.close()
    assert not committer._thread.is_alive()
    assert not pool.thread.is_alive()
    assert committer.health().state.value == "failed"


def test_callers_are_told_if_the_writer_cannot_start_a_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As test_callers_are_told_if_the_writer_thread_itself_fails: a writer that fails as
    it hands a batch to its committing thread must answer that batch's callers too (it
    had left them blocked for ever: the batch was the one "committing", with no commit)."""
    ledger, account, committer = _group_committed()

    def refused(*_: object) -> None:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(committer._committer, "submit", refused)
    answers: list[BaseException | object] = []

    def deposit() -> None:
        try:
            answers.append(ledger.deposit(account, 5))
        except BaseException as error:
            answers.append(error)

    caller = threading.Thread(target=deposit, daemon=True)
    caller.start()
    caller.join(10)
    assert answers, "the caller of the batch whose commit could not start is still waiting"
    assert isinstance(answers[0], LedgerClosed) and "not committed" in str(answers[0])
    assert answers[0].code == "ledger_closed"
    ledger.close()
    assert committer.health().state.value == "failed"


def _group_committed() -> tuple[Ledger, UUID, GroupCommitter]:
    """A ledger in memory with group commit and an account: the ledger, the account's id,
    and its group committer."""
    ledger = open_ledger("memory://")
    account = ledger.open_account("a", "EUR").account_id
    committer = ledger.service.committer
    assert isinstance(committer, GroupCommitter)
    return ledger, account, committer


def open_carelessly(self: OpenAccount, aggregates: Aggregates) -> dict[str, Any]:
    """``OpenAccount`` as a handler that forgets to look the id up first would be."""
    aggregates.add(Account.open(self.account_id, self.owner, self.currency, 0))
    return {"account_id": self.account_id}


def test_a_batch_that_conflicts_with_itself_fails_only_the_command_at_fault(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two creations of one id in a batch: the store refuses the batch, but no other writer
    moved anything, so retrying the whole batch would meet the same conflict every time.
    Each command is run alone instead, and only the one at fault is refused."""
    ledger = open_ledger(store_url)
    ledger.service.max_attempts = 3
    other = ledger.open_account("other", "EUR").account_id
    chosen = UUID("7a1e2b3c-4d5e-4f60-8a9b-0c1d2e3f4a5b")
    written: list[int] = []
    insert = ledger.service.recorder.insert_events

    def counting_insert(*args: Any, **kwargs: Any) -> Any:
        written.append(len(args[0]))
        return insert(*args, **kwargs)

    ledger.service.recorder.insert_events = counting_insert  # type: ignore[method-assign]
    monkeypatch.setattr(OpenAccount, "handle", open_carelessly)
    outcomes = ledger.submit(
        [
            Deposit(other, 5),
            OpenAccount("careless", "EUR", account_id=chosen),
            OpenAccount("careless", "EUR", account_id=chosen),
            Deposit(other, 6),
        ]
    )
    assert [type(o) for o in outcomes] == [Receipt, Receipt, ConcurrencyConflict, Receipt]
    assert ledger.account(other).balance == 11
    assert ledger.account(chosen).owner == "careless"
    # The whole batch is not retried: written once by the group committer, once more on
    # the careful path, which then runs each command alone.
    assert written.count(4) <= 2, written
    ledger.close()


def test_callers_get_their_outcomes_even_if_counting_them_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting outcomes for the metrics is not worth a caller: if it fails, every caller is
    still answered and the writer goes on."""
    from daybook.infrastructure.ledger import group_commit

    ledger = open_ledger("memory://")
    account = ledger.open_account("a", "EUR").account_id

    def broken(*_: Any) -> None:
        raise AssertionError("a bug in counting")

    monkeypatch.setattr(group_commit, "count_outcomes", broken)
    assert ledger.deposit(account, 5).position == ledger.head()
    with pytest.raises(InsufficientFunds):
        ledger.withdraw(account, 6)
    outcomes = ledger.submit([Deposit(account, 1), Withdraw(account, 7)])
    assert isinstance(outcomes[0], Receipt) and isinstance(outcomes[1], InsufficientFunds)
    assert ledger.health().state.value == "running"
    assert ledger.account(account).balance == 6
    ledger.close()


def test_a_full_batch_waiting_for_a_commit_does_not_spin() -> None:
    """While a commit is under way, the next batch is full and more commands wait, the
    writer thread sleeps until the commit ends; it must not keep asking the inbox for
    nothing (which starves the committing thread of the interpreter)."""
    ledger = open_ledger("memory://", group_commit=False)
    a = ledger.open_account("a", "EUR").account_id
    service = ledger.service
    service.install_committer(lambda s: GroupCommitter(s, max_batch=2))
    committer = service.committer
    assert isinstance(committer, GroupCommitter)
    entered, release = threading.Event(), threading.Event()
    commit = service.commit

    def held_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        if not release.is_set():
            entered.set()
            release.wait(10)
        return commit(prepared, **options)

    service.commit = held_commit  # type: ignore[method-assign]
    inbox = committer._inbox
    idle_takes = 0
    take = inbox.take

    def counting_take(want: int, timeout: float | None, limit: int) -> Any:
        nonlocal idle_takes
        items = take(want, timeout, limit)
        if entered.is_set() and not release.is_set() and items == []:
            idle_takes += 1
        return items

    inbox.take = counting_take  # type: ignore[method-assign]
    first = threading.Thread(target=ledger.deposit, args=(a, 1))
    first.start()
    assert entered.wait(10)
    later = [threading.Thread(target=ledger.deposit, args=(a, 1)) for _ in range(8)]
    for thread in later:
        thread.start()
    while len(inbox._items) < 6:  # a full batch of two applied, six more waiting
        time.sleep(0.001)
    time.sleep(0.2)  # the writer's chance to spin, if it would
    release.set()
    for thread in [first, *later]:
        thread.join()
    assert idle_takes <= 2, f"the writer asked the inbox {idle_takes} times for nothing"
    assert ledger.account(a).balance == 9
    ledger.close()


def test_a_request_id_expired_on_the_clock_is_new_even_in_the_batch_built_on(
    tmp_path: Path,
) -> None:
    """Deterministic: the batch before (which used a request id) has written its records but
    not yet reported; a command with the same id arrives and is applied on it, after the
    clock moved past that record's retention window. The id is new, as a lookup of the
    record would say: the command is applied, not refused as a reuse with another payload.
    (Found by the model-based test, where time jumps between two commands.)"""
    from datetime import UTC, datetime, timedelta

    from daybook import Settings

    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    window = timedelta(hours=3)
    settings = Settings.load(
        url=f"sqlite:///{tmp_path}/expired.db",
        request_retention=window,
        request_purge_interval=timedelta(0),
    )
    ledger = open_ledger(settings=settings, clock=lambda: now[0])
    a = ledger.open_account("a", "EUR").account_id
    entered, release, second_applied = threading.Event(), threading.Event(), threading.Event()
    applied_after: list[bool] = []
    commit, apply = ledger.service.commit, ledger.service.apply

    def held_commit(prepared: PreparedBatch, **options: Any) -> list[Receipt | DomainError]:
        outcomes = commit(prepared, **options)  # written, with the expiry of its time
        if any(c.payload().get("amount") == 10 for c in prepared.commands):
            entered.set()  # ... and not yet reported: the next batch builds on it
            release.wait(10)
        return outcomes

    def watching_apply(prepared: PreparedBatch, batch: Any, **options: Any) -> None:
        apply(prepared, batch, **options)
        if any(c.payload().get("amount") == 20 for c in batch):
            applied_after.append(prepared.after is not None)
            second_applied.set()

    ledger.service.commit = held_commit  # type: ignore[method-assign]
    ledger.service.apply = watching_apply  # type: ignore[method-assign]
    results: dict[int, Any] = {}

    def send(amount: int) -> None:
        try:
            results[amount] = ledger.deposit(a, amount, request_id="reused")
        except DomainError as error:
            results[amount] = error

    first = threading.Thread(target=send, args=(10,))
    first.start()
    assert entered.wait(10)
    now[0] += window  # the first use's record has expired by the clock
    second = threading.Thread(target=send, args=(20,))
    second.start()
    assert second_applied.wait(10)
    release.set()
    first.join(10)
    second.join(10)

    assert applied_after[0], "the second was applied on the batch still committing"
    assert isinstance(results[10], Receipt) and isinstance(results[20], Receipt), results
    assert ledger.account(a).balance == 30
    ledger.close()


def test_a_reservation_id_used_before_costs_the_store_one_refused_write(store_url: str) -> None:
    """A reservation that resolved is no longer in its inventory: reusing its id is first
    judged on the assumption that the id is free, and the store's unique key refuses the
    write. The careful path must then look the claim up, not assume again and have the
    same write refused a second time."""
    ledger = open_ledger(store_url)
    ledger.receive_stock("A", 5)
    ledger.reserve_stock("A", 1, reservation_id="r-1")
    ledger.release_reservation("A", "r-1")
    recorder = ledger.service.recorder
    refused = []
    insert_events = recorder.insert_events

    def counting(*args: Any, **kwargs: Any) -> Any:
        try:
            return insert_events(*args, **kwargs)
        except Exception as error:
            refused.append(error)
            raise

    recorder.insert_events = counting  # type: ignore[method-assign]
    head = ledger.head()
    with pytest.raises(DomainError) as caught:
        ledger.reserve_stock("A", 1, reservation_id="r-1")
    assert caught.value.code == "reservation_exists"
    assert [type(error).__name__ for error in refused] == ["VersionConflict"]
    assert ledger.head() == head
    ledger.close()


def test_a_command_queued_behind_an_outage_past_its_budget_waits_for_the_pool_once(
    tmp_path: Path,
) -> None:
    """An outage that has lasted ``outage_budget`` already: a new command's read (of its
    account, not cached) waits the pool and fails. Nothing was sent; it was sent on to be
    tried the careful way, whose first attempt waited the pool again before answering:
    two waits (2 x ``connect_timeout``) past the budget rather than one. Counted on a
    clock the test moves, not timed."""
    from eventsourcing.persistence import OperationalError

    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as writer:
        ann = writer.open_account("ann", "EUR").account_id
        bob = writer.open_account("bob", "EUR").account_id
    with open_ledger(url) as ledger:  # nothing cached: each command reads its account
        service = ledger.service
        now = [1_000.0]
        service.monotonic = lambda: now[0]  # type: ignore[method-assign]
        recorder: Any = service.recorder
        select_events = recorder.select_events
        reads: list[str] = []

        def refused(*args: Any, **kwargs: Any) -> Any:
            reads.append("read")
            now[0] += 10.0  # the pool's wait for a connection it never gets
            raise OperationalError("couldn't get a connection after 10.00 sec")

        recorder.select_events = refused
        try:
            with pytest.raises(OperationalError):
                ledger.deposit(ann, 5, request_id="q-ann")
            reads.clear()
            with pytest.raises(OperationalError):
                ledger.deposit(bob, 5, request_id="q-bob")
            assert len(reads) == 1, f"{len(reads)} waits for the pool past the budget"
        finally:
            recorder.select_events = select_events
        # Nothing was sent: the retry applies it, once.
        assert ledger.deposit(bob, 5, request_id="q-bob").replayed is False
        assert ledger.deposit(bob, 5, request_id="q-bob").replayed
        assert ledger.account(bob).balance == 5


@pytest.mark.parametrize("disk_full", [False, True], ids=["outage", "disk full"])
def test_an_outage_past_the_ledgers_retries_is_answered_with_a_code(
    tmp_path: Path, disk_full: bool
) -> None:
    """README: a command caught in an outage ends as ``unavailable`` once the ledger's own
    retries have run out, a disk full as ``storage_full`` (HTTP's 503 and 507). At the
    Python API both were eventsourcing's uncoded ``OperationalError``. Still one (code that
    catches it goes on working), now with the code, the driver's error as its cause, and a
    message that says to send it again with the same request id."""
    import sqlite3

    from eventsourcing.persistence import OperationalError

    from daybook.infrastructure.ledger.application import StorageFull, Unavailable

    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        ann = ledger.open_account("ann", "EUR").account_id
        service = ledger.service
        now = [1_000.0]
        service.monotonic = lambda: now[0]  # type: ignore[method-assign]
        recorder: Any = service.recorder
        insert_events = recorder.insert_events

        def failing(*args: Any, **kwargs: Any) -> Any:
            now[0] += 10.0
            if disk_full:
                cause = sqlite3.OperationalError("database or disk is full")
                cause.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            else:
                cause = sqlite3.OperationalError("unable to open database file")
            raise OperationalError(str(cause)) from cause

        recorder.insert_events = failing
        try:
            with pytest.raises(OperationalError) as answered:
                ledger.deposit(ann, 5, request_id="full-1")
        finally:
            recorder.insert_events = insert_events
        error = answered.value
        assert isinstance(error, StorageFull if disk_full else Unavailable), repr(error)
        assert error.code == ("storage_full" if disk_full else "unavailable")
        assert "same request id" in str(error), error
        assert isinstance(error.__cause__, OperationalError)
        # Nothing was applied: sent again, it is applied once.
        assert ledger.deposit(ann, 5, request_id="full-1").replayed is False
        assert ledger.account(ann).balance == 5


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_a_command_queued_behind_an_outage_past_its_budget_is_answered_unavailable(
    tmp_path: Path, face: str
) -> None:
    """README: a command caught in an outage ends as ``unavailable`` (``daybook.Unavailable``,
    with its code) once the ledger's retries have run out. One that arrives after the
    outage has outlasted the budget, and whose read of its account fails in the writer
    (nothing sent), was answered with eventsourcing's bare ``OperationalError``: no
    ``code``, no "send it again with the same request id", not ``daybook.Unavailable``."""
    from eventsourcing.persistence import OperationalError

    from daybook.infrastructure.ledger.application import Unavailable

    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as writer:
        ann = writer.open_account("ann", "EUR").account_id
        bob = writer.open_account("bob", "EUR").account_id
    ledger: Any = open_ledger(url) if face == "sync" else open_async_ledger(url)
    service = ledger.service
    now = [1_000.0]
    service.monotonic = lambda: now[0]  # type: ignore[method-assign]
    recorder: Any = service.recorder
    select_events = recorder.select_events

    def refused(*args: Any, **kwargs: Any) -> Any:
        now[0] += 10.0  # the pool's wait for a connection it never gets
        raise OperationalError("couldn't get a connection after 10.00 sec")

    def deposit(account: UUID, request_id: str) -> Any:
        if face == "sync":
            return ledger.deposit(account, 5, request_id=request_id)
        return asyncio.run(ledger.deposit(account, 5, request_id=request_id))

    recorder.select_events = refused
    errors = []
    try:
        for account, request_id in ((ann, "q-ann"), (bob, "q-bob")):
            with pytest.raises(OperationalError) as answered:
                deposit(account, request_id)
            errors.append(answered.value)
    finally:
        recorder.select_events = select_events
    codes = [(type(error).__name__, getattr(error, "code", None)) for error in errors]
    assert all(isinstance(error, Unavailable) for error in errors), codes
    if face == "sync":
        ledger.close()
    else:
        asyncio.run(ledger.close())
