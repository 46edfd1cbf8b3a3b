"""Holds: two-phase transfers. Funds are set aside first and posted, released or expired later.

``hold`` reserves an amount on an account until a timeout: its balance is unchanged, its
``held`` goes up and its ``available`` down. ``capture`` posts all or part of it (the rest is
released) as a debit, or, when the hold names a destination, as a transfer there; ``void``
releases it all. A hold resolves exactly once: captured, voided or expired. It stops counting
against ``available`` at the instant it expires, whether or not its expiry has been recorded
(``expire_hold``, which the hold sweeper sends, records it).

Each hold is an aggregate of its own (its lifecycle, found by its id); the account keeps only
the holds that are open, with their amounts and expiry, for its admission checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid5

from daybook.domain.accounts import LAPSED, Account, CurrencyMismatch, SameAccount, transfer
from daybook.domain.commands import (
    AccountId,
    Aggregates,
    Amount,
    Command,
    OptionalAmount,
    OptionalUuid,
    Timeout,
    Uuid,
    find_to_create,
    generated,
)
from daybook.domain.errors import DomainError, InvalidAmount
from daybook.domain.events import LedgerAggregate
from daybook.domain.ids import new_uuid
from daybook.domain.values import check_uuid

OPEN = "open"
CAPTURED = "captured"
VOIDED = "voided"
EXPIRED = LAPSED

_NAMESPACE = UUID("0b5f6f0e-3c1e-4e8e-9a53-6f1b2a7c9d40")


class HoldNotFound(DomainError):
    """No hold has this id."""

    code = "hold_not_found"


class HoldExists(DomainError):
    """A hold id was chosen twice."""

    code = "hold_exists"


class HoldResolved(DomainError):
    """The hold was already captured, voided or expired (``details["resolution"]`` says)."""

    code = "hold_resolved"


class HoldExpired(DomainError):
    """The hold's timeout has passed: it can no longer be captured or voided."""

    code = "hold_expired"


class HoldNotExpired(DomainError):
    """An expiry was asked for before the hold's timeout passed."""

    code = "hold_not_expired"


@dataclass(frozen=True)
class HoldView:
    """A hold's state, read from the log (strongly consistent). ``status`` is ``expired``
    from the instant its timeout passed, even before the expiry is recorded."""

    hold_id: UUID
    account_id: UUID
    destination: UUID | None
    amount: int
    currency: str
    expires_at: datetime
    status: str
    captured: int
    version: int
    #: True once the resolution is in the log (an expiry may not be recorded yet).
    recorded: bool = field(default=True)


def decision_time(aggregate: LedgerAggregate) -> datetime:
    """The instant a command is judged at (the ledger's clock, see ``LedgerAggregate.as_of``)."""
    if aggregate.as_of is None:
        msg = "a command that depends on time was run without the ledger's clock"
        raise RuntimeError(msg)
    return aggregate.as_of


