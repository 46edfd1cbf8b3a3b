"""Accounts: money in minor units, one currency each, never below -overdraft_limit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from daybook.domain.errors import (
    AccountClosed,
    AccountNotEmpty,
    BalanceOverflow,
    CurrencyMismatch,
    InsufficientFunds,
    SameAccount,
)
from daybook.domain.events import LedgerAggregate
from daybook.domain.values import MAX_AMOUNT

OPEN = "open"
CLOSED = "closed"


class Account(LedgerAggregate):
    """A money account. Invariant: balance >= -overdraft_limit, always."""

    flat_state = True

    if TYPE_CHECKING:  # set by events; not constructor fields (the metaclass reads annotations)
        owner: str
        currency: str
        overdraft_limit: int
        balance: int
        status: str

    class Opened(LedgerAggregate.Created):
        """An account was opened (schema v2 added ``overdraft_limit``)."""

        class_version = 2
        owner: str
        currency: str
        overdraft_limit: int

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Version 1 accounts had no overdraft: their limit is zero."""
            state["overdraft_limit"] = 0

        def apply(self, account: Account) -> None:
            account.owner = self.owner
            account.currency = self.currency
            account.overdraft_limit = self.overdraft_limit
            account.balance = 0
            account.status = OPEN

    class Deposited(LedgerAggregate.Event):
        amount: int

        def apply(self, account: Account) -> None:
            account.balance += self.amount

    class Withdrawn(LedgerAggregate.Event):
        amount: int

        def apply(self, account: Account) -> None:
            account.balance -= self.amount

    class TransferredOut(LedgerAggregate.Event):
        amount: int
        transfer_id: UUID
        counterparty: UUID

        def apply(self, account: Account) -> None:
            account.balance -= self.amount

    class TransferredIn(LedgerAggregate.Event):
        amount: int
        transfer_id: UUID
        counterparty: UUID

        def apply(self, account: Account) -> None:
            account.balance += self.amount

    class Closed(LedgerAggregate.Event):
        def apply(self, account: Account) -> None:
            account.status = CLOSED

    @classmethod
    def open(cls, account_id: UUID, owner: str, currency: str, overdraft_limit: int) -> Account:
        """Open an account with a zero balance."""
        return cls._create(
            cls.Opened,
            id=account_id,
            owner=owner,
            currency=currency,
            overdraft_limit=overdraft_limit,
        )

    @property
    def available(self) -> int:
        """What can still be debited: balance plus the overdraft limit."""
        return self.balance + self.overdraft_limit

    def check_open(self) -> None:
        if self.status == CLOSED:
            raise AccountClosed(
                f"account {self.id} is closed and accepts no further commands",
                account_id=str(self.id),
            )

    def check_debit(self, amount: int) -> None:
        """Refuse unless ``amount`` can be debited now."""
        self.check_open()
        if amount > self.available:
            raise InsufficientFunds(
                f"account {self.id} has {self.available} {self.currency} available "
                f"(balance {self.balance}, overdraft limit {self.overdraft_limit}); "
                f"cannot debit {amount}",
                account_id=str(self.id),
                available=self.available,
                balance=self.balance,
                overdraft_limit=self.overdraft_limit,
                amount=amount,
            )

    def check_credit(self, amount: int) -> None:
        """Refuse unless ``amount`` can be credited now."""
        self.check_open()
        if self.balance + amount > MAX_AMOUNT:
            raise BalanceOverflow(
                f"account {self.id} balance {self.balance} cannot grow by {amount} "
                f"past {MAX_AMOUNT}",
                account_id=str(self.id),
                balance=self.balance,
                amount=amount,
            )

    def deposit(self, amount: int) -> None:
        self.check_credit(amount)
        self.trigger_event(self.Deposited, amount=amount)

    def withdraw(self, amount: int) -> None:
        self.check_debit(amount)
        self.trigger_event(self.Withdrawn, amount=amount)

    def close(self) -> None:
        self.check_open()
        if self.balance != 0:
            raise AccountNotEmpty(
                f"account {self.id} has balance {self.balance} {self.currency}; "
                "only an account at zero can be closed",
                account_id=str(self.id),
                balance=self.balance,
            )
        self.trigger_event(self.Closed)


def transfer(source: Account, destination: Account, amount: int, transfer_id: UUID) -> None:
    """Move ``amount`` from ``source`` to ``destination``: both rules checked, then both
    events triggered, so a refusal leaves both accounts untouched."""
    if source.id == destination.id:
        raise SameAccount(
            f"cannot transfer from account {source.id} to itself", account_id=str(source.id)
        )
    source.check_open()
    destination.check_open()
    if source.currency != destination.currency:
        raise CurrencyMismatch(
            f"account {source.id} holds {source.currency} but account {destination.id} "
            f"holds {destination.currency}; transfers must stay in one currency",
            source_currency=source.currency,
            destination_currency=destination.currency,
        )
    source.check_debit(amount)
    destination.check_credit(amount)
    source.trigger_event(
        Account.TransferredOut, amount=amount, transfer_id=transfer_id, counterparty=destination.id
    )
    destination.trigger_event(
        Account.TransferredIn, amount=amount, transfer_id=transfer_id, counterparty=source.id
    )
