"""Linked commands (``ledger.atomic``), on every backend and both faces."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from uuid import UUID

import pytest

from daybook import InsufficientFunds, Ledger, open_async_ledger, open_ledger
from daybook.domain.accounts import Deposit, OpenAccount, Transfer, Withdraw
from daybook.domain.commands import Command
from daybook.domain.errors import DomainError
from daybook.domain.holds import CaptureHold, PlaceHold
from daybook.domain.inventory import ReceiveStock, ReserveStock
from daybook.domain.values import inventory_id


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


@pytest.fixture
def accounts(ledger: Ledger) -> tuple[UUID, UUID, UUID]:
    ids = []
    for owner in ("payer", "merchant", "tax"):
        account_id = ledger.open_account(owner, "EUR").account_id
        assert account_id is not None
        ids.append(account_id)
    ledger.deposit(ids[0], 1_000)
    return ids[0], ids[1], ids[2]


def test_a_payment_with_its_fee_and_tax_legs_commits_together(
    ledger: Ledger, accounts: tuple[UUID, UUID, UUID]
) -> None:
    payer, merchant, tax = accounts
    legs = [Transfer(payer, merchant, 500), Transfer(payer, tax, 100), Withdraw(payer, 10)]
    receipt = ledger.atomic(legs, request_id="pay-1")
    assert receipt.command == "atomic" and not receipt.replayed
    assert [r.command for r in receipt.linked] == ["transfer", "transfer", "withdraw"]
    assert all(r.position == receipt.position == ledger.head() for r in receipt.linked)
    assert receipt.linked[0].transfer_id is not None
    assert [ledger.account(a).balance for a in accounts] == [390, 500, 100]


def test_a_refused_leg_names_itself_and_nothing_is_written(
    ledger: Ledger, accounts: tuple[UUID, UUID, UUID]
) -> None:
    payer, merchant, tax = accounts
    head = ledger.head()
    legs = [Transfer(payer, merchant, 500), Transfer(payer, tax, 600), Deposit(tax, 1)]
    with pytest.raises(InsufficientFunds) as caught:
        ledger.atomic(legs, request_id="pay-2")
    error = caught.value
    assert error.code == "insufficient_funds" and error.details["index"] == 1
    # The second leg saw the first one's debit: 500 left, 600 asked for.
    assert error.details["available"] == 500
    assert [o["code"] for o in error.details["outcomes"]] == [
        "linked_command_failed",
        "insufficient_funds",
        "linked_command_failed",
    ]
    assert "command 1 of 3" in str(error)
    assert ledger.head() == head
    assert [ledger.account(a).balance for a in accounts] == [1_000, 0, 0]
    # The refusal is the request's outcome: a retry replays it, even once it would pass.
    ledger.deposit(payer, 1_000)
    with pytest.raises(InsufficientFunds) as again:
        ledger.atomic(legs, request_id="pay-2")
    assert again.value.details == error.details


def test_the_list_is_idempotent_as_a_whole(
    ledger: Ledger, accounts: tuple[UUID, UUID, UUID]
) -> None:
    payer, merchant, _ = accounts
    legs = [Transfer(payer, merchant, 100), Withdraw(payer, 1)]
    first = ledger.atomic(legs, request_id="pay-3")
    head = ledger.head()
    again = ledger.atomic(legs, request_id="pay-3")
    assert again.replayed and all(r.replayed for r in again.linked)
    assert again.linked[0].transfer_id == first.linked[0].transfer_id
    assert ledger.head() == head
    with pytest.raises(DomainError) as caught:
        ledger.atomic([Transfer(payer, merchant, 101), Withdraw(payer, 1)], request_id="pay-3")
    assert caught.value.code == "idempotency_conflict"


def test_later_commands_see_earlier_ones_including_new_aggregates(ledger: Ledger) -> None:
    ledger.receive_stock("SKU-L", 5)
    opened = OpenAccount("new", "EUR")
    hold = PlaceHold(opened.account_id, 50, timeout=60)
    receipt = ledger.atomic(
        [
            opened,
            Deposit(opened.account_id, 80),
            hold,
            CaptureHold(hold.hold_id, 30),
            ReserveStock("SKU-L", 5, timeout=60),
        ]
    )
    assert receipt.linked[2].hold_id == hold.hold_id
    view = ledger.account(opened.account_id)
    assert (view.balance, view.held, view.available) == (50, 0, 50)
    assert ledger.inventory("SKU-L").available == 0


def test_a_list_that_opens_one_account_id_twice_is_refused(ledger: Ledger) -> None:
    """The second opening does not replace the first (and the deposit between them with
    it): it is refused, and so is the list."""
    account_id = UUID("5d0c1f2a-8e4b-4b7a-9c3d-2f6e1a0b9c8d")
    head = ledger.head()
    opened = OpenAccount("ann", "EUR", account_id=account_id)
    for again in (OpenAccount("bob", "USD", account_id=account_id), opened):
        with pytest.raises(DomainError) as caught:
            ledger.atomic([opened, Deposit(account_id, 700), again])
        assert caught.value.code == "account_exists"
        assert caught.value.details["index"] == 2
        assert ledger.head() == head
    with pytest.raises(DomainError) as missing:
        ledger.account(account_id)
    assert missing.value.code == "account_not_found"


@pytest.mark.parametrize("opened", ["in the list", "before, used by the list", "before"])
def test_a_list_creating_a_sku_on_an_id_an_account_has_is_refused_as_id_taken(
    ledger: Ledger, opened: str
) -> None:
    squatter = OpenAccount("mallory", "EUR", account_id=inventory_id("SKU-Y"))
    commands: list[Command] = [ReceiveStock("SKU-Z", 1), ReceiveStock("SKU-Y", 5)]
    if opened == "in the list":
        commands.insert(0, squatter)
    else:
        ledger.execute(squatter)
        if opened == "before, used by the list":
            commands.insert(0, Deposit(squatter.account_id, 5))
    head = ledger.head()
    with pytest.raises(DomainError) as caught:
        ledger.atomic(commands)
    assert caught.value.code == "id_taken", caught.value
    assert caught.value.details["index"] == len(commands) - 1
    assert "another SKU" in str(caught.value)
    assert ledger.head() == head


@pytest.mark.parametrize(
    "commands",
    [[], "transfer", [Deposit("9c1d4ab4-5a50-4c39-9d3a-7e56fd2a0b4f", 1), "not a command"]],
)
def test_a_malformed_list_is_invalid_request(ledger: Ledger, commands: object) -> None:
    head = ledger.head()
    with pytest.raises(DomainError) as caught:
        ledger.atomic(commands)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_request"
    assert ledger.head() == head


def test_lists_do_not_nest(ledger: Ledger, accounts: tuple[UUID, UUID, UUID]) -> None:
    from daybook.domain.linked import Atomic

    inner = Atomic([Deposit(accounts[0], 1)])
    with pytest.raises(DomainError) as caught:
        ledger.atomic([inner])
    assert caught.value.code == "invalid_request"


def test_a_listed_command_with_a_request_id_of_its_own_is_refused(
    ledger: Ledger, accounts: tuple[UUID, UUID, UUID]
) -> None:
    """A listed command's own request id was dropped without a word (the list is the
    request): its caller, sending the command again on its own with that id as a retry,
    had it applied twice. Refused, naming the command, nothing applied."""
    payer, merchant, _ = accounts
    head = ledger.head()
    listed = [Transfer(payer, merchant, 5), Deposit(payer, 5, request_id="dep-1")]
    with pytest.raises(DomainError) as caught:
        ledger.atomic(listed, request_id="list-1")
    assert caught.value.code == "invalid_request"
    assert "commands[1]" in caught.value.message and "'dep-1'" in caught.value.message
    from daybook.domain.linked import Atomic

    ledger.submit([Deposit(payer, 1)])
    # A list in a submission: the same.
    with pytest.raises(DomainError) as inside:
        ledger.submit([Atomic([Deposit(payer, 5, request_id="dep-2")])])
    assert inside.value.code == "invalid_request"
    assert ledger.head() == head + 1
    assert ledger.account(payer).balance == 1_001


def test_the_asyncio_face_too(store_url: str) -> None:
    async def scenario() -> None:
        async with open_async_ledger(store_url) as ledger:
            a = (await ledger.open_account("a", "EUR")).account_id
            b = (await ledger.open_account("b", "EUR")).account_id
            assert a is not None and b is not None
            receipt = await ledger.atomic([Deposit(a, 10), Transfer(a, b, 10)], request_id="x")
            assert len(receipt.linked) == 2
            with pytest.raises(InsufficientFunds):
                await ledger.atomic([Deposit(a, 10), Transfer(a, b, 11)])
            assert (await ledger.account(b)).balance == 10
            assert (
                await ledger.atomic([Deposit(a, 10), Transfer(a, b, 10)], request_id="x")
            ).replayed

    asyncio.run(scenario())