class Hold(LedgerAggregate):
    """One hold. Invariant: it resolves exactly once (captured, voided or expired), and is
    never captured for more than it holds."""

    flat_state = True
    key_name = "hold_id"
    read_as = "hold_status"

    if TYPE_CHECKING:
        hold_id: UUID
        account_id: UUID
        destination: UUID | None
        amount: int
        currency: str
        expires_at: datetime
        status: str
        captured: int

    class Placed(LedgerAggregate.Created):
        hold_id: UUID
        account_id: UUID
        destination: UUID | None
        amount: int
        currency: str
        expires_at: datetime

        def apply(self, hold: Hold) -> None:
            hold.hold_id = self.hold_id
            hold.account_id = self.account_id
            hold.destination = self.destination
            hold.amount = self.amount
            hold.currency = self.currency
            hold.expires_at = self.expires_at
            hold.status = OPEN
            hold.captured = 0

    class Captured(LedgerAggregate.Event):
        """Posted: ``amount`` was debited (or transferred), ``released`` went back."""

        amount: int
        released: int
        transfer_id: UUID | None

        def apply(self, hold: Hold) -> None:
            hold.status = CAPTURED
            hold.captured = self.amount

    class Voided(LedgerAggregate.Event):
        released: int

        def apply(self, hold: Hold) -> None:
            hold.status = VOIDED

    class Expired(LedgerAggregate.Event):
        released: int

        def apply(self, hold: Hold) -> None:
            hold.status = EXPIRED

    @property
    def settled(self) -> bool:
        return self.status != OPEN

    @classmethod
    def id_for(cls, key: Any) -> UUID:
        # Derived from the hold id, so a hold id can never name another kind of aggregate.
        return uuid5(_NAMESPACE, f"hold:{check_uuid(key, 'hold_id')}")

    @classmethod
    def not_found(cls, key: Any) -> DomainError:
        return HoldNotFound(f"no hold has id {key}", hold_id=str(key))

    @property
    def expired(self) -> bool:
        """True once the timeout has passed (at ``as_of``) or the expiry is recorded."""
        if self.status == EXPIRED:
            return True
        return self.status == OPEN and self.as_of is not None and self.as_of >= self.expires_at

    def view(self) -> HoldView:
        expired = self.expired
        return HoldView(
            hold_id=self.hold_id,
            account_id=self.account_id,
            destination=self.destination,
            amount=self.amount,
            currency=self.currency,
            expires_at=self.expires_at,
            status=EXPIRED if expired else self.status,
            captured=self.captured,
            version=self.version,
            recorded=self.status != OPEN or not expired,
        )

    def view_given(self, read: Callable[[type[Any], Any], Any]) -> HoldView:
        """The view, told by the account too: an open hold its account no longer counts was
        released as lapsed by a writer whose clock was past its timeout (``record_lapses``),
        though this reader's clock is not (another host's, or this one's stepped back). No
        capture or void can succeed (``check_open_to_resolve``): expired, and recorded."""
        view = self.view()
        if view.status != OPEN or self.hold_id in read(Account, self.account_id).holds:
            return view
        # Read after the hold: the account no longer counts it because it released it as
        # lapsed, or because the hold was resolved meanwhile (a capture, a void or an expiry
        # changes both in one transaction). The hold, read again after the account, tells.
        now: Hold = read(Hold, self.hold_id)
        if now.status != OPEN:
            return now.view()
        return replace(now.view(), status=EXPIRED, recorded=True)

    def check_open(self) -> None:
        """Refuse unless the hold can still be captured or voided."""
        if self.expired:
            raise HoldExpired(
                f"hold {self.hold_id} expired at {self.expires_at.isoformat()}; "
                "its funds are available again",
                hold_id=str(self.hold_id),
                expires_at=self.expires_at.isoformat(),
                recorded=self.status == EXPIRED,
            )
        if self.status != OPEN:
            raise HoldResolved(
                f"hold {self.hold_id} was already {self.status}",
                hold_id=str(self.hold_id),
                resolution=self.status,
            )

    def check_capture(self, amount: int) -> None:
        """Refuse unless ``amount`` of the hold can be captured."""
        self.check_open()
        if amount > self.amount:
            raise InvalidAmount(
                f"hold {self.hold_id} holds {self.amount} {self.currency}; cannot capture {amount}",
                hold_id=str(self.hold_id),
                held=self.amount,
                amount=amount,
            )

    def capture(self, amount: int, transfer_id: UUID | None) -> None:
        self.check_capture(amount)
        self.trigger_event(
            self.Captured, amount=amount, released=self.amount - amount, transfer_id=transfer_id
        )

    def void(self) -> None:
        self.check_open()
        self.trigger_event(self.Voided, released=self.amount)

    def expire(self) -> None:
        """Record the expiry of a hold whose timeout has passed."""
        self.check_expire()
        self.trigger_event(self.Expired, released=self.amount)

    def check_expire(self) -> None:
        """Refuse unless the hold is open and its timeout has passed."""
        if self.status != OPEN:
            raise HoldResolved(
                f"hold {self.hold_id} was already {self.status}",
                hold_id=str(self.hold_id),
                resolution=self.status,
            )
        if not self.expired:
            raise HoldNotExpired(
                f"hold {self.hold_id} expires at {self.expires_at.isoformat()}, not yet",
                hold_id=str(self.hold_id),
                expires_at=self.expires_at.isoformat(),
            )


def holding_account(aggregates: Aggregates, hold: Hold) -> Account | None:
    """The account whose funds the open ``hold`` sets aside; None if the account released
    them as lapsed (checked before the hold changes: a refusal changes nothing).

    An account that does not count an open hold is either a copy older than the hold, from
    a writer whose cache is behind another's, or one that released the hold's funds
    because a debit relied on them, judged by a writer whose clock was past the hold's
    timeout (``Account.record_lapses``). Judged on the latest state (a stale copy sends the
    command back to be judged again on it: ``confirm_refusal``), it is the second."""
    account = aggregates.get(Account, hold.account_id)
    if hold.hold_id in account.holds:
        return account
    aggregates.confirm_refusal()
    return None


def check_open_to_resolve(aggregates: Aggregates, hold: Hold) -> None:
    """``hold.check_open()``, for a capture or a void; a refusal as expired says
    ``recorded`` when the release of its funds is in the log (a debit that relied on them
    recorded it, ``Account.record_lapses``) though the hold's own expiry is not yet."""
    try:
        hold.check_open()
    except HoldExpired as expired:
        if hold.status == OPEN and holding_account(aggregates, hold) is None:
            raise lapsed_meanwhile(hold) from None
        raise expired from None


