"""Model-based test: random commands against the ledger and a tiny reference model.

The model predicts the outcome of every command (a receipt with so many new events, or the
code of the refusal) and of every retry of an earlier request id (the original outcome again,
or ``idempotency_conflict`` when the payload differs). After every step the ledger's state must
equal the model's, and the invariants must hold: balances never below minus the overdraft
limit, money and stock conserved, ``0 <= reserved <= on_hand``, and the log head moving only
when something was accepted, by exactly the number of events the command triggers.

Time is the ledger's injected clock, moved by rules: holds and stock reservations (and their
expiry, exact at the instant of the timeout, recorded by a command that needs the units or
funds of lapsed ones, or on its own) and linked command lists (all or nothing) are part of the
model, and a request id is replayed only within its retention window and is new after it,
whether or not the purge has run meanwhile. Aggregates are snapshotted every few events, and
after every step a cold load (snapshot and tail) and the cached copy must equal a full replay.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import project_aggregate
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from daybook import Ledger, Settings, open_ledger
from daybook.domain import Receipt
from daybook.domain.accounts import Deposit, Transfer, Withdraw
from daybook.domain.commands import Command
from daybook.domain.errors import DomainError
from daybook.domain.inventory import Inventory
from daybook.domain.values import MAX_AMOUNT
from daybook.infrastructure.ledger.requests import GENERATED_RETENTION

CURRENCIES = ("EUR", "USD")
MAX_ACCOUNTS = 6

amounts = st.integers(min_value=1, max_value=400)
invalid_amounts = st.sampled_from([0, -7])
DELTAS = [d for d in range(-15, 16) if d]
#: Mostly the SKUs that get stock; "C" never receives any.
skus = st.sampled_from(["A", "A", "B", "C"])
#: The retention window of caller-chosen request ids, and how far time moves in one step.
WINDOW = 3 * 3600.0
STEPS = [1.0, 600.0, GENERATED_RETENTION, WINDOW - 1, WINDOW, 2 * WINDOW]


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values, and now and then an amount that every command refuses (0 or negative)."""
    return st.sampled_from(range(10)).flatmap(lambda i: invalid_amounts if i == 0 else valid)


@dataclass
class ModelAccount:
    currency: str
    limit: int
    balance: int = 0
    closed: bool = False


@dataclass
class ModelHold:
    account: UUID
    destination: UUID | None
    amount: int
    expires_at: int  # seconds on the model's clock
    status: str = "open"
    #: Its account no longer counts it: a debit needed its funds once it had lapsed.
    released: bool = False

    def expired(self, now: int) -> bool:
        return self.status == "expired" or (self.status == "open" and now >= self.expires_at)


@dataclass
class ModelStock:
    on_hand: int = 0
    #: Open reservations, lapsed ones included until their expiry is recorded.
    reservations: dict[str, int] = field(default_factory=dict)
    #: When those made with a timeout lapse (seconds on the model's clock).
    expires: dict[str, float] = field(default_factory=dict)
    resolved: set[str] = field(default_factory=set)
    received: int = 0
    adjusted: int = 0
    shipped: int = 0
    issued: list[str] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        """Every open reservation's units, lapsed ones included."""
        return sum(self.reservations.values())

    def lapsed(self, now: float) -> list[str]:
        """Open reservations whose timeout has passed: their units count no more."""
        return [r for r in self.reservations if r in self.expires and now >= self.expires[r]]

    def counted(self, now: float) -> dict[str, int]:
        """The reservations whose units count at ``now`` (what the SKU's view lists)."""
        lapsed = set(self.lapsed(now))
        return {r: q for r, q in self.reservations.items() if r not in lapsed}

    def held(self, now: float) -> int:
        return sum(self.counted(now).values())

    def resolve(self, reservation_id: str) -> int:
        """The reservation resolved (committed, released or expired): its units."""
        self.expires.pop(reservation_id, None)
        self.resolved.add(reservation_id)
        return self.reservations.pop(reservation_id)

    def lapses_needed(self, now: float, on_hand_after: int) -> list[str]:
        """The lapsed reservations whose expiry a command leaving ``on_hand_after`` units
        unreserved records (``Inventory._record_lapses``): all of them, if it needs any of
        their units."""
        return self.lapsed(now) if on_hand_after < self.reserved else []


@dataclass(frozen=True)
class Call:
    """One call of a Ledger command method, kept so that it can be repeated."""

    method: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def request_id(self) -> str | None:
        return dict(self.kwargs).get("request_id")

    def __call__(self, ledger: Ledger) -> Any:
        return getattr(ledger, self.method)(*self.args, **dict(self.kwargs))

    def with_request_id(self, request_id: str | None) -> Call:
        kwargs = {**dict(self.kwargs), "request_id": request_id}
        return replace(self, kwargs=tuple(kwargs.items()))


@dataclass(frozen=True)
class Recorded:
    """A request the ledger recorded, and what it answered the first time."""

    call: Call
    outcome: Receipt | UUID | tuple[str, str]  # receipt, new account id, or (code, message)
    #: When (the ledger's clock): the record is kept until ``at + WINDOW``.
    at: float


EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
#: Every this many events an account or SKU is snapshotted (see ``cold_loads_match_replays``).
SNAPSHOT_INTERVAL = 3


