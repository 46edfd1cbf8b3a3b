"""Accounts: money in minor units, one currency each, never below -overdraft_limit.

The aggregate, the rules it refuses by (each error with its code), the view readers get, and
the commands that change accounts, each with its handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from daybook.domain.commands import (
    AccountId,
    Aggregates,
    Amount,
    Command,
    Currency,
    Limit,
    Text,
    Uuid,
    generated,
)
from daybook.domain.errors import DomainError
from daybook.domain.events import LedgerAggregate
from daybook.domain.ids import new_uuid
from daybook.domain.values import MAX_AMOUNT

OPEN = "open"
CLOSED = "closed"
#: The reason a hold's release gives once its timeout passed (``holds.EXPIRED``).
LAPSED = "expired"


class CurrencyMismatch(DomainError):
    """A transfer between accounts of different currencies."""

    code = "currency_mismatch"


class SameAccount(DomainError):
    """A transfer from an account to itself."""

    code = "same_account"


class InsufficientFunds(DomainError):
    """A debit would take the balance below minus the overdraft limit."""

    code = "insufficient_funds"


class AccountNotFound(DomainError):
    """No account has this id."""

    code = "account_not_found"


class AccountExists(DomainError):
    """An account id was chosen twice."""

    code = "account_exists"


class AccountClosed(DomainError):
    """The account is closed and refuses every command."""

    code = "account_closed"


class AccountNotEmpty(DomainError):
    """An account can only be closed at a zero balance."""

    code = "account_not_empty"


class BalanceOverflow(DomainError):
    """A credit would take the balance, or a hold what holds set aside, past 2**63-1."""

    code = "balance_overflow"


@dataclass(frozen=True)
class AccountView:
    """An account's state, read from the log (strongly consistent)."""

    id: UUID
    owner: str
    currency: str
    balance: int
    available: int
    overdraft_limit: int
    status: str
    version: int
    #: Funds held by open holds that have not expired (at the time of the read).
    held: int = 0


