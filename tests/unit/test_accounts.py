"""Account rules, on the aggregate alone (no store, no ledger)."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daybook import (
    AccountClosed,
    AccountNotEmpty,
    BalanceOverflow,
    CurrencyMismatch,
    InsufficientFunds,
    SameAccount,
)
from daybook.domain.accounts import CLOSED, OPEN, Account, transfer
from daybook.domain.errors import DomainError
from daybook.domain.values import MAX_AMOUNT


def opened(currency: str = "EUR", overdraft_limit: int = 0, balance: int = 0) -> Account:
    """An open account with ``balance`` deposited and no pending events."""
    account = Account.open(uuid4(), "alice", currency, overdraft_limit)
    if balance:
        account.deposit(balance)
    account.collect_events()
    return account


def event_names(account: Account) -> list[str]:
    return [type(event).__name__ for event in account.collect_events()]


def test_open_starts_at_zero_with_the_given_terms() -> None:
    account_id = uuid4()
    account = Account.open(account_id, "alice", "EUR", 500)
    assert account.id == account_id
    assert (account.owner, account.currency, account.overdraft_limit) == ("alice", "EUR", 500)
    assert account.balance == 0
    assert account.available == 500
    assert account.status == OPEN
    (event,) = account.collect_events()
    assert isinstance(event, Account.Opened)
    assert event.overdraft_limit == 500
    assert Account.Opened.class_version == 2


def test_deposit_credits_the_balance() -> None:
    account = opened()
    account.deposit(1_000)
    account.deposit(1)
    assert account.balance == 1_001
    assert event_names(account) == ["Deposited", "Deposited"]


def test_withdraw_debits_the_balance_down_to_zero() -> None:
    account = opened(balance=1_000)
    account.withdraw(400)
    account.withdraw(600)
    assert account.balance == 0
    assert event_names(account) == ["Withdrawn", "Withdrawn"]


def test_withdraw_past_the_balance_is_insufficient_funds_with_the_numbers() -> None:
    account = opened(balance=1_000)
    with pytest.raises(InsufficientFunds) as caught:
        account.withdraw(1_001)
    error = caught.value
    assert error.code == "insufficient_funds"
    assert isinstance(error, DomainError)
    message = str(error)
    assert "1000" in message and "1001" in message
    assert error.details["available"] == 1_000
    assert error.details["amount"] == 1_001
    assert account.balance == 1_000
    assert account.collect_events() == []


def test_overdraft_allows_a_negative_balance_down_to_the_limit() -> None:
    account = opened(overdraft_limit=500, balance=100)
    assert account.available == 600
    account.withdraw(600)
    assert account.balance == -500
    assert account.available == 0
    with pytest.raises(InsufficientFunds) as caught:
        account.withdraw(1)
    assert "500" in str(caught.value)
    assert caught.value.details == {
        "account_id": str(account.id),
        "available": 0,
        "balance": -500,
        "overdraft_limit": 500,
        "amount": 1,
    }
    assert account.balance == -500


def test_deposit_past_the_64_bit_maximum_is_a_balance_overflow() -> None:
    account = opened(balance=MAX_AMOUNT - 1)
    account.deposit(1)
    assert account.balance == MAX_AMOUNT
    with pytest.raises(BalanceOverflow) as caught:
        account.deposit(1)
    assert caught.value.code == "balance_overflow"
    assert str(MAX_AMOUNT) in str(caught.value)
    assert account.balance == MAX_AMOUNT


def test_holds_that_would_set_aside_more_than_the_maximum_are_a_balance_overflow() -> None:
    """With a large overdraft limit more than 2**63-1 can be available; what holds set
    aside stays a 64-bit integer, which the balances read model stores (it stopped, for
    every account, on more). A credit to such an account is taken: its balance fits."""
    account = opened(overdraft_limit=MAX_AMOUNT)
    account.deposit(MAX_AMOUNT)
    assert account.available == 2 * MAX_AMOUNT
    far = datetime(2100, 1, 1, tzinfo=UTC)
    account.place_hold(uuid4(), MAX_AMOUNT - 1, far)
    with pytest.raises(BalanceOverflow) as caught:
        account.place_hold(uuid4(), 2, far)
    assert caught.value.code == "balance_overflow"
    assert caught.value.details["held"] == MAX_AMOUNT - 1
    account.place_hold(uuid4(), 1, far)
    assert account.held == MAX_AMOUNT


def test_transfer_moves_money_between_accounts_of_one_currency() -> None:
    source, destination = opened(balance=1_000), opened()
    transfer_id = uuid4()
    transfer(source, destination, 250, transfer_id)
    assert (source.balance, destination.balance) == (750, 250)
    (out,) = source.collect_events()
    (in_,) = destination.collect_events()
    assert isinstance(out, Account.TransferredOut)
    assert isinstance(in_, Account.TransferredIn)
    assert out.transfer_id == in_.transfer_id == transfer_id
    assert out.counterparty == destination.id
    assert in_.counterparty == source.id
    assert out.amount == in_.amount == 250


def test_transfer_may_use_the_overdraft() -> None:
    source, destination = opened(overdraft_limit=300), opened()
    transfer(source, destination, 300, uuid4())
    assert (source.balance, destination.balance) == (-300, 300)


def refused_transfer(source: Account, destination: Account, amount: int) -> DomainError:
    """Run a transfer that must be refused; check it left both accounts untouched."""
    before = (source.balance, destination.balance)
    with pytest.raises(DomainError) as caught:
        transfer(source, destination, amount, uuid4())
    assert (source.balance, destination.balance) == before
    assert source.collect_events() == []
    assert destination.collect_events() == []
    return caught.value


def test_transfer_to_the_same_account_is_refused() -> None:
    account = opened(balance=100)
    error = refused_transfer(account, account, 10)
    assert isinstance(error, SameAccount)
    assert error.code == "same_account"
    assert str(account.id) in str(error)


def test_transfer_across_currencies_is_refused() -> None:
    error = refused_transfer(opened("EUR", balance=100), opened("USD"), 10)
    assert isinstance(error, CurrencyMismatch)
    assert error.code == "currency_mismatch"
    assert "EUR" in str(error) and "USD" in str(error)


def test_transfer_past_the_limit_is_insufficient_funds() -> None:
    error = refused_transfer(opened(overdraft_limit=50, balance=100), opened(), 151)
    assert isinstance(error, InsufficientFunds)
    assert "150" in str(error) and "151" in str(error)


def test_transfer_that_would_overflow_the_destination_is_refused() -> None:
    error = refused_transfer(opened(balance=10), opened(balance=MAX_AMOUNT), 1)
    assert isinstance(error, BalanceOverflow)


@pytest.mark.parametrize("closed_side", ["source", "destination"])
def test_transfer_touching_a_closed_account_is_refused(closed_side: str) -> None:
    source, destination = opened(balance=100), opened()
    closed = source if closed_side == "source" else destination
    if closed is source:
        source.withdraw(100)
    closed.close()
    source.collect_events()
    destination.collect_events()
    error = refused_transfer(source, destination, 10)
    assert isinstance(error, AccountClosed)
    assert error.code == "account_closed"
    assert str(closed.id) in str(error)


def test_close_only_at_zero() -> None:
    account = opened(balance=100)
    with pytest.raises(AccountNotEmpty) as caught:
        account.close()
    assert caught.value.code == "account_not_empty"
    assert "100" in str(caught.value)
    assert account.status == OPEN
    account.withdraw(100)
    account.close()
    assert account.status == CLOSED
    assert event_names(account) == ["Withdrawn", "Closed"]


def test_close_with_a_negative_balance_is_refused() -> None:
    account = opened(overdraft_limit=100)
    account.withdraw(30)
    with pytest.raises(AccountNotEmpty, match="-30"):
        account.close()


def test_a_closed_account_refuses_everything() -> None:
    account = opened()
    account.close()
    account.collect_events()
    other = opened(balance=100)
    attempts = [
        lambda: account.deposit(1),
        lambda: account.withdraw(1),
        account.close,
        lambda: transfer(account, other, 1, uuid4()),
        lambda: transfer(other, account, 1, uuid4()),
    ]
    for attempt in attempts:
        with pytest.raises(AccountClosed) as caught:
            attempt()
        assert caught.value.code == "account_closed"
    assert account.collect_events() == []
    assert other.collect_events() == []
    assert account.balance == 0
    assert other.balance == 100


def test_state_is_rebuilt_from_the_events() -> None:
    account = Account.open(uuid4(), "alice", "EUR", 20)
    other = opened()
    account.deposit(100)
    transfer(account, other, 110, uuid4())
    account.withdraw(10)
    rebuilt = None
    for event in account.collect_events():
        rebuilt = event.mutate(rebuilt)
    assert isinstance(rebuilt, Account)
    assert (rebuilt.balance, rebuilt.overdraft_limit, rebuilt.status) == (-20, 20, OPEN)
    assert rebuilt.version == account.version == 4


operations = st.lists(
    st.tuples(
        st.sampled_from(["deposit", "withdraw", "transfer_out", "transfer_in"]),
        st.integers(min_value=1, max_value=1_000),
    ),
    max_size=40,
)


@given(limit=st.integers(min_value=0, max_value=500), ops=operations)
def test_balance_never_goes_below_minus_the_overdraft_limit(
    limit: int, ops: list[tuple[str, int]]
) -> None:
    account = opened(overdraft_limit=limit)
    other = opened(overdraft_limit=10**6)
    expected = 0
    for name, amount in ops:
        try:
            if name == "deposit":
                account.deposit(amount)
            elif name == "withdraw":
                account.withdraw(amount)
            elif name == "transfer_out":
                transfer(account, other, amount, uuid4())
            else:
                transfer(other, account, amount, uuid4())
        except InsufficientFunds:
            assert name in ("withdraw", "transfer_out")
            assert expected - amount < -limit
        else:
            expected += amount if name in ("deposit", "transfer_in") else -amount
        assert account.balance == expected
        assert account.balance >= -limit
        assert account.available == account.balance + limit >= 0


def test_a_clone_changes_independently_of_its_original() -> None:
    original = opened(balance=100)
    copy = original.clone()
    copy.withdraw(30)
    assert (original.balance, original.version, original.pending_events) == (100, 2, [])
    assert (copy.balance, copy.version, len(copy.pending_events)) == (70, 3, 1)


def test_what_readers_judge_names_events_of_the_aggregate() -> None:
    """``changes_for_readers`` names nested event classes: a misspelt name would fail the
    first commit of a command that only reads such an aggregate. Each name resolves to an
    event of its aggregate, stored under a topic the codec writes."""
    import daybook.domain  # noqa: F401  (every aggregate defined)
    from daybook.domain.events import LedgerAggregate
    from daybook.infrastructure.topics import reader_topics

    def kinds(cls: type[LedgerAggregate]) -> list[type[LedgerAggregate]]:
        return [cls, *(k for sub in cls.__subclasses__() for k in kinds(sub))]

    declared = [k for k in kinds(LedgerAggregate) if k.changes_for_readers is not None]
    assert Account in declared
    for kind in declared:
        for name in kind.changes_for_readers or ():
            event = getattr(kind, name)
            assert issubclass(event, LedgerAggregate.Event), (kind, name)
        assert reader_topics(kind)
    assert reader_topics(Account) == (
        "daybook.domain.accounts:Account.Closed",
        "domain.accounts:Account.Closed",
    )
