"""Stock levels per SKU: on hand, reserved, available."""

from __future__ import annotations

from daybook.domain.inventory import Inventory
from daybook.projections.model import (
    Column,
    LogEvent,
    Projection,
    Row,
    Rows,
    Table,
    event_type,
    iso_time,
)

CREATED = event_type(Inventory.Created)
RECEIVED = event_type(Inventory.StockReceived)
ADJUSTED = event_type(Inventory.StockAdjusted)
RESERVED = event_type(Inventory.StockReserved)
COMMITTED = event_type(Inventory.ReservationCommitted)
RELEASED = event_type(Inventory.ReservationReleased)
EXPIRED = event_type(Inventory.ReservationExpired)

LEVELS = Table(
    "inventory_levels",
    (
        Column("inventory_id"),
        Column("sku"),
        Column("on_hand", "bigint"),
        Column("reserved", "bigint"),
        Column("available", "bigint"),
        Column("version", "bigint"),
        Column("last_event_at"),
        Column("position", "bigint"),
    ),
    key=("inventory_id",),
    indexes=(("sku",),),
    label=("sku",),
)


def _created(event: LogEvent, rows: Rows) -> None:
    rows.put(
        LEVELS.name,
        {
            "inventory_id": event.originator_id,
            "sku": event.data["sku"],
            "on_hand": 0,
            "reserved": 0,
            "available": 0,
            "version": event.originator_version,
            "last_event_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


def _change(event: LogEvent, rows: Rows, on_hand_delta: int, reserved_delta: int) -> None:
    row: Row | None = rows.get(LEVELS.name, (event.originator_id,))
    if row is None:
        msg = f"{event.type} at position {event.position} for unknown SKU {event.originator_id}"
        raise LookupError(msg)
    on_hand = int(row["on_hand"] or 0) + on_hand_delta
    reserved = int(row["reserved"] or 0) + reserved_delta
    rows.put(
        LEVELS.name,
        {
            **row,
            "on_hand": on_hand,
            "reserved": reserved,
            "available": on_hand - reserved,
            "version": event.originator_version,
            "last_event_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


def _received(event: LogEvent, rows: Rows) -> None:
    _change(event, rows, int(event.data["quantity"]), 0)


def _adjusted(event: LogEvent, rows: Rows) -> None:
    _change(event, rows, int(event.data["delta"]), 0)


def _reserved(event: LogEvent, rows: Rows) -> None:
    _change(event, rows, 0, int(event.data["quantity"]))


def _committed(event: LogEvent, rows: Rows) -> None:
    shipped, released = int(event.data["shipped"]), int(event.data["released"])
    _change(event, rows, -shipped, -(shipped + released))


def _released(event: LogEvent, rows: Rows) -> None:
    _change(event, rows, 0, -int(event.data["quantity"]))


INVENTORY_LEVELS = Projection(
    name="inventory_levels",
    version=1,
    tables=(LEVELS,),
    handlers={
        CREATED: _created,
        RECEIVED: _received,
        ADJUSTED: _adjusted,
        RESERVED: _reserved,
        COMMITTED: _committed,
        RELEASED: _released,
        # An expired reservation's units go back exactly as a released one's do.
        EXPIRED: _released,
    },
)