class Account(LedgerAggregate):
    """A money account. Invariants: -overdraft_limit <= balance <= 2**63-1, always; what
    unresolved holds set aside is at most 2**63-1; and what open holds reserve can always be
    captured (a debit never takes ``available`` below zero)."""

    flat_state = True
    key_name = "account_id"
    read_as = "account"

    if TYPE_CHECKING:  # set by events; not constructor fields (the metaclass reads annotations)
        owner: str
        currency: str
        overdraft_limit: int
        balance: int
        status: str
        #: Open holds: hold id -> (amount, expires at). Replaced, never changed in place, so
        #: copies of the aggregate may share it (``flat_state``).
        holds: Mapping[UUID, tuple[int, datetime]]

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
            account.holds = {}

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

    #: A command that reads an account without changing it (a hold's destination, an
    #: order's customer and merchant) judges that it is open and its currency, which never
    #: changes: only a closing makes such a judgement stale.
    changes_for_readers = ("Closed",)

    class HoldPlaced(LedgerAggregate.Event):
        """Funds set aside for a hold: ``available`` goes down, ``balance`` does not."""

        hold_id: UUID
        amount: int
        expires_at: datetime

        def apply(self, account: Account) -> None:
            account.holds = {**account.holds, self.hold_id: (self.amount, self.expires_at)}

    class HoldReleased(LedgerAggregate.Event):
        """A hold stopped reserving funds: ``reason`` is captured, voided or expired (a
        capture's debit follows as its own event)."""

        hold_id: UUID
        amount: int
        reason: str

        def apply(self, account: Account) -> None:
            holds = dict(account.holds)
            del holds[self.hold_id]
            account.holds = holds

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

    @classmethod
    def not_found(cls, key: Any) -> DomainError:
        return AccountNotFound(f"no account has id {key}", account_id=str(key))

    @property
    def held(self) -> int:
        """What open holds reserve at ``as_of``: a hold stops counting at the instant it
        expires, whether or not its expiry has been recorded."""
        if not self.holds:
            return 0
        moment = self.as_of
        return sum(
            amount
            for amount, expires_at in self.holds.values()
            if moment is None or moment < expires_at
        )

    @property
    def available(self) -> int:
        """What can still be debited: balance plus the overdraft limit, less what is held."""
        return self.balance + self.overdraft_limit - self.held

    def view(self) -> AccountView:
        held = self.held
        return AccountView(
            id=self.id,
            owner=self.owner,
            currency=self.currency,
            balance=self.balance,
            available=self.balance + self.overdraft_limit - held,
            overdraft_limit=self.overdraft_limit,
            status=self.status,
            version=self.version,
            held=held,
        )

    def check_open(self) -> None:
        if self.status == CLOSED:
            raise AccountClosed(
                f"account {self.id} is closed and accepts no further commands",
                account_id=str(self.id),
            )

    def check_debit(self, amount: int, *, releasing: UUID | None = None) -> None:
        """Refuse unless ``amount`` can be debited now; ``releasing``: once that hold of
        this account is released (a capture checks before it changes anything)."""
        self.check_open()
        held = self.held
        if releasing is not None and releasing in self.holds:
            released, expires_at = self.holds[releasing]
            if self.as_of is None or self.as_of < expires_at:  # counted in ``held``
                held -= released
        available = self.balance + self.overdraft_limit - held
        if amount > available:
            details: dict[str, Any] = {
                "account_id": str(self.id),
                "available": available,
                "balance": self.balance,
                "overdraft_limit": self.overdraft_limit,
                "amount": amount,
            }
            if held:
                details["held"] = held
            on_hold = f", held {held}" if held else ""
            raise InsufficientFunds(
                f"account {self.id} has {available} {self.currency} available "
                f"(balance {self.balance}, overdraft limit {self.overdraft_limit}{on_hold}); "
                f"cannot debit {amount}",
                **details,
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

    def record_lapses(self, debit: int) -> None:
        """Record the release of every hold lapsed at ``as_of`` (``HoldReleased``, expired)
        if a debit of ``debit`` needs their funds. Called by a command about to rely on
        them, after its checks and before its own event: written with it, the release
        changes the account's version, so a writer whose clock is behind (another host, or
        this one after a step back), to which the hold still looks open, cannot capture it
        as well: it meets the version, reloads, and finds the account no longer counts the
        hold (``holds.holding_account``). As ``Inventory`` does for reservations."""
        if not self.holds or self.as_of is None:
            return
        unresolved = sum(amount for amount, _ in self.holds.values())
        if debit > self.balance + self.overdraft_limit - unresolved:
            self._release_lapsed()

    def _release_lapsed(self) -> None:
        moment = self.as_of
        assert moment is not None
        for hold_id, (amount, expires_at) in list(self.holds.items()):
            if moment >= expires_at:
                self.trigger_event(self.HoldReleased, hold_id=hold_id, amount=amount, reason=LAPSED)

    def deposit(self, amount: int) -> None:
        self.check_credit(amount)
        self.trigger_event(self.Deposited, amount=amount)

    def withdraw(self, amount: int) -> None:
        self.check_debit(amount)
        self.record_lapses(amount)
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
        held = self.held
        if held:
            raise AccountNotEmpty(
                f"account {self.id} has {held} {self.currency} held by open holds; "
                "capture or void them before closing it",
                account_id=str(self.id),
                balance=self.balance,
                held=held,
            )
        if self.holds and self.as_of is not None:  # lapsed, each of them: closed, it relies
            self._release_lapsed()  # on that, as a debit does (``record_lapses``)
        self.trigger_event(self.Closed)

    def place_hold(self, hold_id: UUID, amount: int, expires_at: datetime) -> None:
        """Set ``amount`` aside until ``expires_at`` (refused like a debit of it)."""
        self.check_debit(amount)
        # What holds set aside is a 64-bit integer, as read models store it: with a large
        # overdraft limit, more than 2**63-1 can be available to set aside.
        unresolved = sum(held for held, _ in self.holds.values())
        if unresolved + amount > MAX_AMOUNT and self.as_of is not None:
            # Holds past their timeout count in no admission check, this one included: it
            # relies on them, so their release is recorded with it (read models' ``held`` too).
            counted = self.held
            if counted + amount <= MAX_AMOUNT:
                self._release_lapsed()
                unresolved = counted
        if unresolved + amount > MAX_AMOUNT:
            raise BalanceOverflow(
                f"account {self.id} has {unresolved} on hold; holding {amount} more would "
                f"pass {MAX_AMOUNT}",
                account_id=str(self.id),
                held=unresolved,
                amount=amount,
            )
        self.record_lapses(amount)
        self.trigger_event(self.HoldPlaced, hold_id=hold_id, amount=amount, expires_at=expires_at)

    def release_hold(self, hold_id: UUID, reason: str) -> None:
        """Stop reserving a hold's funds (its resolution was checked by the hold)."""
        amount, _ = self.holds[hold_id]
        self.trigger_event(self.HoldReleased, hold_id=hold_id, amount=amount, reason=reason)


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
    source.record_lapses(amount)
    source.trigger_event(
        Account.TransferredOut, amount=amount, transfer_id=transfer_id, counterparty=destination.id
    )
    destination.trigger_event(
        Account.TransferredIn, amount=amount, transfer_id=transfer_id, counterparty=source.id
    )


# -- commands ---------------------------------------------------------------------------------


class OpenAccount(Command):
    """Open an account with a zero balance in one ISO 4217 currency."""

    owner: Text
    currency: Currency
    overdraft_limit: Limit = 0
    account_id: AccountId = generated(factory=new_uuid, kw_only=True)

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        if aggregates.taken(Account, self.account_id):  # an account, or any other aggregate
            raise AccountExists(
                f"the id {self.account_id} is taken already; open the account with another",
                account_id=str(self.account_id),
            )
        aggregates.add(
            Account.open(self.account_id, self.owner, self.currency, self.overdraft_limit)
        )
        return {"account_id": self.account_id}


class Deposit(Command):
    """Credit ``amount`` minor units to an account."""

    account_id: AccountId
    amount: Amount

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        aggregates.get(Account, self.account_id).deposit(self.amount)
        return {"account_id": self.account_id}


class Withdraw(Command):
    """Debit ``amount`` minor units, within the balance plus the overdraft limit."""

    account_id: AccountId
    amount: Amount

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        aggregates.get(Account, self.account_id).withdraw(self.amount)
        return {"account_id": self.account_id}


class Transfer(Command):
    """Debit one account and credit another of the same currency, atomically."""

    source: AccountId
    destination: AccountId
    amount: Amount
    transfer_id: Uuid = generated(factory=new_uuid, kw_only=True)

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        source = aggregates.get(Account, self.source)
        destination = aggregates.get(Account, self.destination)
        transfer(source, destination, self.amount, self.transfer_id)
        return {"account_id": self.source, "transfer_id": self.transfer_id}


class CloseAccount(Command):
    """Close an account at zero balance; it then refuses everything."""

    account_id: AccountId

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        aggregates.get(Account, self.account_id).close()
        return {"account_id": self.account_id}