def lapsed_meanwhile(hold: Hold) -> HoldExpired:
    """The refusal of a capture or a void of a hold its account released as lapsed."""
    return HoldExpired(
        f"hold {hold.hold_id} expired at {hold.expires_at.isoformat()}, and its funds were "
        "used since; it can no longer be captured or voided",
        hold_id=str(hold.hold_id),
        expires_at=hold.expires_at.isoformat(),
        recorded=True,
    )


# -- commands ---------------------------------------------------------------------------------


class PlaceHold(Command):
    """Reserve ``amount`` for ``timeout`` seconds; a pending transfer to a ``destination``."""

    name = "hold"

    account_id: AccountId
    amount: Amount
    destination: OptionalUuid = field(default=None, kw_only=True)
    timeout: Timeout = field(kw_only=True)
    hold_id: Uuid = generated(factory=new_uuid, kw_only=True)

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        if find_to_create(aggregates, Hold, self.hold_id) is not None:
            raise HoldExists(
                f"a hold with id {self.hold_id} exists already", hold_id=str(self.hold_id)
            )
        account = aggregates.get(Account, self.account_id)
        if self.destination is not None:
            destination = aggregates.get(Account, self.destination)
            if destination.id == account.id:
                raise SameAccount(
                    f"cannot hold funds of account {account.id} for itself",
                    account_id=str(account.id),
                )
            destination.check_open()
            if destination.currency != account.currency:
                raise CurrencyMismatch(
                    f"account {account.id} holds {account.currency} but account "
                    f"{destination.id} holds {destination.currency}; transfers must stay in "
                    "one currency",
                    source_currency=account.currency,
                    destination_currency=destination.currency,
                )
        expires_at = decision_time(account) + timedelta(seconds=self.timeout)
        account.place_hold(self.hold_id, self.amount, expires_at)
        aggregates.add(
            Hold._create(
                Hold.Placed,
                id=Hold.id_for(self.hold_id),
                hold_id=self.hold_id,
                account_id=account.id,
                destination=self.destination,
                amount=self.amount,
                currency=account.currency,
                expires_at=expires_at,
            )
        )
        return {"account_id": account.id, "hold_id": self.hold_id}


class CaptureHold(Command):
    """Post all or ``amount`` of a hold (the rest is released) as a debit or a transfer."""

    name = "capture"

    hold_id: Uuid
    amount: OptionalAmount = None
    transfer_id: Uuid = generated(factory=new_uuid, kw_only=True)

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        hold = aggregates.get(Hold, self.hold_id)
        check_open_to_resolve(aggregates, hold)
        amount = hold.amount if self.amount is None else self.amount
        source = holding_account(aggregates, hold)
        if source is None:
            raise lapsed_meanwhile(hold)
        hold.check_capture(amount)  # the request's own values first, then what they meet
        destination = None
        if hold.destination is not None:
            destination = aggregates.get(Account, hold.destination)
            destination.check_credit(amount)
        # Every rule is checked before the first event: a refusal changes nothing. The
        # debit is within ``available`` once the hold is released (a debit that spent the
        # hold's funds while it looked lapsed released it: ``holding_account``).
        source.check_debit(amount, releasing=self.hold_id)
        transfer_id = self.transfer_id if destination is not None else None
        hold.capture(amount, transfer_id)
        source.release_hold(self.hold_id, CAPTURED)
        if destination is None:
            source.withdraw(amount)
            return {"account_id": source.id, "hold_id": self.hold_id}
        assert transfer_id is not None
        transfer(source, destination, amount, transfer_id)
        return {"account_id": source.id, "hold_id": self.hold_id, "transfer_id": transfer_id}


class VoidHold(Command):
    """Release a hold: its funds are available again, nothing is posted."""

    name = "void"

    hold_id: Uuid

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        hold = aggregates.get(Hold, self.hold_id)
        check_open_to_resolve(aggregates, hold)
        account = holding_account(aggregates, hold)
        if account is None:
            raise lapsed_meanwhile(hold)
        hold.void()
        account.release_hold(self.hold_id, VOIDED)
        return {"account_id": hold.account_id, "hold_id": self.hold_id}


class ExpireHold(Command):
    """Record that a hold's timeout passed (its funds were available from that instant)."""

    hold_id: Uuid

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        hold = aggregates.get(Hold, self.hold_id)
        hold.check_expire()
        account = holding_account(aggregates, hold)
        hold.expire()
        if account is not None:  # (None: released already, by a debit that relied on it)
            account.release_hold(self.hold_id, EXPIRED)
        return {"account_id": hold.account_id, "hold_id": self.hold_id}