class Clock:
    """The ledger's clock: it moves only when the machine says so. ``now`` is seconds
    since ``EPOCH``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def instant(self) -> datetime:
        return EPOCH + timedelta(seconds=self.now)


#: A prediction: the number of events an accepted command adds, or the refusal's code.
Prediction = int | str


class LedgerMachine(RuleBasedStateMachine):
    store_url = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        settings = Settings.load(
            url=self.store_url,
            request_retention=timedelta(seconds=WINDOW),
            request_purge_interval=timedelta(0),  # the machine purges when it chooses
            # Small, so that aggregates cross snapshot boundaries within an example and the
            # cold loads below read a snapshot and its tail.
            snapshot_interval=SNAPSHOT_INTERVAL,
        )
        self.ledger = open_ledger(settings=settings, clock=self.clock.instant)
        self.holds: dict[UUID, ModelHold] = {}
        self.hold_order: list[UUID] = []
        # Several examples may share one store: keep this example's names apart.
        self.prefix = uuid4().hex[:8]
        self.head = self.ledger.head()
        self.accounts: dict[UUID, ModelAccount] = {}
        self.stock: dict[str, ModelStock] = {}
        self.deposited = dict.fromkeys(CURRENCIES, 0)
        self.withdrawn = dict.fromkeys(CURRENCIES, 0)
        self.history: list[Recorded] = []
        self.requests = 0

    def teardown(self) -> None:
        self.ledger.close()

    # -- helpers ----------------------------------------------------------------------------

    def sku(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def request_id(self, data: st.DataObject) -> str | None:
        if data.draw(st.booleans(), label="with request id"):
            self.requests += 1
            return f"{self.prefix}-req-{self.requests}"
        return None

    def pick_account(self, data: st.DataObject) -> UUID:
        known = list(self.accounts)  # creation order: draws must not depend on random ids
        if known and data.draw(st.sampled_from(range(10)), label="known account") > 0:
            return data.draw(st.sampled_from(known), label="account")
        return UUID(int=data.draw(st.integers(1, 3), label="unknown account"))

    def pick_amount(self, data: st.DataObject, *special: int) -> int:
        choices = [amounts, *(st.just(max(value, 1)) for value in special)]
        return data.draw(mostly(st.one_of(*choices)), label="amount")

    def events_between(self, after: int, upto: int) -> int:
        """How many events the log holds after position ``after`` up to ``upto``. Not
        ``upto - after``: on PostgreSQL a batch the store refuses (a reservation id used
        before, found by the claim's unique key) has drawn positions it never uses."""
        recorder = self.ledger.service.recorder
        found = recorder.select_notifications(after + 1, limit=upto - after + 1, stop=upto)
        return len(found)

    def perform(self, call: Call, predicted: Prediction, *, recorded: bool = True) -> Any:
        """Run ``call``; check the outcome and the head against the prediction.

        ``recorded`` is False for requests refused by a value check: those never reach the
        store, so their request id stays free.
        """
        try:
            result = call(self.ledger)
        except DomainError as error:
            assert isinstance(predicted, str), f"{call} was refused ({error!r}), model: accept"
            assert error.code == predicted, f"{call}: {error.code} ({error}), model: {predicted}"
            assert self.ledger.head() == self.head, f"{call} was refused but the head moved"
            if call.request_id is not None and recorded:
                self.history.append(Recorded(call, (error.code, str(error)), self.clock()))
            return None
        assert isinstance(predicted, int), f"{call} was accepted, model: {predicted}"
        before, self.head = self.head, self.ledger.head()
        added = self.events_between(before, self.head)
        assert added == predicted, f"{call} appended {added} events, model: {predicted}"
        if isinstance(result, Receipt):
            assert result.replayed is False
            assert result.command == call.method
            assert result.position == self.head, f"{call}: {result.position} != {self.head}"
            if call.request_id is not None:
                assert result.request_id == call.request_id
        if call.request_id is not None:
            self.history.append(Recorded(call, result, self.clock()))
        return result

    @initialize()
    def open_some_accounts_and_stock(self) -> None:
        """Start from a few funded accounts and one stocked SKU, so that most random
        commands meet a business rule rather than a missing account."""
        for number, (currency, limit, funds) in enumerate(
            [("EUR", 0, 500), ("EUR", 100, 0), ("USD", 0, 300)]
        ):
            call = Call(
                "open_account",
                (f"start-{number}", currency, limit),
                (("request_id", f"{self.prefix}-start-{number}"),),
            )
            account_id = self.perform(call, 1).account_id
            self.accounts[account_id] = ModelAccount(currency, limit)
            if funds:
                self.perform(Call("deposit", (account_id, funds)), 1)
                self.accounts[account_id].balance = funds
                self.deposited[currency] += funds
        self.perform(Call("receive_stock", (self.sku("A"), 10)), 2)
        self.stock["A"] = ModelStock(on_hand=10, received=10)
        # A reservation id used again after it resolved is refused by the store (the
        # inventory no longer holds it): on PostgreSQL the refused batch leaves a gap in
        # positions, which the head and receipts after it must take in their stride.
        reservation_id = f"{self.prefix}-res-0"
        reserve = Call("reserve_stock", (self.sku("A"), 1), (("reservation_id", reservation_id),))
        self.perform(reserve, 2)
        self.perform(Call("release_reservation", (self.sku("A"), reservation_id)), 1)
        self.perform(reserve, "reservation_exists")
        self.stock["A"].resolved.add(reservation_id)
        self.stock["A"].issued.append(reservation_id)
        # And one that lapses once time moves on: commands then meet its expiry (recording
        # it when they need its units), not only those that happen to make one.
        timed_id = f"{self.prefix}-res-timed"
        timed = Call(
            "reserve_stock", (self.sku("A"), 6), (("timeout", 5), ("reservation_id", timed_id))
        )
        self.perform(timed, 2)
        self.stock["A"].reservations[timed_id] = 6
        self.stock["A"].expires[timed_id] = self.clock.now + 5
        self.stock["A"].issued.append(timed_id)

    # -- accounts ---------------------------------------------------------------------------

    @rule(data=st.data())
    def open_account(self, data: st.DataObject) -> None:
        if len(self.accounts) >= MAX_ACCOUNTS:
            return
        currency = data.draw(st.sampled_from(CURRENCIES), label="currency")
        limit = data.draw(st.sampled_from([0, 0, 100]), label="overdraft limit")
        call = Call(
            "open_account",
            (f"owner-{len(self.accounts)}", currency, limit),
            (("request_id", self.request_id(data)),),
        )
        receipt = self.perform(call, 1)
        assert isinstance(receipt, Receipt) and receipt.command == "open_account"
        account_id = receipt.account_id
        assert isinstance(account_id, UUID) and account_id not in self.accounts
        self.accounts[account_id] = ModelAccount(currency, limit)

    def predict_credit(self, account_id: UUID, amount: int) -> Prediction:
        if amount <= 0:
            return "invalid_amount"
        account = self.accounts.get(account_id)
        if account is None:
            return "account_not_found"
        if account.closed:
            return "account_closed"
        return 1

    def held(self, account_id: UUID) -> int:
        return sum(
            h.amount
            for h in self.holds.values()
            if h.account == account_id and h.status == "open" and not h.expired(self.clock.now)
        )

    def available(self, account_id: UUID) -> int:
        account = self.accounts[account_id]
        return account.balance + account.limit - self.held(account_id)

    def lapses_needed(
        self, account_id: UUID, amount: int, balance: int, *, but: UUID | None = None
    ) -> list[ModelHold]:
        """The lapsed holds whose release a debit of ``amount`` records (``record_lapses``):
        all those the account still counts, if it needs any of their funds."""
        counted = [
            h
            for hold_id, h in self.holds.items()
            if h.account == account_id and h.status == "open" and not h.released and hold_id != but
        ]
        limit = self.accounts[account_id].limit
        if amount <= balance + limit - sum(h.amount for h in counted):
            return []
        return [h for h in counted if self.clock.now >= h.expires_at]

    def predict_debit(self, account_id: UUID, amount: int) -> Prediction:
        predicted = self.predict_credit(account_id, amount)
        if predicted == 1 and amount > self.available(account_id):
            return "insufficient_funds"
        return predicted

    @rule(data=st.data())
    def deposit(self, data: st.DataObject) -> None:
        account_id = self.pick_account(data)
        amount = self.pick_amount(data)
        call = Call("deposit", (account_id, amount), (("request_id", self.request_id(data)),))
        predicted = self.predict_credit(account_id, amount)
        if self.perform(call, predicted, recorded=amount > 0):
            self.accounts[account_id].balance += amount
            self.deposited[self.accounts[account_id].currency] += amount

    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        account_id = self.pick_account(data)
        account = self.accounts.get(account_id)
        special = (account.balance, self.available(account_id)) if account else (1, 1)
        amount = self.pick_amount(data, *special)
        call = Call("withdraw", (account_id, amount), (("request_id", self.request_id(data)),))
        predicted = self.predict_debit(account_id, amount)
        lapsed = []
        if predicted == 1:
            lapsed = self.lapses_needed(account_id, amount, self.accounts[account_id].balance)
            predicted += len(lapsed)
        if self.perform(call, predicted, recorded=amount > 0):
            self.accounts[account_id].balance -= amount
            self.withdrawn[self.accounts[account_id].currency] += amount
            for hold in lapsed:
                hold.released = True

    @rule(data=st.data())
    def transfer(self, data: st.DataObject) -> None:
        source = self.pick_account(data)
        model = self.accounts.get(source)
        partners = [
            other
            for other, account in self.accounts.items()
            if model and other != source and account.currency == model.currency
        ]
        if partners and data.draw(st.booleans(), label="same currency"):
            destination = data.draw(st.sampled_from(partners), label="destination")
        else:
            destination = self.pick_account(data)
        account = self.accounts.get(source)
        room = self.available(source) if account else 0
        amount = self.pick_amount(data, room, room + 1)
        call = Call(
            "transfer", (source, destination, amount), (("request_id", self.request_id(data)),)
        )
        predicted: Prediction
        if amount <= 0:
            predicted = "invalid_amount"
        elif source not in self.accounts or destination not in self.accounts:
            predicted = "account_not_found"
        elif source == destination:
            predicted = "same_account"
        elif self.accounts[source].closed or self.accounts[destination].closed:
            predicted = "account_closed"
        elif self.accounts[source].currency != self.accounts[destination].currency:
            predicted = "currency_mismatch"
        else:
            predicted = self.predict_debit(source, amount)
        lapsed = []
        if predicted == 1:
            lapsed = self.lapses_needed(source, amount, self.accounts[source].balance)
            predicted = 2 + len(lapsed)
        if self.perform(call, predicted, recorded=amount > 0):
            self.accounts[source].balance -= amount
            self.accounts[destination].balance += amount
            for hold in lapsed:
                hold.released = True

    @rule(data=st.data())
    def close_account(self, data: st.DataObject) -> None:
        account_id = self.pick_account(data)
        call = Call("close_account", (account_id,), (("request_id", self.request_id(data)),))
        account = self.accounts.get(account_id)
        predicted: Prediction
        if account is None:
            predicted = "account_not_found"
        elif account.closed:
            predicted = "account_closed"
        elif account.balance != 0 or self.held(account_id):
            predicted = "account_not_empty"
        else:  # with the release of every hold it still counts: lapsed, all of them
            predicted = 1 + len(self.lapses_needed(account_id, MAX_AMOUNT, 0))
        if self.perform(call, predicted):
            self.accounts[account_id].closed = True
            for hold in self.lapses_needed(account_id, MAX_AMOUNT, 0):
                hold.released = True

    # -- stock ------------------------------------------------------------------------------

    @rule(data=st.data())
    def receive_stock(self, data: st.DataObject) -> None:
        name = data.draw(skus.filter(lambda n: n != "C"), label="sku")
        quantity = data.draw(mostly(st.integers(1, 20)), label="quantity")
        call = Call(
            "receive_stock", (self.sku(name), quantity), (("request_id", self.request_id(data)),)
        )
        predicted: Prediction = (
            "invalid_amount" if quantity <= 0 else 1 if name in self.stock else 2
        )
        if self.perform(call, predicted, recorded=quantity > 0):
            stock = self.stock.setdefault(name, ModelStock())
            stock.on_hand += quantity
            stock.received += quantity

    @rule(data=st.data())
    def adjust_stock(self, data: st.DataObject) -> None:
        name = data.draw(skus, label="sku")
        stock = self.stock.get(name)
        # Sometimes down to what is reserved: with lapsed reservations, below them.
        down = stock.held(self.clock.now) - stock.on_hand if stock else 0
        delta = data.draw(
            mostly(st.one_of(st.sampled_from(DELTAS), st.just(down or -1))), label="delta"
        )
        call = Call(
            "adjust_stock",
            (self.sku(name), delta, "stock count"),
            (("request_id", self.request_id(data)),),
        )
        lapsed: list[str] = []
        predicted: Prediction
        if delta == 0:
            predicted = "invalid_amount"
        elif stock is None:
            predicted = "sku_not_found"
        elif stock.on_hand + delta < stock.held(self.clock.now):
            predicted = "stock_below_reserved"
        else:
            lapsed = stock.lapses_needed(self.clock.now, stock.on_hand + delta)
            predicted = 1 + len(lapsed)
        if self.perform(call, predicted, recorded=delta != 0):
            assert stock is not None
            for reservation_id in lapsed:
                stock.resolve(reservation_id)
            stock.on_hand += delta
            stock.adjusted += delta

    def pick_reservation(self, data: st.DataObject, name: str) -> str:
        stock = self.stock.get(name)
        known = stock.issued if stock else []  # issue order, not the random ids' order
        held = [r for r in known if stock and r in stock.reservations]
        if held and data.draw(st.booleans(), label="open reservation"):
            return data.draw(st.sampled_from(held), label="reservation")
        if known and data.draw(st.sampled_from(range(5)), label="known reservation") > 0:
            return data.draw(st.sampled_from(known), label="reservation")
        return "no-such-reservation"

    @rule(data=st.data())
    def reserve_stock(self, data: st.DataObject) -> None:
        name = data.draw(skus, label="sku")
        stock = self.stock.get(name)
        # Often all that is available: with lapsed reservations, that needs their units.
        rest = stock.on_hand - stock.held(self.clock.now) if stock else 0
        quantity = data.draw(
            mostly(st.one_of(st.integers(1, 12), st.just(max(rest, 1)))), label="quantity"
        )
        choose = data.draw(st.sampled_from(["ledger", "new", "reuse"]), label="reservation id")
        reservation_id: str | None = None
        if choose == "new":
            self.requests += 1
            reservation_id = f"{self.prefix}-res-{self.requests}"
        elif choose == "reuse":
            reservation_id = self.pick_reservation(data, name)
        timeout = data.draw(st.sampled_from([5, None, 10, 0]), label="timeout")
        call = Call(
            "reserve_stock",
            (self.sku(name), quantity),
            (
                ("timeout", timeout),
                ("reservation_id", reservation_id),
                ("request_id", self.request_id(data)),
            ),
        )
        lapsed: list[str] = []
        predicted: Prediction
        if quantity <= 0:
            predicted = "invalid_amount"
        elif timeout == 0:
            predicted = "invalid_timeout"
        elif stock is None:
            predicted = "sku_not_found"
        elif reservation_id in stock.reservations or reservation_id in stock.resolved:
            predicted = "reservation_exists"
        elif quantity > stock.on_hand - stock.held(self.clock.now):
            predicted = "out_of_stock"
        else:
            # the reservation and the claim on its id, after the expiries it relies on
            lapsed = stock.lapses_needed(self.clock.now, stock.on_hand - quantity)
            predicted = 2 + len(lapsed)
        receipt = self.perform(call, predicted, recorded=quantity > 0 and timeout != 0)
        if receipt:
            assert stock is not None
            for lapsed_id in lapsed:
                stock.resolve(lapsed_id)
            if timeout is not None:
                stock.expires[receipt.reservation_id] = self.clock.now + timeout
            assert receipt.sku == self.sku(name)
            if reservation_id is not None:
                assert receipt.reservation_id == reservation_id
            assert receipt.reservation_id not in stock.reservations
            stock.reservations[receipt.reservation_id] = quantity
            stock.issued.append(receipt.reservation_id)

    def predict_resolution(self, name: str, reservation_id: str) -> Prediction:
        stock = self.stock.get(name)
        if stock is None:
            return "sku_not_found"
        if reservation_id in stock.resolved:
            return "reservation_resolved"
        if reservation_id not in stock.reservations:
            return "reservation_not_found"
        if reservation_id in stock.lapsed(self.clock.now):
            return "reservation_expired"
        return 1

    @rule(data=st.data())
    def commit_reservation(self, data: st.DataObject) -> None:
        name = data.draw(skus, label="sku")
        reservation_id = self.pick_reservation(data, name)
        stock = self.stock.get(name)
        held = stock.reservations.get(reservation_id, 0) if stock else 0
        # all of it, part of it, or one more than it holds
        options = [st.none(), st.integers(1, 6), st.just(max(held - 1, 1)), st.just(held + 1)]
        quantity = data.draw(mostly(st.one_of(*options)), label="quantity")
        call = Call(
            "commit_reservation",
            (self.sku(name), reservation_id, quantity),
            (("request_id", self.request_id(data)),),
        )
        predicted = self.predict_resolution(name, reservation_id)
        if predicted == 1:
            predicted = 2  # the SKU's commit, and the record that it shipped
        valid = quantity is None or quantity > 0
        if not valid:
            predicted = "invalid_amount"
        elif predicted == 2 and quantity is not None and quantity > held:
            predicted = "invalid_amount"  # more than it holds: a business rule, recorded
        if self.perform(call, predicted, recorded=valid):
            stock = self.stock[name]
            held = stock.resolve(reservation_id)
            shipped = held if quantity is None else quantity
            stock.on_hand -= shipped
            stock.shipped += shipped

    @rule(data=st.data())
    def release_reservation(self, data: st.DataObject) -> None:
        name = data.draw(skus, label="sku")
        reservation_id = self.pick_reservation(data, name)
        call = Call(
            "release_reservation",
            (self.sku(name), reservation_id),
            (("request_id", self.request_id(data)),),
        )
        if self.perform(call, self.predict_resolution(name, reservation_id)):
            self.stock[name].resolve(reservation_id)

    @rule(data=st.data())
    def expire_reservation(self, data: st.DataObject) -> None:
        name = data.draw(skus, label="sku")
        reservation_id = self.pick_reservation(data, name)
        call = Call(
            "expire_reservation",
            (self.sku(name), reservation_id),
            (("request_id", self.request_id(data)),),
        )
        predicted = self.predict_resolution(name, reservation_id)
        if predicted == 1:
            predicted = "reservation_not_expired"
        elif predicted == "reservation_expired":
            predicted = 1
        if self.perform(call, predicted):
            self.stock[name].resolve(reservation_id)

    # -- time, holds, linked lists -----------------------------------------------------------

    @rule(seconds=st.sampled_from([5, 5, 1]))
    def advance_time(self, seconds: int) -> None:
        self.clock.now += seconds

    def pick_hold(self, data: st.DataObject) -> UUID:
        if self.hold_order and data.draw(st.sampled_from(range(6)), label="known hold") > 0:
            return data.draw(st.sampled_from(self.hold_order), label="hold")
        return UUID(int=data.draw(st.integers(1, 3), label="unknown hold"))

    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        account_id = self.pick_account(data)
        account = self.accounts.get(account_id)
        amount = self.pick_amount(data, self.available(account_id) if account else 1)
        timeout = data.draw(st.sampled_from([5, 5, 10, 0]), label="timeout")
        destination = None
        if data.draw(st.booleans(), label="with destination"):
            destination = self.pick_account(data)
        call = Call(
            "hold",
            (account_id, amount),
            (
                ("destination", destination),
                ("timeout", timeout),
                ("request_id", self.request_id(data)),
            ),
        )
        target = self.accounts.get(destination) if destination is not None else None
        predicted: Prediction
        if amount <= 0:
            predicted = "invalid_amount"
        elif timeout == 0:
            predicted = "invalid_timeout"
        elif account is None or (destination is not None and target is None):
            predicted = "account_not_found"
        elif destination == account_id:
            predicted = "same_account"
        elif target is not None and target.closed:
            predicted = "account_closed"
        elif target is not None and target.currency != account.currency:
            predicted = "currency_mismatch"
        else:
            predicted = self.predict_debit(account_id, amount)
        lapsed = []
        if predicted == 1:
            assert account is not None
            lapsed = self.lapses_needed(account_id, amount, account.balance)
            predicted = 2 + len(lapsed)
        receipt = self.perform(call, predicted, recorded=amount > 0 and timeout > 0)
        if receipt:
            for hold in lapsed:
                hold.released = True
            assert receipt.hold_id not in self.holds
            self.holds[receipt.hold_id] = ModelHold(
                account_id, destination, amount, self.clock.now + timeout
            )
            self.hold_order.append(receipt.hold_id)

    def predict_open_hold(self, hold_id: UUID) -> Prediction:
        hold = self.holds.get(hold_id)
        if hold is None:
            return "hold_not_found"
        if hold.expired(self.clock.now):
            return "hold_expired"
        if hold.status != "open":
            return "hold_resolved"
        return 1

    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        hold_id = self.pick_hold(data)
        hold = self.holds.get(hold_id)
        held = hold.amount if hold else 1
        quantity = data.draw(
            st.one_of(st.none(), st.just(held), st.just(held + 1), st.integers(1, held)),
            label="amount",
        )
        call = Call("capture", (hold_id, quantity), (("request_id", self.request_id(data)),))
        predicted = self.predict_open_hold(hold_id)
        lapsed: list[ModelHold] = []
        amount = held if quantity is None else quantity
        if predicted == 1:
            assert hold is not None
            target = self.accounts[hold.destination] if hold.destination else None
            if target is not None and target.closed:
                predicted = "account_closed"
            elif amount > hold.amount:
                predicted = "invalid_amount"
            else:
                balance = self.accounts[hold.account].balance
                lapsed = self.lapses_needed(hold.account, amount, balance, but=hold_id)
                predicted = (3 if target is None else 4) + len(lapsed)
        if self.perform(call, predicted):
            assert hold is not None
            for other in lapsed:
                other.released = True
            hold.status = "captured"
            self.accounts[hold.account].balance -= amount
            if hold.destination is None:
                self.withdrawn[self.accounts[hold.account].currency] += amount
            else:
                self.accounts[hold.destination].balance += amount

    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        hold_id = self.pick_hold(data)
        call = Call("void", (hold_id,), (("request_id", self.request_id(data)),))
        predicted = self.predict_open_hold(hold_id)
        if self.perform(call, 2 if predicted == 1 else predicted):
            self.holds[hold_id].status = "voided"

    @rule(data=st.data())
    def expire_hold(self, data: st.DataObject) -> None:
        hold_id = self.pick_hold(data)
        hold = self.holds.get(hold_id)
        call = Call("expire_hold", (hold_id,), (("request_id", self.request_id(data)),))
        predicted: Prediction
        if hold is None:
            predicted = "hold_not_found"
        elif hold.status != "open":
            predicted = "hold_resolved"
        elif not hold.expired(self.clock.now):
            predicted = "hold_not_expired"
        else:  # the hold's expiry, and its account's release unless a debit recorded it
            predicted = 1 if hold.released else 2
        if self.perform(call, predicted):
            self.holds[hold_id].status = "expired"

    @rule(data=st.data())
    def atomic(self, data: st.DataObject) -> None:
        """A list of deposits, withdrawals and transfers: all applied, or none."""
        if not self.accounts:
            return
        known = list(self.accounts)
        balances = {a: m.balance for a, m in self.accounts.items()}
        commands: list[Command] = []
        predicted: Prediction = 0
        failed = None
        releasing: list[ModelHold] = []
        for _ in range(data.draw(st.integers(1, 3), label="legs")):
            kind = data.draw(st.sampled_from(["deposit", "withdraw", "transfer"]), label="leg")
            account_id = data.draw(st.sampled_from(known), label="account")
            amount = data.draw(st.integers(1, 400), label="amount")
            account = self.accounts[account_id]
            room = balances[account_id] + account.limit - self.held(account_id)
            lapsed: list[ModelHold] = []
            code: str | None = "account_closed" if account.closed else None
            if kind == "deposit":
                commands.append(Deposit(account_id, amount))
                effects = [(account_id, amount)]
            elif kind == "withdraw":
                commands.append(Withdraw(account_id, amount))
                code = code or ("insufficient_funds" if amount > room else None)
                effects = [(account_id, -amount)]
                lapsed = self.lapses_needed(account_id, amount, balances[account_id])
            else:
                other = data.draw(st.sampled_from(known), label="destination")
                commands.append(Transfer(account_id, other, amount))
                partner = self.accounts[other]
                if other == account_id:
                    code = "same_account"
                elif code is None and partner.closed:
                    code = "account_closed"
                elif code is None and partner.currency != account.currency:
                    code = "currency_mismatch"
                elif code is None and amount > room:
                    code = "insufficient_funds"
                effects = [(account_id, -amount), (other, amount)]
                lapsed = self.lapses_needed(account_id, amount, balances[account_id])
            if failed is None and code is not None:
                failed = (len(commands) - 1, code)
            if failed is None:
                predicted = int(predicted) + len(effects) + len(lapsed)
                for target, change in effects:
                    balances[target] += change
                for hold in lapsed:  # (undone below if the list fails)
                    hold.released = True
                releasing.extend(lapsed)
        if failed is not None:
            predicted = failed[1]
            for hold in releasing:
                hold.released = False
        call = Call("atomic", (tuple(commands),), (("request_id", self.request_id(data)),))
        receipt = self.perform(call, predicted)
        if receipt:
            assert len(receipt.linked) == len(commands)
            for command in commands:
                if isinstance(command, Withdraw):
                    self.withdrawn[self.accounts[command.account_id].currency] += command.amount
                elif isinstance(command, Deposit):
                    self.deposited[self.accounts[command.account_id].currency] += command.amount
            for account_id, balance in balances.items():
                self.accounts[account_id].balance = balance

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        """Deposits, withdrawals and transfers in one ``submit``: each answered as if sent
        alone, in order (a refusal stops none of the others; an accepted one is seen by
        those after it), each with its own request id, which a later single call with that
        id replays."""
        if not self.accounts:
            return
        known = list(self.accounts)
        commands: list[Command] = []
        calls: list[Call] = []
        predictions: list[Prediction] = []
        for _ in range(data.draw(st.integers(1, 4), label="commands")):
            kind = data.draw(st.sampled_from(["deposit", "withdraw", "transfer"]), label="kind")
            account_id = data.draw(st.sampled_from(known), label="account")
            account = self.accounts[account_id]
            room = self.available(account_id)
            amount = data.draw(st.sampled_from([1, 50, 400, room, room + 1]), label="amount")
            amount = max(amount, 1)
            request_id = self.request_id(data)
            lapsed: list[ModelHold] = []
            predicted: Prediction
            if kind == "deposit":
                args: tuple[Any, ...] = (account_id, amount)
                commands.append(Deposit(account_id, amount, request_id=request_id))
                predicted = self.predict_credit(account_id, amount)
                effects = [(account_id, amount)]
            elif kind == "withdraw":
                args = (account_id, amount)
                commands.append(Withdraw(account_id, amount, request_id=request_id))
                predicted = self.predict_debit(account_id, amount)
                effects = [(account_id, -amount)]
            else:
                other = data.draw(st.sampled_from(known), label="destination")
                args = (account_id, other, amount)
                commands.append(Transfer(account_id, other, amount, request_id=request_id))
                partner = self.accounts[other]
                if other == account_id:
                    predicted = "same_account"
                elif account.closed or partner.closed:
                    predicted = "account_closed"
                elif partner.currency != account.currency:
                    predicted = "currency_mismatch"
                else:
                    predicted = self.predict_debit(account_id, amount)
                effects = [(account_id, -amount), (other, amount)]
            if predicted == 1 and kind != "deposit":
                lapsed = self.lapses_needed(account_id, amount, account.balance)
            if isinstance(predicted, int):  # applied now: the commands after it see it
                predicted = len(effects) + len(lapsed)
                for target, change in effects:
                    self.accounts[target].balance += change
                if kind == "deposit":
                    self.deposited[account.currency] += amount
                elif kind == "withdraw":
                    self.withdrawn[account.currency] += amount
                for hold in lapsed:
                    hold.released = True
            calls.append(Call(kind, args, (("request_id", request_id),)))
            predictions.append(predicted)
        outcomes = self.ledger.submit(commands)
        before, self.head = self.head, self.ledger.head()
        added = self.events_between(before, self.head)
        expected = sum(p for p in predictions if isinstance(p, int))
        assert added == expected, f"{calls} appended {added} events, model: {expected}"
        positions = []
        for call, predicted, outcome in zip(calls, predictions, outcomes, strict=True):
            if isinstance(predicted, str):
                assert isinstance(outcome, DomainError), f"{call}: {outcome!r}, model: refuse"
                assert outcome.code == predicted, f"{call}: {outcome.code}, model: {predicted}"
                recorded: Receipt | tuple[str, str] = (outcome.code, str(outcome))
            else:
                assert isinstance(outcome, Receipt), f"{call}: {outcome!r}, model: accept"
                assert outcome.replayed is False and outcome.command == call.method
                positions.append(outcome.position)
                recorded = outcome
            if call.request_id is not None:
                assert getattr(outcome, "request_id", call.request_id) == call.request_id
                self.history.append(Recorded(call, recorded, self.clock()))
        assert positions == sorted(positions) and (not positions or positions[-1] == self.head)

    # -- time and retention -----------------------------------------------------------------

    def kept(self) -> list[Recorded]:
        """The recorded requests still within their retention window."""
        now = self.clock()
        return [r for r in self.history if r.at + WINDOW > now]

    def expired(self) -> list[Recorded]:
        now = self.clock()
        latest = {r.call.request_id: r for r in self.history}  # an id may be used again
        return [r for r in latest.values() if r.at + WINDOW <= now]

    @rule(step=st.sampled_from(STEPS))
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @rule(data=st.data())
    def time_reaches_the_end_of_a_window(self, data: st.DataObject) -> None:
        """Time moves to the very instant a recorded request's window ends: the boundary an
        off-by-one gets wrong, which the fixed steps above reach only by chance."""
        kept = self.kept()
        if not kept:
            return
        earlier = data.draw(st.sampled_from(kept), label="request whose window ends")
        self.clock.now = earlier.at + WINDOW

    @rule()
    def purge_expired_requests(self) -> None:
        self.ledger.request_purge.purge()
        assert self.ledger.head() == self.head

    @rule(data=st.data())
    def reuse_an_expired_request_id(self, data: st.DataObject) -> None:
        """After its window a request id is new: a different request with it is judged
        afresh, not refused as a conflict nor answered with the old outcome."""
        expired = self.expired()
        if not expired:
            return
        earlier = data.draw(st.sampled_from(expired), label="expired request")
        account_id = self.pick_account(data)
        amount = data.draw(amounts, label="amount")
        call = Call("deposit", (account_id, amount), (("request_id", earlier.call.request_id),))
        if self.perform(call, self.predict_credit(account_id, amount)):
            self.accounts[account_id].balance += amount
            self.deposited[self.accounts[account_id].currency] += amount

    # -- retries ----------------------------------------------------------------------------

    @rule(data=st.data())
    def retry_same_request(self, data: st.DataObject) -> None:
        kept = self.kept()
        if not kept:
            return
        earlier = data.draw(st.sampled_from(kept), label="earlier request")
        try:
            result = earlier.call(self.ledger)
        except DomainError as error:
            assert isinstance(earlier.outcome, tuple), f"retry of {earlier.call}: {error!r}"
            assert (error.code, str(error)) == earlier.outcome
        else:
            if isinstance(earlier.outcome, Receipt):
                assert result == replace(earlier.outcome, replayed=True)
            else:
                assert result == earlier.outcome, f"retry of {earlier.call} gave {result!r}"
        assert self.ledger.head() == self.head

    @rule(data=st.data())
    def retry_with_another_payload(self, data: st.DataObject) -> None:
        kept = self.kept()
        if not kept:
            return
        earlier = data.draw(st.sampled_from(kept), label="earlier request")
        call = changed(earlier.call)
        with pytest.raises(DomainError) as caught:
            call(self.ledger)
        assert caught.value.code == "idempotency_conflict", f"{call}: {caught.value!r}"
        assert self.ledger.head() == self.head

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def accounts_match_the_model(self) -> None:
        balances = dict.fromkeys(CURRENCIES, 0)
        for account_id, model in self.accounts.items():
            view = self.ledger.account(account_id)
            assert view.balance == model.balance, (account_id, view, model)
            assert view.balance >= -view.overdraft_limit
            assert view.held == self.held(account_id)
            assert view.available == view.balance + view.overdraft_limit - view.held >= 0
            assert view.overdraft_limit == model.limit
            assert view.status == ("closed" if model.closed else "open")
            balances[view.currency] += view.balance
        for currency in CURRENCIES:
            assert balances[currency] == self.deposited[currency] - self.withdrawn[currency]

    @invariant()
    def stock_matches_the_model(self) -> None:
        for name, model in self.stock.items():
            view = self.ledger.inventory(self.sku(name))
            assert 0 <= view.reserved <= view.on_hand
            assert view.available == view.on_hand - view.reserved >= 0
            assert view.on_hand == model.received + model.adjusted - model.shipped
            counted = model.counted(self.clock.now)
            assert (view.on_hand, view.reserved) == (model.on_hand, sum(counted.values()))
            assert view.reservations == counted

    @invariant()
    def cold_loads_match_replays(self) -> None:
        """What a cache miss loads (the latest snapshot and its tail), what the cache holds
        (caught up: the committer answers a caller before it stores the batch's copies) and
        a replay of every event are one and the same aggregate. Nothing here changes the
        cache: commands go on working on a long-lived cached copy, as a server's do."""
        service = self.ledger.service
        repository = service.repository
        ids = [*self.accounts, *(Inventory.id_for(self.sku(name)) for name in self.stock)]
        for aggregate_id in ids:
            replayed = project_aggregate(None, service.events.get(aggregate_id))
            assert replayed is not None
            # With a version, eventsourcing's repository reads the store, never the cache.
            cold = repository.get(aggregate_id, version=replayed.version)
            assert _state(cold) == _state(replayed), aggregate_id
            if repository.cache is None:
                continue
            with contextlib.suppress(KeyError):
                cached = copy.deepcopy(repository.cache.get(aggregate_id))
                caught_up = project_aggregate(
                    cached, service.events.get(aggregate_id, gt=cached.version)
                )
                assert _state(caught_up) == _state(replayed), aggregate_id

    @invariant()
    def head_moves_only_with_accepted_commands(self) -> None:
        assert self.ledger.head() == self.head


def _state(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k not in ("_pending_events", "as_of")}


def changed(call: Call) -> Call:
    """The same request id with a different payload, or for a different command."""
    args = call.args
    if call.method in ("deposit", "withdraw", "receive_stock"):
        return replace(call, args=(args[0], args[1] + 1))
    if call.method == "transfer":
        return replace(call, args=(args[0], args[1], args[2] + 1))
    if call.method == "open_account":
        return replace(call, args=(args[0] + "-x", *args[1:]))
    if call.method == "close_account":
        return replace(call, method="deposit", args=(args[0], 1))
    if call.method == "adjust_stock":
        return replace(call, args=(args[0], args[1], args[2] + "!"))
    if call.method == "reserve_stock":
        return replace(call, args=(args[0], args[1] + 1))
    if call.method == "commit_reservation":
        return replace(call, args=(args[0], args[1], 1 if args[2] is None else args[2] + 1))
    if call.method == "hold":
        return replace(call, args=(args[0], args[1] + 1))
    if call.method == "capture":
        return replace(call, args=(args[0], 1 if args[1] is None else args[1] + 1))
    if call.method in ("void", "expire_hold"):
        return replace(call, method="capture", args=(args[0], None))
    if call.method == "atomic":
        (commands,) = args
        return replace(call, args=((*commands, commands[0]),))
    if call.method == "expire_reservation":
        return replace(call, method="release_reservation")
    assert call.method == "release_reservation"
    return replace(call, method="commit_reservation")


EXAMPLES = {"memory": 60, "sqlite": 20, "postgres": 15}


def test_the_ledger_behaves_like_the_model(store_url: str) -> None:
    backend = store_url.split(":", 1)[0].replace("postgresql", "postgres")

    class Machine(LedgerMachine):
        pass

    Machine.store_url = store_url
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=EXAMPLES[backend],
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
