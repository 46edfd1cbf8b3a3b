"""Batch submission: many commands in one call, one outcome per command, in order.

Each command keeps its own idempotency and its own receipt or refusal; the submission is not
atomic (a refusal does not stop the others).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from uuid import UUID

import pytest

from daybook import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    Ledger,
    Receipt,
    open_async_ledger,
    open_ledger,
)
from daybook.domain.accounts import Deposit, OpenAccount, Transfer, Withdraw
from daybook.domain.errors import DomainError
from daybook.domain.inventory import ReceiveStock, ReserveStock
from daybook.infrastructure.ledger.facade import MAX_SUBMISSION


@pytest.fixture(params=[True, False], ids=["group-commit", "direct"])
def ledger(store_url: str, request: pytest.FixtureRequest) -> Iterator[Ledger]:
    ledger = open_ledger(store_url, group_commit=request.param)
    yield ledger
    ledger.close()


def funded(ledger: Ledger, count: int, amount: int) -> list[UUID]:
    accounts = [
        o.account_id
        for o in ledger.submit([OpenAccount(f"owner-{i}", "EUR") for i in range(count)])
        if isinstance(o, Receipt) and o.account_id is not None
    ]
    assert len(accounts) == count
    ledger.submit([Deposit(account, amount) for account in accounts])
    return accounts


def test_one_outcome_per_command_in_order(ledger: Ledger) -> None:
    a, b = funded(ledger, 2, 100)
    head = ledger.head()
    outcomes = ledger.submit(
        [
            Transfer(a, b, 60, request_id="t-1"),
            Withdraw(a, 60, request_id="w-1"),  # refused: 40 left
            Deposit(a, 5, request_id="d-1"),
            Transfer(a, b, 60, request_id="t-1"),  # the same request again: replayed
            Deposit(a, 6, request_id="d-1"),  # the same id, another payload
            Withdraw(a, 45),  # 45 left after the deposit: accepted, in order
        ]
    )
    transfer, refused, deposit, again, conflict, withdrawal = outcomes
    assert isinstance(transfer, Receipt) and not transfer.replayed
    assert isinstance(refused, InsufficientFunds)
    assert isinstance(deposit, Receipt) and deposit.position > transfer.position
    assert again == replace(transfer, replayed=True)
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(withdrawal, Receipt) and withdrawal.position > deposit.position
    assert ledger.head() == head + 4
    assert (ledger.account(a).balance, ledger.account(b).balance) == (0, 160)
    # each command keeps its own idempotency: retrying the whole submission replays it
    retried = ledger.submit([Transfer(a, b, 60, request_id="t-1"), Deposit(a, 5, request_id="d-1")])
    assert retried == [replace(transfer, replayed=True), replace(deposit, replayed=True)]
    assert ledger.head() == head + 4


def test_thousands_of_commands_in_one_call(ledger: Ledger) -> None:
    accounts = funded(ledger, 50, 1_000)
    ledger.receive_stock("SKU-1", 10_000)
    commands: list[Any] = []
    for number in range(3_000):
        if number % 3 == 2:
            commands.append(ReserveStock("SKU-1", 1, request_id=f"r-{number}"))
        else:
            source, destination = accounts[number % 50], accounts[(number * 7 + 1) % 50]
            commands.append(Transfer(source, destination, 1 + number % 40))
    outcomes = ledger.submit(commands)
    assert len(outcomes) == 3_000
    receipts = [o for o in outcomes if isinstance(o, Receipt)]
    refusals = [o for o in outcomes if not isinstance(o, Receipt)]
    assert {type(o) for o in refusals} <= {InsufficientFunds}
    for outcome, command in zip(outcomes, commands, strict=True):
        assert not isinstance(outcome, Receipt) or outcome.command == command.name
    assert len({r.position for r in receipts}) == len(receipts)
    assert sum(ledger.account(a).balance for a in accounts) == 50 * 1_000
    assert ledger.inventory("SKU-1").reserved == 1_000


def test_a_submission_with_nothing_in_it(ledger: Ledger) -> None:
    assert ledger.submit([]) == []


@pytest.mark.parametrize(
    "bad",
    [
        "not a list",
        [Deposit(UUID(int=1), 5), "not a command"],
        [Deposit(UUID(int=1), 5)] * (MAX_SUBMISSION + 1),
    ],
    ids=["not-a-list", "not-a-command", "too-many"],
)
def test_a_malformed_submission_is_refused_whole(ledger: Ledger, bad: Any) -> None:
    head = ledger.head()
    with pytest.raises(InvalidRequest) as caught:
        ledger.submit(bad)
    assert caught.value.code == "invalid_request"
    assert ledger.head() == head


def test_an_account_id_opened_twice_is_refused_and_stays_its_own_commands_trouble(
    ledger: Ledger,
) -> None:
    """The second opening of a chosen id is refused at once, whether the first is in the
    same submission or committed long ago; the commands batched with it are applied."""
    (other,) = funded(ledger, 1, 1)
    chosen = UUID("0f6b1c3e-2a4d-4e8f-9b7a-1c2d3e4f5a6b")
    outcomes = ledger.submit(
        [
            Deposit(other, 5),
            OpenAccount("ann", "EUR", account_id=chosen),
            OpenAccount("ann again", "EUR", account_id=chosen),
        ]
    )
    assert [type(o).__name__ for o in outcomes] == ["Receipt", "Receipt", "AccountExists"]
    with pytest.raises(DomainError) as caught:
        ledger.open_account("bob", "USD", account_id=chosen)
    assert caught.value.code == "account_exists"
    assert str(chosen) in str(caught.value)
    view = ledger.account(chosen)
    assert (view.owner, view.currency, view.version) == ("ann", "EUR", 1)
    assert ledger.account(other).balance == 6


#: What a caller might hand ``execute`` by mistake: a command as the HTTP API takes it, the
#: name of one, a command class instead of a command, nothing.
NOT_COMMANDS: list[Any] = [{"command": "deposit", "amount": 5}, "deposit", Deposit, None]


def test_execute_refuses_what_is_not_a_command(ledger: Ledger) -> None:
    """Refused in the caller's thread, before it reaches the committer: the caller is told,
    and the ledger goes on serving everyone."""
    account = ledger.open_account("a", "EUR").account_id
    head = ledger.head()
    for bad in NOT_COMMANDS:
        with pytest.raises(InvalidRequest) as caught:
            ledger.execute(bad)
        assert caught.value.code == "invalid_request"
        assert type(bad).__name__ in str(caught.value)
    assert ledger.head() == head
    assert ledger.health().state.value == "running"
    assert ledger.deposit(account, 5).position == ledger.head()


def test_the_asyncio_execute_refuses_what_is_not_a_command(store_url: str) -> None:
    async def scenario() -> None:
        ledger = open_async_ledger(store_url)
        account = (await ledger.open_account("a", "EUR")).account_id
        for bad in NOT_COMMANDS:
            with pytest.raises(InvalidRequest) as caught:
                await ledger.execute(bad)
            assert caught.value.code == "invalid_request"
        assert (await ledger.health()).state.value == "running"
        assert (await ledger.deposit(account, 5)).position == await ledger.head()
        await ledger.close()

    asyncio.run(scenario())


def test_the_asyncio_twin(store_url: str) -> None:
    async def scenario() -> None:
        ledger = open_async_ledger(store_url)
        opened = await ledger.submit([OpenAccount("a", "EUR"), OpenAccount("b", "EUR")])
        a, b = (o.account_id for o in opened if isinstance(o, Receipt))
        assert a is not None and b is not None
        outcomes = await ledger.submit(
            [Deposit(a, 10), Transfer(a, b, 4), Transfer(a, b, 7), ReceiveStock("SKU-1", 3)]
        )
        assert [type(o) for o in outcomes] == [Receipt, Receipt, InsufficientFunds, Receipt]
        together = await asyncio.gather(
            *(ledger.submit([Transfer(b, a, 1), Transfer(a, b, 1)]) for _ in range(20))
        )
        assert all(isinstance(o, Receipt) for pair in together for o in pair)
        assert (await ledger.account(a)).balance == 6
        assert (await ledger.account(b)).balance == 4
        await ledger.close()

    asyncio.run(scenario())


def test_a_large_submission_is_applied_while_its_first_part_commits(tmp_path: Any) -> None:
    """Commands that arrive together are not all applied before the first commit: a chunk
    goes out as soon as nothing is committing, and the rest is applied meanwhile."""
    from daybook.infrastructure.ledger.application import PreparedBatch

    ledger = open_ledger(f"sqlite:///{tmp_path}/pipeline.db")
    a, b = funded(ledger, 2, 10_000)
    sizes: list[int] = []
    overlapped: list[bool] = []
    commit, apply = ledger.service.commit, ledger.service.apply

    def counting_commit(prepared: PreparedBatch, **options: Any) -> Any:
        sizes.append(len(prepared.commands))
        return commit(prepared, **options)

    def watching_apply(prepared: PreparedBatch, batch: Any, **options: Any) -> None:
        overlapped.append(prepared.after is not None)  # applied on a batch still committing
        apply(prepared, batch, **options)

    ledger.service.commit = counting_commit  # type: ignore[method-assign]
    ledger.service.apply = watching_apply  # type: ignore[method-assign]
    outcomes = ledger.submit([Transfer(a, b, 1) for _ in range(1_000)])
    assert all(isinstance(o, Receipt) for o in outcomes)
    assert sum(sizes) == 1_000 and len(sizes) > 1 and max(sizes) <= 1_000
    assert any(overlapped)
    assert ledger.account(b).balance == 11_000
    ledger.close()


def test_without_group_commit_each_command_of_a_submission_commits_alone(
    store_url: str,
) -> None:
    """``group_commit=False`` commits each command alone, a submission's too: one
    transaction per command that writes, in order."""
    from daybook.infrastructure.ledger.application import PreparedBatch

    with open_ledger(store_url, group_commit=False) as ledger:
        (a,) = funded(ledger, 1, 100)
        committed: list[list[str]] = []
        commit = ledger.service.commit

        def counting_commit(prepared: PreparedBatch, **options: Any) -> Any:
            committed.append([command.name for command in prepared.commands])
            return commit(prepared, **options)

        ledger.service.commit = counting_commit  # type: ignore[method-assign]
        outcomes = ledger.submit([Deposit(a, 1), Withdraw(a, 2), Deposit(a, 3)])
        assert all(isinstance(o, Receipt) for o in outcomes)
        assert committed == [["deposit"], ["withdraw"], ["deposit"]]
        assert ledger.account(a).balance == 102


def test_a_submission_closed_under_without_group_commit_is_told_what_was_not_applied(
    tmp_path: Any,
) -> None:
    """As the README says: with ``group_commit=False``, closing the ledger during a
    submission finishes the command being committed and answers the rest ``LedgerClosed``,
    not applied: every command has its outcome, and the balance is the receipts'."""
    import threading
    import time

    from daybook.infrastructure.ledger.application import LedgerClosed, PreparedBatch

    ledger = open_ledger(f"sqlite:///{tmp_path}/close.db", group_commit=False)
    a = ledger.open_account("a", "EUR").account_id
    assert a is not None
    commit = ledger.service.commit
    closer = threading.Thread(target=ledger.close)
    seen = []

    def closing_commit(prepared: PreparedBatch, **options: Any) -> Any:
        seen.append(1)
        if len(seen) == 3:  # the close waits for this command, then takes its turn
            closer.start()
            time.sleep(0.2)
        return commit(prepared, **options)

    ledger.service.commit = closing_commit  # type: ignore[method-assign]
    outcomes = ledger.submit([Deposit(a, 1) for _ in range(3_000)])
    closer.join()
    applied = sum(isinstance(o, Receipt) for o in outcomes)
    assert len(outcomes) == 3_000 and 3 <= applied < 3_000
    assert all(isinstance(o, Receipt) for o in outcomes[:applied])
    assert all(isinstance(o, LedgerClosed) for o in outcomes[applied:])
    with open_ledger(f"sqlite:///{tmp_path}/close.db") as reopened:
        assert reopened.account(a).balance == applied


