"""Open holds and expiring reservations, soonest expiry first: for "expiring soon" dashboards
and for the sweeper that records expiries.

A row stays until the hold (or reservation) is captured, voided, committed, released, or its
expiry is recorded; a row whose ``expires_at`` has passed is an expiry not recorded yet (it
no longer counts against ``available`` on the write side).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from daybook.domain.holds import Hold
from daybook.domain.inventory import Inventory
from daybook.projections.model import (
    Column,
    LogEvent,
    Projection,
    Rows,
    Table,
    event_type,
    iso_time,
)

PLACED = event_type(Hold.Placed)
CAPTURED = event_type(Hold.Captured)
VOIDED = event_type(Hold.Voided)
EXPIRED = event_type(Hold.Expired)
SKU_CREATED = event_type(Inventory.Created)
RESERVED = event_type(Inventory.StockReserved)
COMMITTED = event_type(Inventory.ReservationCommitted)
RELEASED = event_type(Inventory.ReservationReleased)
RESERVATION_EXPIRED = event_type(Inventory.ReservationExpired)

OPEN_HOLDS = Table(
    "open_holds",
    (
        Column("hold_key"),  # the hold aggregate's id
        Column("hold_id"),
        Column("account_id"),
        Column("destination", nullable=True),
        Column("amount", "bigint"),
        Column("currency"),
        Column("expires_at"),
        Column("placed_at"),
        Column("position", "bigint"),
    ),
    key=("hold_key",),
    indexes=(("account_id", "expires_at"), ("expires_at",)),
)

EXPIRING_RESERVATIONS = Table(
    "expiring_reservations",
    (
        Column("inventory_id"),
        Column("reservation_id"),
        Column("sku"),
        Column("quantity", "bigint"),
        Column("expires_at"),
        Column("position", "bigint"),
    ),
    key=("inventory_id", "reservation_id"),
    indexes=(("expires_at",),),
    label=("sku", "reservation_id"),
)

#: The SKU of each inventory (reservation events name only the inventory's id).
SKUS = Table(
    "inventory_skus", (Column("inventory_id"), Column("sku")), key=("inventory_id",), label=("sku",)
)


def instant(value: Any) -> str:
    """An instant as rows store it (``iso_time``: one shape, so text order is time order)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return iso_time(moment)


def _placed(event: LogEvent, rows: Rows) -> None:
    data = event.data
    destination = data.get("destination")
    rows.put(
        OPEN_HOLDS.name,
        {
            "hold_key": event.originator_id,
            "hold_id": str(data["hold_id"]),
            "account_id": str(data["account_id"]),
            "destination": None if destination is None else str(destination),
            "amount": int(data["amount"]),
            "currency": data["currency"],
            "expires_at": instant(data["expires_at"]),
            "placed_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


def _resolved(event: LogEvent, rows: Rows) -> None:
    rows.delete(OPEN_HOLDS.name, (event.originator_id,))


def _sku_created(event: LogEvent, rows: Rows) -> None:
    rows.put(SKUS.name, {"inventory_id": event.originator_id, "sku": event.data["sku"]})


def _reserved(event: LogEvent, rows: Rows) -> None:
    data = event.data
    if data.get("expires_at") is None:
        return
    known = rows.get(SKUS.name, (event.originator_id,))
    if known is None:
        msg = f"{event.type} at position {event.position} for unknown SKU {event.originator_id}"
        raise LookupError(msg)
    rows.put(
        EXPIRING_RESERVATIONS.name,
        {
            "inventory_id": event.originator_id,
            "reservation_id": data["reservation_id"],
            "sku": known["sku"],
            "quantity": int(data["quantity"]),
            "expires_at": instant(data["expires_at"]),
            "position": event.position,
        },
    )


def _reservation_resolved(event: LogEvent, rows: Rows) -> None:
    rows.delete(EXPIRING_RESERVATIONS.name, (event.originator_id, event.data["reservation_id"]))


OPEN_HOLDS_PROJECTION = Projection(
    name="open_holds",
    version=1,
    tables=(OPEN_HOLDS, EXPIRING_RESERVATIONS, SKUS),
    handlers={
        SKU_CREATED: _sku_created,
        PLACED: _placed,
        CAPTURED: _resolved,
        VOIDED: _resolved,
        EXPIRED: _resolved,
        RESERVED: _reserved,
        COMMITTED: _reservation_resolved,
        RELEASED: _reservation_resolved,
        RESERVATION_EXPIRED: _reservation_resolved,
    },
)
