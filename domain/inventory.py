"""Inventory: stock of one SKU, reserved before it ships, never oversold."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from daybook.domain.errors import (
    InvalidAmount,
    InvalidRequest,
    OutOfStock,
    ReservationExists,
    ReservationNotFound,
    ReservationResolved,
    StockBelowReserved,
    StockOverflow,
)
from daybook.domain.events import LedgerAggregate
from daybook.domain.values import MAX_AMOUNT


class Inventory(LedgerAggregate):
    """Stock of one SKU. Invariants: 0 <= reserved <= on_hand, and each reservation
    resolves (commit or release) exactly once."""

    if TYPE_CHECKING:  # set by events; not constructor fields (the metaclass reads annotations)
        sku: str
        on_hand: int
        reserved: int
        reservations: dict[str, int]
        resolved: set[str]

    class Created(LedgerAggregate.Created):
        sku: str

        def apply(self, inventory: Inventory) -> None:
            inventory.sku = self.sku
            inventory.on_hand = 0
            inventory.reserved = 0
            inventory.reservations = {}
            inventory.resolved = set()

    class StockReceived(LedgerAggregate.Event):
        quantity: int

        def apply(self, inventory: Inventory) -> None:
            inventory.on_hand += self.quantity

    class StockAdjusted(LedgerAggregate.Event):
        delta: int
        reason: str

        def apply(self, inventory: Inventory) -> None:
            inventory.on_hand += self.delta

    class StockReserved(LedgerAggregate.Event):
        reservation_id: str
        quantity: int

        def apply(self, inventory: Inventory) -> None:
            inventory.reservations[self.reservation_id] = self.quantity
            inventory.reserved += self.quantity

    class ReservationCommitted(LedgerAggregate.Event):
        """Shipped: ``shipped`` units leave stock, ``released`` go back to available."""

        reservation_id: str
        shipped: int
        released: int

        def apply(self, inventory: Inventory) -> None:
            del inventory.reservations[self.reservation_id]
            inventory.resolved.add(self.reservation_id)
            inventory.reserved -= self.shipped + self.released
            inventory.on_hand -= self.shipped

    class ReservationReleased(LedgerAggregate.Event):
        reservation_id: str
        quantity: int

        def apply(self, inventory: Inventory) -> None:
            del inventory.reservations[self.reservation_id]
            inventory.resolved.add(self.reservation_id)
            inventory.reserved -= self.quantity

    @classmethod
    def create(cls, inventory_id: UUID, sku: str) -> Inventory:
        return cls._create(cls.Created, id=inventory_id, sku=sku)

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def receive(self, quantity: int) -> None:
        if self.on_hand + quantity > MAX_AMOUNT:
            raise StockOverflow(
                f"SKU {self.sku} has {self.on_hand} on hand; receiving {quantity} would pass "
                f"{MAX_AMOUNT}",
                sku=self.sku,
                on_hand=self.on_hand,
                quantity=quantity,
            )
        self.trigger_event(self.StockReceived, quantity=quantity)

    def adjust(self, delta: int, reason: str) -> None:
        """A stock count correction; on hand may not fall below what is reserved."""
        after = self.on_hand + delta
        if after > MAX_AMOUNT:
            raise StockOverflow(
                f"SKU {self.sku}: adjusting {self.on_hand} by {delta} would pass {MAX_AMOUNT}",
                sku=self.sku,
                on_hand=self.on_hand,
                delta=delta,
            )
        if after < self.reserved:
            raise StockBelowReserved(
                f"SKU {self.sku} has {self.on_hand} on hand and {self.reserved} reserved; "
                f"adjusting by {delta} would leave {after}, below what is reserved",
                sku=self.sku,
                on_hand=self.on_hand,
                reserved=self.reserved,
                delta=delta,
            )
        self.trigger_event(self.StockAdjusted, delta=delta, reason=reason)

    def reserve(self, reservation_id: str, quantity: int) -> None:
        if reservation_id in self.reservations or reservation_id in self.resolved:
            raise ReservationExists(
                f"SKU {self.sku} already has a reservation {reservation_id!r}",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        if quantity > self.available:
            raise OutOfStock(
                f"SKU {self.sku} has {self.available} available ({self.on_hand} on hand, "
                f"{self.reserved} reserved); cannot reserve {quantity}",
                sku=self.sku,
                available=self.available,
                on_hand=self.on_hand,
                reserved=self.reserved,
                quantity=quantity,
            )
        self.trigger_event(self.StockReserved, reservation_id=reservation_id, quantity=quantity)

    def _open_reservation(self, reservation_id: str) -> int:
        if reservation_id in self.resolved:
            raise ReservationResolved(
                f"reservation {reservation_id!r} of SKU {self.sku} was already committed or "
                "released",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        try:
            return self.reservations[reservation_id]
        except KeyError:
            raise ReservationNotFound(
                f"SKU {self.sku} has no reservation {reservation_id!r}",
                sku=self.sku,
                reservation_id=reservation_id,
            ) from None

    def commit(self, reservation_id: str, quantity: int | None = None) -> None:
        """Ship ``quantity`` units of the reservation (all by default); release the rest."""
        held = self._open_reservation(reservation_id)
        shipped = held if quantity is None else quantity
        if shipped > held:
            raise InvalidAmount(
                f"reservation {reservation_id!r} holds {held} units of SKU {self.sku}; "
                f"cannot ship {shipped}",
                sku=self.sku,
                reservation_id=reservation_id,
                held=held,
                quantity=shipped,
            )
        self.trigger_event(
            self.ReservationCommitted,
            reservation_id=reservation_id,
            shipped=shipped,
            released=held - shipped,
        )

    def release(self, reservation_id: str) -> None:
        held = self._open_reservation(reservation_id)
        self.trigger_event(self.ReservationReleased, reservation_id=reservation_id, quantity=held)


def check_reservation_id(value: object) -> str:
    """Reservation ids are short printable strings chosen by the caller or by the ledger."""
    if not isinstance(value, str) or not 0 < len(value) <= 100 or not value.isprintable():
        raise InvalidRequest(
            f"reservation_id must be 1-100 printable characters, got {value!r}",
            field="reservation_id",
        )
    return value
