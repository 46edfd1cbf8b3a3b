"""The order workflow: a saga that reserves stock, holds the customer's funds, charges a
payment gateway, then captures the hold to the merchant and ships.

Steps, in order (each compensated in reverse if a later one fails):

1. ``reserve-N`` for each line: reserve its stock (with a timeout). Out of stock on a later
   line releases the earlier ones. Compensation: release it (one released or expired
   already is given back, an expiry not yet recorded is recorded with it; one committed
   meanwhile is not: the saga needs attention).
2. ``hold``: hold the order's total on the customer's account, as a pending transfer to the
   merchant (with a timeout). Compensation: void it (likewise, voided or expired already
   is undone, an expiry recorded if it is not yet; captured meanwhile, the saga needs
   attention).
3. ``charge`` (remote): charge the payment gateway, idempotency key derived from the saga. A
   declined payment compensates (voids the hold, releases the stock); a call that timed out
   is looked up by its key, never guessed; the step has a deadline (``payment_deadline``)
   after which it compensates. Compensation: refund by the same key.
4. ``fulfil``: capture the hold to the merchant and commit every reservation, as one linked
   list (all or nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from daybook.domain.accounts import Account, CurrencyMismatch, SameAccount
from daybook.domain.commands import AccountId, Aggregates, Check, Command, Timeout
from daybook.domain.errors import DomainError, IdTaken, InvalidAmount, InvalidRequest
from daybook.domain.holds import (
    CAPTURED,
    CaptureHold,
    ExpireHold,
    HoldExpired,
    HoldResolved,
    PlaceHold,
    VoidHold,
)
from daybook.domain.inventory import (
    CommitReservation,
    ExpireReservation,
    ReleaseReservation,
    ReservationExpired,
    ReservationResolved,
    ReserveStock,
)
from daybook.domain.linked import Atomic
from daybook.domain.sagas import (
    Local,
    Remote,
    Saga,
    SagaContext,
    SagaDefinition,
    SagaExists,
    SagaPolicy,
    Step,
)
from daybook.domain.values import MAX_AMOUNT, check_amount, check_sku, check_text, shown

#: The most lines one order may have.
MAX_LINES = 100

PAYMENTS = "payments"


@dataclass(frozen=True)
class OrderLine:
    sku: str
    quantity: int
    #: Price of one unit, in minor units of the customer's currency.
    unit_price: int


def check_lines(value: object, what: str = "lines") -> tuple[OrderLine, ...]:
    """1 to MAX_LINES lines: ``OrderLine``s, or ``(sku, quantity, unit_price)`` triples."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty list of order lines", field=what)
    if len(value) > MAX_LINES:
        raise InvalidRequest(f"an order has at most {MAX_LINES} lines, got {len(value)}")
    lines = []
    for index, line in enumerate(value):
        if isinstance(line, OrderLine):
            sku, quantity, price = line.sku, line.quantity, line.unit_price
        elif isinstance(line, Sequence) and not isinstance(line, str) and len(line) == 3:
            sku, quantity, price = line
        else:
            raise InvalidRequest(
                f"{what}[{index}] must be (sku, quantity, unit_price), got {shown(line)}",
                field=what,
                index=index,
            )
        lines.append(
            OrderLine(
                check_sku(sku),
                check_amount(quantity, f"{what}[{index}] quantity"),
                check_amount(price, f"{what}[{index}] unit_price"),
            )
        )
    return tuple(lines)


Lines = Annotated[tuple[OrderLine, ...], Check(check_lines)]


#: The longest order id: its reservations are named ``ORDER_ID/INDEX``, and a reservation id
#: has at most 100 characters (``check_reservation_id``), the index at most two digits.
MAX_ORDER_ID = 100 - len(f"/{MAX_LINES - 1}")


