"""Model-based test of the order saga: random gateway outcomes (declines, timeouts with and
without a charge, 503s), duplicate deliveries of the processor's commands, cancels, and time
moving past deadlines, in any interleaving. A small model predicts each order's end state
where it is determined, and invariants are checked after every step: money and stock
conserved, held funds equal to the open holds, no key charged twice, no finished order with
an open hold or reservation, completed orders charged and kept, others not charged or
refunded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from daybook import open_ledger
from daybook.domain.errors import DomainError
from daybook.domain.orders import PlaceOrder, hold_id_of
from daybook.domain.sagas import CancelSaga, RunLocalStep, Saga, SagaState
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.sagas.processor import Backoff, SagaProcessor, idempotency_key

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
FUNDS = 50_000
STOCK = {"A": 6, "B": 3}
OUTCOMES = {
    "ok": {},
    "decline": {"decline_rate": 1.0},
    "lost reply": {"lost_reply_rate": 1.0},
    "dropped": {"drop_rate": 1.0},
    "unavailable": {"unavailable_rate": 1.0},
}
ENDED = (SagaState.COMPLETED, SagaState.COMPENSATED)


@dataclass
class ModelOrder:
    saga_id: UUID
    lines: list[tuple[str, int, int]]
    #: "compensated" or "completed" once determined, else None.
    expected: str | None = None


class OrderMachine(RuleBasedStateMachine):
    server: FakeGatewayServer
    views: ReadModels

    def __init__(self) -> None:
        super().__init__()
        self.now = EPOCH
        self.ledger = open_ledger("memory://", clock=lambda: self.now)
        self.server.gateway.__init__(Knobs())  # type: ignore[misc]  # a clean gateway
        self.processor = SagaProcessor(
            self.ledger,
            self.views,
            {"payments": HttpPaymentGateway(self.server.url, timeout=2.0)},
            backoff=Backoff(initial=1.0, ceiling=8.0),
            breaker_threshold=3,
            breaker_cooldown=5.0,
            # the cooldown passes as the machine moves time, as deadlines do
            monotonic=lambda: (self.now - EPOCH).total_seconds(),
            seed=0,
        )
        self.customer = self.ledger.open_account("customer", "EUR").account_id
        self.merchant = self.ledger.open_account("merchant", "EUR").account_id
        self.ledger.deposit(self.customer, FUNDS)
        for sku, quantity in STOCK.items():
            self.ledger.receive_stock(sku, quantity)
        self.orders: list[ModelOrder] = []

    def teardown(self) -> None:
        self.set_gateway("ok")
        for _ in range(60):
            for order in self.orders:
                self.processor.drive(order.saga_id)
            if all(self.saga(o).state in ENDED for o in self.orders):
                break
            self.now += timedelta(seconds=10)
        for order in self.orders:
            saga = self.saga(order)
            assert saga.state in ENDED, saga.view()
            if order.expected is not None:
                assert saga.state.value == order.expected, (order, saga.view())
        self.check_money_and_stock()
        self.check_the_gateway()
        self.processor.stop()
        self.ledger.close()

    def saga(self, order: ModelOrder) -> Saga:
        return self.ledger.read(Saga, order.saga_id)

    def set_gateway(self, outcome: str) -> None:
        knobs = self.server.gateway.knobs
        for name in ("decline_rate", "lost_reply_rate", "drop_rate", "unavailable_rate"):
            setattr(knobs, name, 0.0)
        for name, value in OUTCOMES[outcome].items():
            setattr(knobs, name, value)

    # -- rules ------------------------------------------------------------------------------

    @rule(
        a=st.integers(0, 3),
        b=st.integers(0, 2),
        deadline=st.sampled_from([30, 300]),
    )
    def place_order(self, a: int, b: int, deadline: int) -> None:
        if len(self.orders) >= 6:
            return
        lines = [(sku, q, 100) for sku, q in (("A", a), ("B", b)) if q]
        if not lines:
            return
        receipt = self.ledger.execute(
            PlaceOrder(
                f"o-{len(self.orders)}",
                self.customer,
                self.merchant,
                lines,
                payment_deadline=deadline,
            )
        )
        assert receipt.saga_id is not None
        self.orders.append(ModelOrder(receipt.saga_id, lines))

    @rule(outcome=st.sampled_from(sorted(OUTCOMES)), data=st.data())
    def drive(self, outcome: str, data: st.DataObject) -> None:
        """The gateway answers the next calls this way; the processor drives one order."""
        if not self.orders:
            return
        order = data.draw(st.sampled_from(self.orders), label="order")
        before = self.saga(order)
        self.set_gateway(outcome)
        moves = data.draw(st.integers(1, 4), label="moves")
        saga = self.processor.drive(order.saga_id, max_moves=moves)
        # A decline of an order's charge decides its end.
        if (
            outcome == "decline"
            and before.state is SagaState.RUNNING
            and "charge" not in saga.results
            and saga.state is not SagaState.RUNNING
            and "payment_declined" in (saga.last_error or "")
        ):
            assert order.expected in (None, "compensated")
            order.expected = "compensated"
        if saga.state is SagaState.COMPLETED:
            assert order.expected in (None, "completed"), (order, saga.view())
            order.expected = "completed"

    @rule(seconds=st.sampled_from([1, 5, 31, 301]))
    def advance_time(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if not self.orders:
            return
        order = data.draw(st.sampled_from(self.orders), label="order")
        try:
            self.ledger.execute(CancelSaga(order.saga_id, "tester", "changed their mind"))
        except DomainError as refusal:
            assert refusal.code in ("saga_moved_on", "saga_finished")
            return
        assert order.expected is None
        order.expected = "compensated"

    @rule(data=st.data())
    def duplicate_delivery(self, data: st.DataObject) -> None:
        """A step delivered again, as a second processor (or a retry) would: replayed, or
        refused because the saga moved on; never applied twice."""
        if not self.orders:
            return
        order = data.draw(st.sampled_from(self.orders), label="order")
        saga = self.saga(order)
        done = [name for name in saga.results if not name.startswith("charge")]
        if not done:
            return
        step = data.draw(st.sampled_from(done), label="step")
        fresh = data.draw(st.booleans(), label="fresh request id")
        request_id = None if fresh else f"saga:{order.saga_id}:{step}"
        command = RunLocalStep(
            order.saga_id, step, **({"request_id": request_id} if request_id else {})
        )
        try:
            receipt = self.ledger.execute(command)
        except DomainError as refusal:
            assert refusal.code in ("saga_moved_on", "saga_finished")
        else:
            assert receipt.replayed

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def check_money_and_stock(self) -> None:
        customer = self.ledger.account(self.customer)
        merchant = self.ledger.account(self.merchant)
        assert customer.balance + merchant.balance == FUNDS
        assert customer.available >= 0
        holding = 0
        for order in self.orders:
            saga = self.saga(order)
            if "hold" in saga.results:
                status = self.ledger.hold_status(hold_id_of(order.saga_id))
                if status.status == "open":
                    holding += int(saga.data["total"])
                    assert saga.state not in ENDED
            if saga.state in ENDED:
                for index, line in enumerate(saga.data["lines"]):
                    reservation = f"{saga.data['order_id']}/{index}"
                    assert reservation not in self.ledger.inventory(line["sku"]).reservations
        assert customer.held == holding
        paid = sum(
            int(self.saga(o).data["total"])
            for o in self.orders
            if self.saga(o).state is SagaState.COMPLETED
        )
        assert merchant.balance == paid
        for sku, quantity in STOCK.items():
            stock = self.ledger.inventory(sku)
            shipped = sum(
                line["quantity"]
                for o in self.orders
                if self.saga(o).state is SagaState.COMPLETED
                for line in self.saga(o).data["lines"]
                if line["sku"] == sku
            )
            assert stock.on_hand == quantity - shipped
            assert 0 <= stock.reserved <= stock.on_hand

    @invariant()
    def check_the_gateway(self) -> None:
        gateway = self.server.gateway
        assert all(count == 1 for count in gateway.charged.values())
        for order in self.orders:
            saga = self.saga(order)
            record: dict[str, Any] | None = gateway.charges.get(
                idempotency_key(order.saga_id, "charge")
            )
            succeeded = record is not None and record["status"] == "succeeded"
            if saga.state is SagaState.COMPLETED:
                assert succeeded and record is not None and not record["refunded"]
            elif saga.state is SagaState.COMPENSATED and succeeded:
                assert record is not None and record["refunded"]


def test_orders_against_random_gateway_outcomes(tmp_path: Any) -> None:
    with FakeGatewayServer() as server:
        views = ReadModels(f"sqlite:///{tmp_path}/unused.db")

        class Machine(OrderMachine):
            pass

        Machine.server = server
        Machine.views = views
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        views.close()
