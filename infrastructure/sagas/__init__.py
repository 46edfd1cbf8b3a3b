"""Sagas in motion: the processor that drives them, its circuit breakers, reconciliation
against the payment gateway, and ``daybook sagas``."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from daybook.domain.commands import Receipt
from daybook.domain.orders import OrderLine, PlaceOrder
from daybook.infrastructure.ledger.facade import Ledger


def place_order(
    ledger: Ledger,
    order_id: str,
    customer: UUID | str,
    merchant: UUID | str,
    lines: Sequence[OrderLine | tuple[str, int, int]],
    *,
    reservation_timeout: int = 900,
    hold_timeout: int = 900,
    payment_deadline: int = 300,
    request_id: str | None = None,
) -> Receipt:
    """Place an order (the order saga; see ``daybook.domain.orders``): the receipt names its
    saga (``receipt.saga_id``), which the saga processor drives to completed or compensated.
    ``lines``: ``(sku, quantity, unit_price)``; timeouts and the deadline in seconds."""
    given = {} if request_id is None else {"request_id": request_id}
    return ledger.execute(
        PlaceOrder(
            order_id,
            customer,  # type: ignore[arg-type]  # text is checked and kept as a UUID
            merchant,  # type: ignore[arg-type]
            lines,  # type: ignore[arg-type]  # checked and kept as a tuple of OrderLine
            reservation_timeout=reservation_timeout,
            hold_timeout=hold_timeout,
            payment_deadline=payment_deadline,
            **given,
        )
    )