def check_order_id(value: object, what: str = "order_id") -> str:
    """An order id: text that can name the order's reservations (``reservation_id_of``), so
    that an order accepted is never one whose first step is refused for its name."""
    text = check_text(value, what, MAX_ORDER_ID)
    if not text.isprintable():
        raise InvalidRequest(
            f"{what} must be printable characters (it names the order's reservations), got "
            f"{shown(value)}",
            field=what,
        )
    return text


OrderId = Annotated[str, Check(check_order_id)]


def order_saga_id(order_id: str) -> UUID:
    """An order's saga id: derived from the order id, so an order is placed at most once."""
    return uuid5(NAMESPACE_URL, f"daybook:order:{order_id}")


def hold_id_of(saga_id: UUID) -> UUID:
    return uuid5(saga_id, "hold")


def reservation_id_of(context: SagaContext, index: int) -> str:
    return f"{context.data['order_id']}/{index}"


def _reserve(index: int) -> Step:
    def build(context: SagaContext) -> Command:
        line = context.data["lines"][index]
        return ReserveStock(
            line["sku"],
            line["quantity"],
            timeout=context.data["reservation_timeout"],
            reservation_id=reservation_id_of(context, index),
        )

    def release(context: SagaContext) -> Command:
        line = context.data["lines"][index]
        return ReleaseReservation(line["sku"], reservation_id_of(context, index))

    def expire(context: SagaContext, refusal: DomainError) -> Command | None:
        if refusal.code != ReservationExpired.code:  # (``reservation_resolved``: recorded)
            return None
        line = context.data["lines"][index]
        return ExpireReservation(line["sku"], reservation_id_of(context, index))

    return Step(
        f"reserve-{index}",
        Local(build),
        Local(
            release,
            done_when=frozenset({"reservation_expired", "reservation_resolved"}),
            kept_when=_shipped,
            record_lapse=expire,
        ),
    )


def _shipped(refusal: DomainError) -> str | None:
    """A reservation committed meanwhile (its id is derivable: anyone may ship it) is not
    given back by the release it refuses, as one released or expired is."""
    if refusal.code != ReservationResolved.code or refusal.details.get("resolution") not in (
        "committed",
        "unknown",  # shipped without its record, perhaps: a person decides
    ):
        return None
    return (
        f"{refusal.message}, though the order did not complete: a person decides what "
        "becomes of them"
    )


def _captured(refusal: DomainError) -> str | None:
    """A hold captured meanwhile (its id is derivable, and it shows in open holds) is not
    undone by the void it refuses, as one voided or expired is."""
    if refusal.code != HoldResolved.code or refusal.details.get("resolution") != CAPTURED:
        return None
    return (
        f"hold {refusal.details.get('hold_id')} was captured, though the order did not "
        "complete: the customer's money went to the merchant; a person decides whether it "
        "goes back"
    )


def _hold(context: SagaContext) -> Command:
    data = context.data
    return PlaceHold(
        data["customer"],
        data["total"],
        destination=data["merchant"],
        timeout=data["hold_timeout"],
        hold_id=hold_id_of(context.saga_id),
    )


def _void(context: SagaContext) -> Command:
    return VoidHold(hold_id_of(context.saga_id))


def _expire(context: SagaContext, refusal: DomainError) -> Command | None:
    """The expiry a void refused as expired relied on, unless it is recorded already."""
    if refusal.code != HoldExpired.code or refusal.details.get("recorded"):
        return None
    return ExpireHold(hold_id_of(context.saga_id))


def _charge(context: SagaContext) -> Mapping[str, Any]:
    data = context.data
    return {
        "amount": data["total"],
        "currency": data["currency"],
        "customer": data["customer"],
        "reference": data["order_id"],
    }


def _fulfil(context: SagaContext) -> Command:
    lines = context.data["lines"]
    commits: list[Command] = [
        CommitReservation(line["sku"], reservation_id_of(context, index))
        for index, line in enumerate(lines)
    ]
    return Atomic((CaptureHold(hold_id_of(context.saga_id)), *commits))


