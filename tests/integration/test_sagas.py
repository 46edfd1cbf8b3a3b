"""The order saga driven by the saga processor, against the fake gateway over real HTTP, on
SQLite and PostgreSQL. Time is the ledger's injected clock (real time plus an offset the
test moves), so backoffs and deadlines pass when the test says so."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from daybook import Ledger, open_ledger, open_read_models, run_projections
from daybook.domain.commands import Command, Receipt
from daybook.domain.errors import ConcurrencyConflict, DomainError
from daybook.domain.holds import Hold
from daybook.domain.orders import MAX_LINES, MAX_ORDER_ID, PlaceOrder, hold_id_of
from daybook.domain.sagas import (
    CancelSaga,
    RetrySaga,
    RunLocalCompensation,
    RunLocalStep,
    Saga,
    SagaState,
    Wait,
)
from daybook.infrastructure.gateway import Charge, ChargeStatus, Refund, Unavailable
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.sagas.breaker import BreakerState
from daybook.infrastructure.sagas.processor import SagaProcessor, idempotency_key
from daybook.projections.sagas import SAGA_LIST
from scripts import services
from scripts.outage import Outage
from scripts.streams import WAIT, unique, wait_until


class Clock:
    """Real time plus an offset the test moves: the wall clock and, for what the processor
    times within itself (its breaker's cooldown), the monotonic one."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset.total_seconds()

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass
class Shop:
    ledger: Ledger
    server: FakeGatewayServer
    processor: SagaProcessor
    clock: Clock
    customer: UUID
    merchant: UUID

    def order(self, order_id: str, lines: list[tuple[str, int, int]], **options: int) -> UUID:
        receipt = self.ledger.execute(
            PlaceOrder(order_id, self.customer, self.merchant, lines, **options)
        )
        assert receipt.saga_id is not None
        return receipt.saga_id

    def run(self, saga_id: UUID, *, rounds: int = 50) -> Saga:
        """Drive the saga; whenever it waits, move time to when it wakes."""
        for _ in range(rounds):
            saga = self.processor.drive(saga_id)
            if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
                return saga
            now = self.clock()
            move = saga.next_move(now)
            if isinstance(move, Wait) and move.until is not None:
                wait = (move.until - now).total_seconds()
            else:  # it waits for the breaker to let a call through
                wait = self.processor.breakers["payments"].reopens_in() or 0.0
            self.clock.advance(wait + 0.001)
        view = self.ledger.read(Saga, saga_id).view()
        raise AssertionError(f"saga {saga_id} did not end: {view}")

    def charged(self) -> dict[str, int]:
        return dict(self.server.gateway.charged)


@pytest.fixture
def shop(shared_store_url: str) -> Iterator[Shop]:
    clock = Clock()
    ledger = open_ledger(shared_store_url, clock=clock)
    server = FakeGatewayServer(Knobs(seed=5)).start()
    views: ReadModels = open_read_models(shared_store_url)
    processor = SagaProcessor(
        ledger,
        views,
        {"payments": HttpPaymentGateway(server.url, timeout=2.0)},
        monotonic=clock.monotonic,
        seed=1,
    )
    customer = ledger.open_account("customer", "EUR").account_id
    merchant = ledger.open_account("merchant", "EUR").account_id
    assert customer is not None and merchant is not None
    ledger.deposit(customer, 100_000)
    ledger.receive_stock("KETTLE", 10)
    ledger.receive_stock("MUG", 3)
    yield Shop(ledger, server, processor, clock, customer, merchant)
    processor.stop()
    views.close()
    server.stop()
    ledger.close()


def assert_nothing_left_open(shop: Shop, saga_id: UUID) -> None:
    status = shop.ledger.hold_status(hold_id_of(saga_id))
    assert status.status in ("captured", "voided", "expired")
    for sku in ("KETTLE", "MUG"):
        assert shop.ledger.inventory(sku).reservations == {}


def test_finished_sagas_leave_the_aggregate_cache(shop: Shop) -> None:
    """A finished saga (and its resolved hold) never changes again: the processor's ledger
    keeps none of them cached, where each would push a live aggregate out (a process running
    orders for months would otherwise fill its cache with them)."""
    sagas = [shop.order(f"o-{n}", [("KETTLE", 1, 100)]) for n in range(3)]
    shop.server.gateway.knobs.decline_rate = 1.0
    sagas.append(shop.order("o-declined", [("KETTLE", 1, 100)]))
    cache = shop.ledger.service.repository.cache
    # The ledger's writer caches a batch's aggregates just after it has answered the batch's
    # callers: on a busy machine a caller may look before then. So the cache is looked at
    # until the writer has done so, both for the running sagas and for the finished ones.
    wait_until(lambda: set(sagas) <= set(cache.ids()), "the running sagas to be cached")
    shop.server.gateway.knobs.decline_rate = 0.0
    states = [shop.run(saga_id).state for saga_id in sagas[:3]]
    shop.server.gateway.knobs.decline_rate = 1.0
    states.append(shop.run(sagas[3]).state)
    assert states == [SagaState.COMPLETED] * 3 + [SagaState.COMPENSATED]
    for saga_id in sagas:
        assert shop.ledger.read(Saga, saga_id).state.finished  # a read does not cache it
    settled = set(sagas) | {Hold.id_for(hold_id_of(saga_id)) for saga_id in sagas}
    wait_until(lambda: not set(cache.ids()) & settled, "the finished sagas to leave the cache")
    assert shop.customer in set(cache.ids())


def test_an_order_completes_money_and_stock_move_once(shop: Shop) -> None:
    saga_id = shop.order("o-1", [("KETTLE", 2, 3_000), ("MUG", 3, 500)])
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPLETED
    assert shop.ledger.account(shop.customer).balance == 100_000 - 7_500
    assert shop.ledger.account(shop.merchant).balance == 7_500
    assert shop.ledger.inventory("KETTLE").on_hand == 8
    assert shop.ledger.inventory("MUG").on_hand == 0
    assert shop.charged() == {idempotency_key(saga_id, "charge"): 1}
    assert_nothing_left_open(shop, saga_id)
    # The linked step's outcomes are recorded as data a later step or a reader can use
    # (they were the text of a Python list: "[{'command': 'capture', ... UUID('...')}]").
    fulfilled = shop.ledger.read(Saga, saga_id).results["fulfil"]
    outcomes = fulfilled["linked"]
    assert isinstance(outcomes, list) and outcomes[0]["command"] == "capture"
    assert all(isinstance(value, (str, int, bool)) for o in outcomes for value in o.values())


def test_out_of_stock_on_a_later_line_releases_the_earlier_ones(shop: Shop) -> None:
    saga_id = shop.order("o-2", [("KETTLE", 2, 3_000), ("MUG", 4, 500)])
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED
    assert saga.last_error is not None and "out_of_stock" in saga.last_error
    assert shop.ledger.inventory("KETTLE").available == 10
    assert shop.charged() == {}


def test_a_declined_payment_voids_the_hold_and_releases_the_stock(shop: Shop) -> None:
    shop.server.gateway.knobs.decline_rate = 1.0
    saga_id = shop.order("o-3", [("KETTLE", 1, 3_000)])
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED
    assert "payment_declined" in (saga.last_error or "")
    view = shop.ledger.account(shop.customer)
    assert (view.balance, view.held) == (100_000, 0)
    assert shop.ledger.hold_status(hold_id_of(saga_id)).status == "voided"
    assert shop.ledger.inventory("KETTLE").available == 10
    assert_nothing_left_open(shop, saga_id)


def test_a_charge_whose_reply_was_lost_is_looked_up_not_repeated(shop: Shop) -> None:
    shop.server.gateway.knobs.lost_reply_rate = 1.0
    saga_id = shop.order("o-4", [("KETTLE", 1, 3_000)])
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPLETED
    key = idempotency_key(saga_id, "charge")
    assert shop.charged() == {key: 1}
    assert shop.server.gateway.requests[key] == 1  # the lookup answered; no second charge


def test_a_request_that_timed_out_uncharged_is_tried_again_with_the_same_key(shop: Shop) -> None:
    shop.server.gateway.knobs.drop_rate = 0.7
    saga_ids = [shop.order(f"o-5-{n}", [("KETTLE", 1, 100)]) for n in range(4)]
    for saga_id in saga_ids:
        assert shop.run(saga_id).state is SagaState.COMPLETED
    assert sorted(shop.charged().values()) == [1, 1, 1, 1]
    assert sum(shop.server.gateway.requests.values()) > 4  # some were dropped and retried


def test_the_payment_deadline_compensates_while_the_breaker_holds_calls(shop: Shop) -> None:
    shop.server.gateway.knobs.unavailable_rate = 1.0
    shop.processor.breakers["payments"].cooldown = timedelta(seconds=60)
    saga_id = shop.order("o-6", [("KETTLE", 1, 3_000)], payment_deadline=30)
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED
    assert "deadline" in (saga.last_error or "")
    key = idempotency_key(saga_id, "charge")
    # Five failures opened the breaker; the saga waited for it, and the deadline came.
    assert shop.server.gateway.requests[key] == 5
    assert shop.processor.breakers["payments"].opened >= 1
    assert shop.charged() == {}
    assert shop.server.gateway.stats()["charges"] == {}
    assert key in shop.server.gateway.closed  # refunded by key: a late charge cannot land
    assert_nothing_left_open(shop, saga_id)


class SetClock:
    """A clock that reads what the test set."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class DownGateway:
    """A payment gateway that is down: every charge and lookup is "not processed, try
    later"; a refund finds nothing to refund."""

    def charge(self, key: str, **_: Any) -> Charge:
        raise Unavailable("503 (down)")

    def lookup(self, key: str) -> Charge | None:
        raise Unavailable("503 (down)")

    def refund(self, key: str) -> Refund:
        return Refund(key, "nothing_to_refund", 0)

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        return []


def _kettle_order(ledger: Ledger, order_id: str, **options: Any) -> tuple[UUID, UUID]:
    """A customer with 10,000 EUR orders one KETTLE (of 5 in stock) at 100 from a merchant:
    the customer's account and the order's saga."""
    customer = ledger.open_account("customer", "EUR").account_id
    merchant = ledger.open_account("merchant", "EUR").account_id
    assert customer is not None and merchant is not None
    ledger.deposit(customer, 10_000)
    ledger.receive_stock("KETTLE", 5)
    order = PlaceOrder(order_id, customer, merchant, [("KETTLE", 1, 100)], **options)
    saga_id = ledger.execute(order).saga_id
    assert saga_id is not None
    return customer, saga_id


def test_a_deadline_sent_a_moment_early_fires_once_it_has_passed() -> None:
    """The processor's clock read past the payment deadline, the ledger's a second short of
    it: the deadline was refused ("has not passed"), and that refusal was recorded under the
    deadline's request id. Every later send of it was answered with the old refusal, which
    the processor took for another delivery's progress: it sent it again, 1,000 times a
    drive, and the order stayed running (neither charged nor compensated, its funds held
    and its stock reserved) for the request retention window, 3 days. Now a deadline
    refused as not yet passed fires once it has, and a move that moved nothing ends the
    drive (the saga is due again at the next pass)."""
    start = datetime(2030, 1, 1, tzinfo=UTC)
    ledger_clock = SetClock(start)
    with open_ledger("memory://", clock=ledger_clock) as ledger:
        processor = SagaProcessor(
            ledger,
            None,  # type: ignore[arg-type]
            {"payments": DownGateway()},
            clock=lambda: ledger_clock.now + timedelta(seconds=2),  # two seconds ahead
            seed=1,
            breaker_threshold=1000,
        )
        try:
            _, saga_id = _kettle_order(ledger, "o-early", payment_deadline=60)
            saga = processor.drive(saga_id)  # reserve, hold, a charge answered 503
            assert saga.state is SagaState.RUNNING and saga.deadline is not None
            deadline = saga.deadline[1]
            ledger_clock.now = deadline - timedelta(seconds=1)  # the processor's is past it
            moves = processor.moves
            saga = processor.drive(saga_id)
            early = processor.moves - moves
            assert saga.state is SagaState.RUNNING
            ledger_clock.now = deadline + timedelta(seconds=60)  # past it on every clock
            saga = processor.drive(saga_id)
        finally:
            processor.stop()
        assert saga.state is SagaState.COMPENSATED, saga.view()
        assert "deadline" in (saga.last_error or "")
        assert early == 1, f"{early} moves in one drive"
        assert ledger.hold_status(hold_id_of(saga_id)).status == "voided"
        assert ledger.inventory("KETTLE").available == 5


class RecoveringGateway(DownGateway):
    """A payment gateway that is down until ``up`` is set, then charges every request."""

    def __init__(self) -> None:
        self.up = False
        self.charged: list[str] = []

    def charge(self, key: str, *, amount: int, currency: str, **_: Any) -> Charge:
        if not self.up:
            return super().charge(key)
        self.charged.append(key)
        return Charge(key, ChargeStatus.SUCCEEDED, amount, currency, charge_id=key)

    def lookup(self, key: str) -> Charge | None:
        return super().lookup(key) if not self.up else None


@pytest.mark.parametrize("step_back", [0, 3600])  # 0: the clock not stepped, for contrast
def test_a_wall_clock_stepped_back_does_not_hold_the_breaker_open(step_back: int) -> None:
    """The breaker's cooldown was measured on the wall clock: the gateway failed once, the
    breaker opened for its cooldown, the gateway came back, and NTP stepped the host's
    clock back an hour. The breaker then stayed open for that hour: no charge went out and
    every order meanwhile would reach its payment deadline and be compensated, the gateway
    up. A cooldown lives in one process: it is measured on the monotonic clock (the real
    one here), which no step moves."""
    clock = Clock()
    gateway = RecoveringGateway()
    with open_ledger("memory://", clock=clock) as ledger:
        processor = SagaProcessor(
            ledger,
            None,  # type: ignore[arg-type]
            {"payments": gateway},
            seed=1,
            breaker_threshold=1,
            breaker_cooldown=0.05,
        )
        try:
            _, first = _kettle_order(ledger, "o-1")
            processor.drive(first)  # its charge is answered 503: the breaker opens
            assert processor.breakers["payments"].state is BreakerState.OPEN
            gateway.up = True
            clock.advance(-step_back)  # NTP steps the wall clock back
            time.sleep(0.1)  # longer than the cooldown, on any clock that only moves forward
            _, second = _kettle_order(ledger, "o-2")
            state = processor.drive(second).state
        finally:
            processor.stop()
    assert (state, gateway.charged) == (
        SagaState.COMPLETED,
        [idempotency_key(second, "charge")],
    )


class DecliningGateway:
    """A payment gateway that declines every charge and refunds as the test says."""

    def __init__(self, refund: Callable[[str], Refund]) -> None:
        self.on_refund = refund
        self.refunds = 0

    def charge(self, key: str, *, amount: int, currency: str, **_: Any) -> Charge:
        return Charge(key, ChargeStatus.DECLINED, amount, currency, decline_code="card_declined")

    def lookup(self, key: str) -> Charge | None:
        return None

    def refund(self, key: str) -> Refund:
        self.refunds += 1
        return self.on_refund(key)

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        return []


def _refund_down(key: str) -> Refund:
    raise Unavailable("503 (try later)")


def _refunded(key: str) -> Refund:
    return Refund(key, "refunded", 100)


def test_two_processors_on_one_refund_record_it_once_and_the_order_ends_compensated() -> None:
    """Two processors take up the same compensating order at once. A's refund is answered
    503 and A records attempt 1 failed; B's refund of the same key succeeds a moment later,
    and its record of attempt 1 is refused, the saga being at attempt 2. That refusal was
    recorded under a request id that named no attempt, which every later successful refund
    (attempt 2, 3...) sent again with another payload: the order stayed compensating for
    the request retention window (3 days), each drive calling the gateway's refund 1,000
    times. Each attempt's success now has an id of its own: recorded once, by attempt 2."""
    start = datetime(2030, 1, 1, tzinfo=UTC)
    clock = SetClock(start)
    with open_ledger("memory://", clock=clock) as ledger:
        port_a = DecliningGateway(_refund_down)
        a = SagaProcessor(ledger, None, {"payments": port_a}, seed=1)  # type: ignore[arg-type]

        def refund_while_a_runs(key: str) -> Refund:
            a.drive(saga_id)  # A takes its turn while B's refund is on the wire
            return _refunded(key)

        port_b = DecliningGateway(refund_while_a_runs)
        b = SagaProcessor(ledger, None, {"payments": port_b}, seed=2)  # type: ignore[arg-type]
        try:
            customer, saga_id = _kettle_order(ledger, "o-two")
            saga = ledger.read(Saga, saga_id)
            while saga.state is SagaState.RUNNING:  # reserve, hold, the charge declined
                saga = b.drive(saga_id, max_moves=1)
            assert saga.pending_compensations[-1] == "charge" and saga.attempts == 0
            b.drive(saga_id)  # A records attempt 1 failed; B's refund went through
            assert ledger.read(Saga, saga_id).attempts == 1
            clock.now = start + timedelta(seconds=30)  # the retry is due; the gateway is up
            port_a.on_refund = _refunded
            saga = a.drive(saga_id)
        finally:
            a.stop()
            b.stop()
        assert saga.state is SagaState.COMPENSATED, (port_a.refunds, saga.view())
        assert port_a.refunds == 2, f"{port_a.refunds} refund calls"  # attempt 1, attempt 2
        history = list(ledger.service.events.get(saga_id))
        refunds = [e for e in history if isinstance(e, Saga.Compensated) and e.step == "charge"]
        assert len(refunds) == 1, refunds
        view = ledger.account(customer)
        assert (view.balance, view.held) == (10_000, 0)
        assert ledger.inventory("KETTLE").available == 5


def test_a_compensation_that_keeps_failing_needs_attention_until_a_person_retries(
    shop: Shop,
) -> None:
    saga_id = shop.order("o-7", [("KETTLE", 1, 3_000)])
    shop.processor.drive(saga_id, max_moves=3)  # reserve, hold, charge: done
    saga = shop.ledger.read(Saga, saga_id)
    assert saga.results["charge"]["charge_id"]
    shop.ledger.execute(CancelSaga(saga_id, "bob", "customer called", request_id="c-1"))
    shop.server.gateway.knobs.refund_unavailable_rate = 1.0
    saga = shop.run(saga_id, rounds=200)
    assert saga.state is SagaState.NEEDS_ATTENTION
    assert saga.last_error is not None and "503" in saga.last_error
    assert shop.ledger.account(shop.customer).held == 3_000  # not released out of order
    assert shop.processor.drive(saga_id).state is SagaState.NEEDS_ATTENTION  # it waits
    # A person brings the gateway back and retries.
    shop.server.gateway.knobs.refund_unavailable_rate = 0.0
    shop.ledger.execute(RetrySaga(saga_id, "alice", "gateway back"))
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED
    assert shop.server.gateway.refunds[idempotency_key(saga_id, "charge")] == 1
    assert_nothing_left_open(shop, saga_id)
    history = [e for e in shop.ledger.service.events.get(saga_id)]
    decisions = [e.meta.decision for e in history if getattr(e.meta, "decision", None)]
    assert [d.by for d in decisions][:2] == ["bob", "saga processor"]
    assert "alice" in [d.by for d in decisions]
    assert all(d.at is not None and d.why for d in decisions)


def wait_at_the_charge(shop: Shop, order_id: str, lines: list[tuple[str, int, int]]) -> UUID:
    """An order reserved and held, its charge answered 503: it waits in the charge step,
    its hold open and its reservations open (both ids derivable, so anyone may resolve
    them meanwhile)."""
    shop.server.gateway.knobs.unavailable_rate = 1.0
    saga_id = shop.order(order_id, lines)
    saga = shop.processor.drive(saga_id)
    assert (saga.view().step, saga.state) == ("charge", SagaState.RUNNING)
    shop.server.gateway.knobs.unavailable_rate = 0.0
    return saga_id


def assert_acknowledged(shop: Shop, saga_id: UUID, step: str, what: str) -> None:
    """The step a person's retry settled is recorded compensated once, saying it went the
    other way (``what``) and who acknowledged it: not undone, and not tried again."""
    history = list(shop.ledger.service.events.get(saga_id))
    compensated = [e for e in history if isinstance(e, Saga.Compensated) and e.step == step]
    assert len(compensated) == 1, compensated
    (event,) = compensated
    assert what in event.result["kept"]
    assert event.result["acknowledged_by"] == "ops"
    assert event.meta.decision is not None and event.meta.decision.by == "ops"


def test_a_hold_captured_meanwhile_leaves_the_saga_needing_attention_not_compensated(
    shop: Shop,
) -> None:
    """Voiding a captured hold is refused ``hold_resolved``, as voiding a voided one is: only
    the second is undone. The customer's money is with the merchant: a person decides."""
    saga_id = wait_at_the_charge(shop, "o-captured", [("KETTLE", 1, 4_500)])
    shop.ledger.capture(hold_id_of(saga_id))
    shop.ledger.execute(CancelSaga(saga_id, "bob", "customer asked"))
    saga = shop.run(saga_id)
    assert saga.state is SagaState.NEEDS_ATTENTION, saga.view()
    assert saga.pending_compensations[-1] == "hold"
    assert saga.last_error is not None and "captured" in saga.last_error
    assert shop.ledger.account(shop.merchant).balance == 4_500  # nothing guessed back
    assert idempotency_key(saga_id, "charge") in shop.server.gateway.closed  # refunded first
    assert shop.processor.drive(saga_id).state is SagaState.NEEDS_ATTENTION  # it waits
    # A person has dealt with the money (refunded it by hand) and retries: the void is
    # recorded as acknowledged, not tried again, and the reservation is released.
    shop.ledger.execute(RetrySaga(saga_id, "ops", "refunded by hand"))
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED, saga.view()
    assert_acknowledged(shop, saga_id, "hold", "captured")
    assert shop.ledger.inventory("KETTLE").available == 10
    assert_nothing_left_open(shop, saga_id)


def test_a_reservation_committed_meanwhile_leaves_the_saga_needing_attention_not_compensated(
    shop: Shop,
) -> None:
    """Releasing a committed (shipped) reservation is refused ``reservation_resolved``, as
    releasing a released one is: only the second is undone."""
    saga_id = wait_at_the_charge(shop, "o-shipped", [("KETTLE", 2, 100)])
    shop.ledger.commit_reservation("KETTLE", "o-shipped/0")
    shop.ledger.execute(CancelSaga(saga_id, "bob", "customer asked"))
    saga = shop.run(saga_id)
    assert saga.state is SagaState.NEEDS_ATTENTION, saga.view()
    assert saga.pending_compensations[-1] == "reserve-0"
    assert saga.last_error is not None and "shipped" in saga.last_error
    assert shop.ledger.inventory("KETTLE").on_hand == 8
    view = shop.ledger.account(shop.customer)
    assert (view.balance, view.held) == (100_000, 0)  # the hold was voided before
    shop.ledger.execute(RetrySaga(saga_id, "ops", "refunded by hand"))
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED, saga.view()
    assert_acknowledged(shop, saga_id, "reserve-0", "shipped")
    assert shop.ledger.hold_status(hold_id_of(saga_id)).status == "voided"
    assert_nothing_left_open(shop, saga_id)


def test_a_hold_voided_and_a_reservation_released_meanwhile_count_as_undone(shop: Shop) -> None:
    saga_id = wait_at_the_charge(shop, "o-undone", [("KETTLE", 2, 100)])
    shop.ledger.void(hold_id_of(saga_id))
    shop.ledger.release_reservation("KETTLE", "o-undone/0")
    shop.ledger.execute(CancelSaga(saga_id, "bob", "customer asked"))
    saga = shop.run(saga_id)
    assert saga.state is SagaState.COMPENSATED, saga.view()
    assert shop.ledger.inventory("KETTLE").available == 10
    assert_nothing_left_open(shop, saga_id)


def test_a_compensation_that_counts_a_lapse_as_undone_records_it(shared_store_url: str) -> None:
    """A cancelled order compensated after its hold's and its reservation's timeouts passed
    (the void refused ``hold_expired``, the release ``reservation_expired``: undone) wrote
    nothing about the lapse. A writer whose clock is 30 s behind the processor's, to which
    both still looked open, then captured the hold (the customer's money to the merchant)
    and shipped the stock, while the saga said compensated. The lapses are recorded with
    the compensation."""
    start = datetime(2030, 1, 1, tzinfo=UTC)
    clock_a, clock_b = SetClock(start), SetClock(start - timedelta(seconds=30))
    with (
        open_ledger(shared_store_url, clock=clock_a) as ledger_a,
        open_ledger(shared_store_url, clock=clock_b) as ledger_b,
    ):
        processor = SagaProcessor(
            ledger_a,
            None,  # type: ignore[arg-type]
            {"payments": DownGateway()},
            seed=1,
            breaker_threshold=1000,
        )
        try:
            _, saga_id = _kettle_order(
                ledger_a, "o-lapsed", hold_timeout=60, reservation_timeout=60
            )
            saga = processor.drive(saga_id)  # reserve, hold, a charge answered 503: waits
            assert saga.state is SagaState.RUNNING
            clock_a.now = start + timedelta(seconds=70)  # past both timeouts
            clock_b.now = start + timedelta(seconds=40)  # before them
            ledger_a.execute(CancelSaga(saga_id, "bob", "customer asked"))
            saga = processor.drive(saga_id)
        finally:
            processor.stop()
        assert saga.state is SagaState.COMPENSATED, saga.view()
        assert ledger_a.hold_status(hold_id_of(saga_id)).recorded
        head = ledger_b.head()
        refusals = []
        for resolve in (
            lambda: ledger_b.capture(hold_id_of(saga_id)),
            lambda: ledger_b.commit_reservation("KETTLE", "o-lapsed/0"),
        ):
            with pytest.raises(DomainError) as refused:
                resolve()
            refusals.append(refused.value.code)
        assert refusals == ["hold_expired", "reservation_resolved"]
        assert ledger_b.head() == head
        assert ledger_b.hold_status(hold_id_of(saga_id)).status == "expired"
        stock = ledger_b.inventory("KETTLE")
        assert (stock.on_hand, stock.reserved) == (5, 0)


def test_a_failure_no_retry_can_cure_stops_the_processor_visibly(shop: Shop) -> None:
    """A misconfigured gateway (a URL where no gateway answers its routes) is a failure a
    retry would only hide: the processor stops with FAILED and the reason in its health."""
    misconfigured = HttpPaymentGateway(f"{shop.server.url}/no-such-prefix")
    processor = SagaProcessor(
        shop.ledger, shop.processor.views, {"payments": misconfigured}, poll=0.01
    )
    saga_id = shop.order("o-8", [("KETTLE", 1, 3_000)])
    processor.drive(saga_id, max_moves=2)  # reserve and hold: local, no gateway
    processor.wake(saga_id)
    processor.start()
    processor.service.join(timeout=30)
    health = processor.health()
    assert health.state is ServiceState.FAILED
    assert health.error is not None and "refused the request (404)" in health.error
    processor.stop()
    assert shop.ledger.read(Saga, saga_id).state is SagaState.RUNNING  # nothing guessed


def test_a_remote_error_with_control_characters_is_recorded_as_a_retry(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's error text is the remote's to choose (a 5xx body, say): a DEL or a C1
    control in it, which free text refuses, must not make the retry it is recorded with
    refused, nor stop the processor (it did: RetryLater was invalid_request)."""
    port = shop.processor.ports["payments"]
    charge = port.charge
    failed: list[str] = []

    def garbled(key: str, **request: Any) -> Any:
        if not failed:
            failed.append(key)
            raise Unavailable("the gateway answered 503: <p>\x7fbusy\x9b</p>\ud800")
        return charge(key, **request)

    monkeypatch.setattr(port, "charge", garbled)
    saga_id = shop.order("o-11", [("KETTLE", 1, 3_000)])
    assert shop.run(saga_id).state is SagaState.COMPLETED
    assert failed == [idempotency_key(saga_id, "charge")]


def contend_once(shop: Shop, monkeypatch: pytest.MonkeyPatch, kind: type[Command]) -> list[Command]:
    """The first command of ``kind`` the ledger is given is refused as the ledger refuses
    one whose aggregates other writers kept changing past its retries (nothing applied);
    the list it returns gets that command."""
    execute = shop.ledger.execute
    refused: list[Command] = []

    def contended(command: Command) -> Receipt:
        if isinstance(command, kind) and not refused:
            refused.append(command)
            raise ConcurrencyConflict("gave up after 40 attempts: other writers kept changing")
        return execute(command)

    monkeypatch.setattr(shop.ledger, "execute", contended)
    return refused


def test_contention_past_the_ledgers_retries_leaves_the_saga_to_the_next_pass(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other writers kept the customer's account busy past the ledger's retries: a step is
    refused with concurrency_conflict, nothing applied. The saga is driven again at the
    next pass and the processor keeps running (it used to stop, failed, and `daybook sagas
    run` with it)."""
    saga_id = shop.order("o-9", [("KETTLE", 1, 3_000)])
    refused = contend_once(shop, monkeypatch, RunLocalStep)
    shop.processor.wake(saga_id).result()  # the pass that meets the contention
    assert shop.run(saga_id).state is SagaState.COMPLETED
    assert len(refused) == 1
    with run_projections(shop.ledger, projections=[SAGA_LIST]) as runner:
        runner.views.rows(SAGA_LIST, "sagas", min_position=shop.ledger.head(), limit=1)
        shop.processor.views = runner.views
        assert shop.processor.run_due() == 0  # no failure kept for the processor to stop on


def test_contention_spends_no_attempt_of_a_compensation(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compensation refused with concurrency_conflict did not fail: it was not applied.
    It is tried again at the next pass without counting against the policy's attempts,
    which end in needs_attention (it used to count as a failed attempt)."""
    saga_id = shop.order("o-10", [("KETTLE", 2, 3_000), ("MUG", 4, 500)])  # MUG: out of stock
    refused = contend_once(shop, monkeypatch, RunLocalCompensation)
    shop.processor.wake(saga_id).result()  # the pass that meets the contention
    assert shop.run(saga_id).state is SagaState.COMPENSATED
    assert len(refused) == 1
    history = list(shop.ledger.service.events.get(saga_id))
    assert [type(e).__name__ for e in history].count("AttemptFailed") == 0
    assert shop.ledger.inventory("KETTLE").available == 10


def test_a_step_is_recorded_only_by_the_command_of_its_kind() -> None:
    """A local step runs its command; a remote one is done only when its remote answered.
    Recording either the other way is refused with a code, and writes nothing (it used to
    fail an assertion, or record a payment that was never made)."""
    from daybook import place_order
    from daybook.domain.errors import DomainError
    from daybook.domain.sagas import CompleteRemoteStep, RunLocalStep

    with open_ledger("memory://") as ledger:
        customer = ledger.open_account("ann", "EUR").account_id
        merchant = ledger.open_account("shop", "EUR").account_id
        assert customer is not None and merchant is not None
        ledger.deposit(customer, 10_000)
        ledger.receive_stock("KETTLE", 5)
        saga_id = place_order(ledger, "order-1", customer, merchant, [("KETTLE", 1, 4_500)]).saga_id
        head = ledger.head()
        with pytest.raises(DomainError) as remote_as_done:
            ledger.execute(CompleteRemoteStep(saga_id, "reserve-0", {"done": True}))
        assert ledger.head() == head
        ledger.execute(RunLocalStep(saga_id, "reserve-0"))
        ledger.execute(RunLocalStep(saga_id, "hold"))
        head = ledger.head()
        with pytest.raises(DomainError) as run_remote:
            ledger.execute(RunLocalStep(saga_id, "charge"))
        assert ledger.head() == head
    assert remote_as_done.value.code == run_remote.value.code == "invalid_request"
    assert "'reserve-0'" in str(remote_as_done.value) and "not remote" in str(remote_as_done.value)
    assert "'charge'" in str(run_remote.value) and "not local" in str(run_remote.value)


def test_an_order_its_hold_would_refuse_is_refused_when_placed() -> None:
    """An order paid to its own customer, or to a merchant in another currency, can never
    take its hold: it is refused with the hold's own code before a saga starts (it used to
    be accepted, and its saga compensated later). An account that does not exist is not
    found first, as a transfer's are."""
    with open_ledger("memory://") as ledger:
        customer = ledger.open_account("ann", "EUR").account_id
        pounds = ledger.open_account("shop", "GBP").account_id
        assert customer is not None and pounds is not None
        ledger.deposit(customer, 10_000)
        ledger.receive_stock("KETTLE", 5)
        head = ledger.head()
        nobody = uuid4()
        closed = ledger.open_account("gone", "EUR").account_id
        ledger.close_account(closed)
        head = ledger.head()
        cases = [
            (customer, customer, "same_account"),
            (customer, pounds, "currency_mismatch"),
            (nobody, nobody, "account_not_found"),
            (customer, closed, "account_closed"),  # accepted, then compensated, before
            (closed, customer, "account_closed"),
        ]
        for payer, merchant, code in cases:
            with pytest.raises(DomainError) as refused:
                ledger.execute(PlaceOrder("o-1", payer, merchant, [("KETTLE", 1, 4_500)]))
            assert refused.value.code == code
            assert ledger.head() == head


def test_an_order_id_that_cannot_name_its_reservations_is_refused_when_placed() -> None:
    """An order's reservations are named ``ORDER_ID/INDEX``, and a reservation id has at
    most 100 printable characters: an order id of 98 to 200 characters (or one with a
    character that is not printable, such as a no-break space) was accepted, and its saga's
    first step refused for the name, to compensate. Now the order is refused at once."""
    with open_ledger("memory://") as ledger:
        customer = ledger.open_account("ann", "EUR").account_id
        merchant = ledger.open_account("shop", "EUR").account_id
        ledger.deposit(customer, 10_000)
        ledger.receive_stock("KETTLE", 200)
        head = ledger.head()
        for order_id in ("o" * (MAX_ORDER_ID + 1), "o" * 200, "order\xa01"):
            with pytest.raises(DomainError) as refused:
                ledger.execute(PlaceOrder(order_id, customer, merchant, [("KETTLE", 1, 10)]))
            assert refused.value.code == "invalid_request", order_id
            assert ledger.head() == head
        longest = "o" * MAX_ORDER_ID
        lines = [("KETTLE", 1, 10)] * MAX_LINES
        receipt = ledger.execute(PlaceOrder(longest, customer, merchant, lines))
        processor = SagaProcessor(ledger, None, {}, seed=1)  # type: ignore[arg-type]
        try:
            saga = processor.drive(receipt.saga_id, max_moves=MAX_LINES)  # every reservation
        finally:
            processor.stop()
        assert saga.state is SagaState.RUNNING and saga.last_error is None, saga.view()
        assert ledger.inventory("KETTLE").available == 200 - MAX_LINES


class HungGateway:
    """The shop's gateway, whose charges hang until ``release`` (a remote that accepted the
    connection and never answers, behind a client without a timeout)."""

    def __init__(self, inner: HttpPaymentGateway) -> None:
        self.inner = inner
        self.entered: list[str] = []
        self.release = threading.Event()

    def charge(self, key: str, **details: Any) -> Charge:
        self.entered.append(key)
        self.release.wait(60)
        return self.inner.charge(key, **details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_stop_waits_for_hung_gateway_calls_only_as_long_as_it_was_told(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    """``stop(timeout)`` waited for the worker pool without bound: every saga handed out,
    queued ones included, was driven to its end, and one gateway call that never returned
    held a deploy's stop (and the process) for ever. Now the queued ones are left for the
    next pass, the stop gives up after its timeout saying which sagas were in hand, and
    the next processor finishes every one, charging each once."""
    hung = HungGateway(HttpPaymentGateway(shop.server.url, timeout=2.0))
    processor = SagaProcessor(
        shop.ledger, shop.processor.views, {"payments": hung}, poll=0.01, workers=2
    )
    sagas = [shop.order(f"o-hung-{n}", [("KETTLE", 1, 700)]) for n in range(6)]
    for saga_id in sagas:
        processor.wake(saga_id)
    deadline = time.monotonic() + 30
    while len(hung.entered) < 2:  # both workers inside a call, four sagas queued
        assert time.monotonic() < deadline, hung.entered
        time.sleep(0.01)
    stopping = threading.Thread(target=processor.stop, kwargs={"timeout": 0.2})
    with caplog.at_level(logging.WARNING):
        stopping.start()
        stopping.join(30)
        alive = stopping.is_alive()
        hung.release.set()  # (let the calls end either way)
    assert not alive
    warned = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert len(warned) == 1 and "2 saga move(s)" in warned[0], warned
    running = sorted(key.partition(":")[0] for key in hung.entered)
    assert warned[0].endswith(f"(sagas {', '.join(running)}); the next processor to start "
                              "takes them up"), warned  # fmt: skip
    while processor._futures:  # the two calls answer; their workers make no more moves
        assert time.monotonic() < deadline + 30, processor._futures
        time.sleep(0.01)
    assert len(hung.entered) == 2  # the queued ones never started
    for saga_id in sagas:
        assert shop.run(saga_id).state is SagaState.COMPLETED
    assert shop.charged() == {idempotency_key(saga_id, "charge"): 1 for saga_id in sagas}


@pytest.mark.postgres
def test_the_processor_says_it_retries_while_its_sagas_cannot_move(
    pg_url: str, pg_admin_url: str
) -> None:
    """Read models on a database of their own, the event store away: every pass read the
    due sagas, every drive failed on the outage (only logged), and health said running.
    It now says it retries, and why, until sagas move again."""
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    ledger = open_ledger(pg_url)
    server = FakeGatewayServer(Knobs(seed=5)).start()
    views = ReadModels(readmodels)
    processor: SagaProcessor | None = None
    try:
        customer = ledger.open_account("customer", "EUR").account_id
        merchant = ledger.open_account("merchant", "EUR").account_id
        ledger.deposit(customer, 10_000)
        ledger.receive_stock("KETTLE", 3)
        saga_id = ledger.execute(
            PlaceOrder("o-away", customer, merchant, [("KETTLE", 1, 900)])
        ).saga_id
        assert saga_id is not None
        built = run_projections(ledger, readmodels, start=False)
        built.run_until_caught_up()
        built.stop()
        with Outage.of_url(pg_url) as outage:
            proxied = outage.url(pg_url)
            # Each attempt to reach the store waits 2 s, not 10: the test sees the outage soon.
            away = open_ledger(f"{proxied}{'&' if '?' in proxied else '?'}connect_timeout=2")
            processor = SagaProcessor(
                away, views, {"payments": HttpPaymentGateway(server.url)}, poll=0.05
            )
            outage.cut()
            processor.start()
            wait_until(
                lambda: processor is not None and processor.health().state is ServiceState.RETRYING,
                "the processor to say its sagas cannot move",
            )
            health = processor.health()
            assert not health.ok
            assert (health.error or "").startswith("sagas cannot move: "), health
            outage.restore()
            wait_until(lambda: ledger.read(Saga, saga_id).state.finished, "the saga to end")
            wait_until(
                lambda: processor is not None and processor.health().state is ServiceState.RUNNING,
                "the processor to say it runs again",
            )
            processor.stop()
            away.close()
        assert ledger.read(Saga, saga_id).state is SagaState.COMPLETED
    finally:
        if processor is not None:
            processor.stop()
        views.close()
        server.stop()
        ledger.close()


_HUNG_AT_EXIT = """
import sys, time
from daybook import open_ledger, open_read_models
from daybook.domain.orders import PlaceOrder
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.processor import SagaProcessor

class Hung:
    def __init__(self, inner):
        self.inner, self.entered = inner, []
    def charge(self, key, **details):
        self.entered.append(key)
        time.sleep(600)
    def __getattr__(self, name):
        return getattr(self.inner, name)

url = sys.argv[1]
ledger = open_ledger(url)
server = FakeGatewayServer(Knobs(seed=5)).start()
views = open_read_models(url)
hung = Hung(HttpPaymentGateway(server.url, timeout=2.0))
processor = SagaProcessor(ledger, views, {"payments": hung}, poll=0.01, workers=1)
customer = ledger.open_account("c", "EUR").account_id
merchant = ledger.open_account("m", "EUR").account_id
ledger.deposit(customer, 10_000)
ledger.receive_stock("KETTLE", 3)
processor.wake(ledger.execute(PlaceOrder("o-1", customer, merchant, [("KETTLE", 1, 700)])).saga_id)
while not hung.entered:
    time.sleep(0.01)
processor.stop(timeout=0.2)
ledger.close()
views.close()
server.stop()
print("returned", flush=True)
"""


def test_a_process_whose_saga_call_hangs_exits_once_the_stop_gave_up(tmp_path: Any) -> None:
    """``daybook sagas run`` on SIGTERM: the stop gives up on a hung gateway call, and the
    process ends. The interpreter joined the worker pool's threads on exit, so the process
    waited for the call, for ever if it never returned."""
    done = subprocess.run(
        [sys.executable, "-c", _HUNG_AT_EXIT, f"sqlite:///{tmp_path}/ledger.db"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.stdout == "returned\n", done.stdout + done.stderr
    assert done.returncode == 0, done.stderr


# A port of the deployment's own that raises something other than an Exception (a
# ``BaseException``: ``SystemExit`` from an SDK's ``sys.exit``, a ``CancelledError`` out of a
# port that runs a coroutine) stops the processor visibly, as the README says of "anything but
# a GatewayError raised by a port of your own": it ended the move in its worker's future,
# which nobody read, without a word.


class GatewayAborted(BaseException):
    """What an SDK may raise that is no Exception."""


class AbortingGateway(HttpPaymentGateway):
    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=2.0)
        self.calls = 0

    def charge(self, key: str, **_: Any) -> Any:  # type: ignore[override]
        self.calls += 1
        raise GatewayAborted("the SDK gave up")


@pytest.mark.parametrize("shared_store_url", ["sqlite"], indirect=True)
def test_a_base_exception_from_a_port_stops_the_processor_visibly(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    port = AbortingGateway(shop.server.url)
    processor = SagaProcessor(shop.ledger, shop.processor.views, {"payments": port}, poll=0.01)
    saga_id = shop.order("o-audit-1", [("KETTLE", 1, 3_000)])
    processor.drive(saga_id, max_moves=2)  # reserve and hold: local, no gateway
    with caplog.at_level(logging.WARNING):
        future = processor.wake(saga_id)
        assert future is not None
        deadline = time.monotonic() + 10
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done() and port.calls == 1
    processor.stop()
    said = [r.getMessage() for r in caplog.records if str(saga_id) in r.getMessage()]
    assert said, f"nothing logged: the move died silently ({future.exception()!r})"
    # And the processor's next pass fails, as for any failure no retry cures (FAILED).
    with pytest.raises(GatewayAborted):
        processor.run_due()


def test_a_reservation_shipped_without_its_record_still_leaves_the_saga_needing_attention(
    shop: Shop,
) -> None:
    """A reservation's shipment record has a derivable id, on which anyone may open an
    account first: its commit then ships without the record (so that nobody can keep a
    reservation from shipping). The order's release, refused, cannot tell shipped from
    released: it took the reservation for one released and the saga ended compensated,
    with two kettles gone unpaid. It ends needing attention, as for one seen shipped."""
    from daybook.domain.inventory import ReservationShipment

    saga_id = wait_at_the_charge(shop, "o-squat", [("KETTLE", 2, 100)])
    squatted = ReservationShipment.id_for(("KETTLE", "o-squat/0"))
    shop.ledger.open_account("mallory", "EUR", account_id=squatted)
    shop.ledger.commit_reservation("KETTLE", "o-squat/0")
    shop.ledger.execute(CancelSaga(saga_id, "bob", "customer asked"))
    saga = shop.run(saga_id)
    assert shop.ledger.inventory("KETTLE").on_hand == 8  # two kettles left the shelf
    assert saga.state is SagaState.NEEDS_ATTENTION, saga.view()