def test_a_cancelled_asyncio_submission_withdraws_nothing(tmp_path: Any) -> None:
    """As the README says: cancelling ``await ledger.submit(...)`` withdraws nothing, every
    command handed over is applied (the caller learns only ``CancelledError``)."""

    async def scenario() -> int:
        ledger = open_async_ledger(f"sqlite:///{tmp_path}/cancel.db")
        account = (await ledger.open_account("a", "EUR")).account_id
        commands = [Deposit(account, 1) for _ in range(5_000)]
        submission = asyncio.create_task(ledger.submit(commands))
        while (await ledger.account(account)).balance == 0:
            await asyncio.sleep(0.001)
        submission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submission
        await ledger.close()
        with open_ledger(f"sqlite:///{tmp_path}/cancel.db") as reopened:
            return reopened.account(account).balance

    assert asyncio.run(scenario()) == 5_000


def test_the_readme_submission_example_runs() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (example,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
        if "ledger.submit(" in block
    ]
    with open_ledger("memory://") as ledger:
        a, b = funded(ledger, 2, 1_000)
        namespace: dict[str, Any] = {"ledger": ledger, "a": a, "b": b}
        exec(compile(example, "README.md", "exec"), namespace)
        assert [type(o) for o in namespace["outcomes"]] == [Receipt, Receipt]
        assert ledger.account(a).balance == 905