def _plan(data: Mapping[str, Any]) -> tuple[Step, ...]:
    return (
        *(_reserve(index) for index in range(len(data["lines"]))),
        Step(
            "hold",
            Local(_hold),
            Local(
                _void,
                done_when=frozenset({"hold_expired", "hold_resolved"}),
                kept_when=_captured,
                record_lapse=_expire,
            ),
        ),
        Step(
            "charge",
            Remote(PAYMENTS, "charge", _charge),
            Remote(PAYMENTS, "refund", _charge),
            deadline=data["payment_deadline"],
        ),
        Step("fulfil", Local(_fulfil)),
    )


ORDER = SagaDefinition("order", plan=_plan, policy=SagaPolicy())


class PlaceOrder(Command):
    """Place an order: start the order saga (the saga processor drives it)."""

    generated_method = False

    order_id: OrderId
    customer: AccountId
    merchant: AccountId
    lines: Lines
    reservation_timeout: Timeout = 900
    hold_timeout: Timeout = 900
    payment_deadline: Timeout = 300

    def payload(self) -> dict[str, Any]:
        payload = super().payload()
        payload["lines"] = [[line.sku, line.quantity, line.unit_price] for line in self.lines]
        return payload

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga_id = order_saga_id(self.order_id)
        if aggregates.find(Saga, saga_id) is not None:
            raise SagaExists(
                f"order {self.order_id!r} was placed already (saga {saga_id})",
                order_id=self.order_id,
                saga_id=str(saga_id),
            )
        if aggregates.taken(Saga, saga_id):  # the id is public: an account may have it
            raise IdTaken(
                f"order {self.order_id!r} cannot be placed: its saga's id {saga_id} is used by "
                "another kind of record (an account opened with that id, say); place the "
                "order under another order id",
                id=str(saga_id),
                kind=Saga.__name__,
                order_id=self.order_id,
                saga_id=str(saga_id),
            )
        # The order's hold moves the customer's money to the merchant: an order whose hold
        # would be refused is refused here, before a saga starts only to compensate. (The
        # customer is looked up first: an account that does not exist is not found, as in
        # a transfer.)
        customer = aggregates.get(Account, self.customer)
        if self.customer == self.merchant:
            raise SameAccount(
                f"order {self.order_id!r} is paid by account {self.customer} to itself; the "
                "merchant must be another account",
                account_id=str(self.customer),
            )
        merchant = aggregates.get(Account, self.merchant)
        customer.check_open()
        merchant.check_open()
        if merchant.currency != customer.currency:
            raise CurrencyMismatch(
                f"order {self.order_id!r}: the customer's account {customer.id} holds "
                f"{customer.currency} but the merchant's account {merchant.id} holds "
                f"{merchant.currency}; an order is paid in one currency",
                source_currency=customer.currency,
                destination_currency=merchant.currency,
            )
        total = sum(line.quantity * line.unit_price for line in self.lines)
        if total > MAX_AMOUNT:
            raise InvalidAmount(
                f"order {self.order_id!r} totals {total}, past {MAX_AMOUNT}", total=str(total)
            )
        data = {
            "order_id": self.order_id,
            "customer": str(self.customer),
            "merchant": str(self.merchant),
            "currency": customer.currency,
            "lines": [
                {"sku": line.sku, "quantity": line.quantity, "unit_price": line.unit_price}
                for line in self.lines
            ],
            "total": total,
            "reservation_timeout": self.reservation_timeout,
            "hold_timeout": self.hold_timeout,
            "payment_deadline": self.payment_deadline,
        }
        saga = aggregates.add(Saga._create(Saga.Started, id=saga_id, kind=ORDER.name, data=data))
        if aggregates.now is None:
            msg = "an order was placed without the ledger's clock"
            raise RuntimeError(msg)
        saga.enter_step(aggregates.now)
        return {"saga_id": saga_id, "account_id": self.customer}
