"""Inventory: stock of one SKU, reserved before it ships, never oversold.

The aggregate (found by its SKU), the rules it refuses by, the view readers get, and the
commands that change stock, each with its handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID, uuid5

from daybook.domain.commands import (
    Aggregates,
    Amount,
    Check,
    Command,
    Delta,
    OptionalAmount,
    OptionalTimeout,
    Sku,
    Text,
    find_to_create,
    generated,
)
from daybook.domain.errors import DomainError, IdTaken, InvalidAmount, InvalidRequest
from daybook.domain.events import LedgerAggregate
from daybook.domain.ids import new_id_text
from daybook.domain.values import MAX_AMOUNT, check_new_sku, check_sku, inventory_id, shown


class SkuNotFound(DomainError):
    """No stock was ever received for this SKU."""

    code = "sku_not_found"


class OutOfStock(DomainError):
    """A reservation asks for more than is available."""

    code = "out_of_stock"


class StockBelowReserved(DomainError):
    """An adjustment would leave less stock on hand than is reserved."""

    code = "stock_below_reserved"


class StockOverflow(DomainError):
    """Receiving or adjusting would take on-hand stock past 2**63-1."""

    code = "stock_overflow"


class ReservationNotFound(DomainError):
    """No reservation has this id for this SKU."""

    code = "reservation_not_found"


class ReservationResolved(DomainError):
    """The reservation was already committed or released (a release refused for one that
    was committed says so: ``details["resolution"]`` is ``committed``; ``unknown`` when its
    shipment record's id is another kind of record's, so that it may have shipped)."""

    code = "reservation_resolved"


class ReservationExists(DomainError):
    """A reservation id was used twice for one SKU."""

    code = "reservation_exists"


class ReservationExpired(DomainError):
    """The reservation's timeout has passed: its units are available again."""

    code = "reservation_expired"


class ReservationNotExpired(DomainError):
    """An expiry was asked for before the reservation's timeout passed (or it has none)."""

    code = "reservation_not_expired"


@dataclass(frozen=True)
class StockView:
    """A SKU's stock, read from the log (strongly consistent)."""

    sku: str
    on_hand: int
    reserved: int
    available: int
    reservations: dict[str, int]
    version: int


class Inventory(LedgerAggregate):
    """Stock of one SKU. Invariants: 0 <= reserved <= on_hand, and each reservation
    resolves (commit or release) exactly once.

    Only open reservations are live state. That a reservation id was used at all (so it
    cannot be reserved again, and resolving it again is "resolved", not "not found") is
    kept by its own ``ReservationClaim``, which the commands look up: a SKU does not grow
    with its history. Reservations made without a claim (``StockReserved`` schema version
    1, and version 2 stored without ``claimed``) are remembered in ``unclaimed``, which no
    new reservation joins.
    """

    key_name = "sku"
    read_as = "inventory"
    replay_only = frozenset({"unclaimed"})

    if TYPE_CHECKING:  # set by events; not constructor fields (the metaclass reads annotations)
        sku: str
        on_hand: int
        reserved: int
        reservations: dict[str, int]
        unclaimed: set[str]
        #: When reservations made with a timeout expire: reservation id -> instant.
        expiring: dict[str, datetime]

    class Created(LedgerAggregate.Created):
        sku: str

        def apply(self, inventory: Inventory) -> None:
            inventory.sku = self.sku
            inventory.on_hand = 0
            inventory.reserved = 0
            inventory.reservations = {}
            inventory.unclaimed = set()
            inventory.expiring = {}

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
        """Units set aside; with ``expires_at`` they stop counting as reserved at that
        instant. Schema v2 added ``expires_at``, and ``claimed`` in some of its events; v3
        has the same fields as v2, ``claimed`` always written."""

        class_version = 3
        reservation_id: str
        quantity: int
        expires_at: datetime | None
        #: Whether a ``ReservationClaim`` marks the id as used.
        claimed: bool = True

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Version 1 reservations had no timeout."""
            state["expires_at"] = None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            """Two lines of development raised the event to version 2: one added
            ``expires_at`` and made no claims (it remembered used ids in the SKU), the other
            also ``claimed``. A version 2 event without ``claimed`` has no claim, like a
            version 1 one; one with it says whether it has, and is kept as written."""
            state.setdefault("claimed", False)

        def apply(self, inventory: Inventory) -> None:
            inventory.reservations[self.reservation_id] = self.quantity
            inventory.reserved += self.quantity
            if self.expires_at is not None:
                inventory.expiring[self.reservation_id] = self.expires_at
            if not self.claimed:  # only replays meet these (see replay_only)
                inventory.unclaimed.add(self.reservation_id)

    class ReservationCommitted(LedgerAggregate.Event):
        """Shipped: ``shipped`` units leave stock, ``released`` go back to available."""

        reservation_id: str
        shipped: int
        released: int

        def apply(self, inventory: Inventory) -> None:
            del inventory.reservations[self.reservation_id]
            inventory.expiring.pop(self.reservation_id, None)
            inventory.reserved -= self.shipped + self.released
            inventory.on_hand -= self.shipped

    class ReservationReleased(LedgerAggregate.Event):
        reservation_id: str
        quantity: int

        def apply(self, inventory: Inventory) -> None:
            del inventory.reservations[self.reservation_id]
            inventory.expiring.pop(self.reservation_id, None)
            inventory.reserved -= self.quantity

    class ReservationExpired(LedgerAggregate.Event):
        """A reservation's timeout passed; its units went back to available stock."""

        reservation_id: str
        quantity: int

        def apply(self, inventory: Inventory) -> None:
            del inventory.reservations[self.reservation_id]
            del inventory.expiring[self.reservation_id]
            inventory.reserved -= self.quantity

    @classmethod
    def create(cls, inventory_id: UUID, sku: str) -> Inventory:
        return cls._create(cls.Created, id=inventory_id, sku=sku)

    @classmethod
    def id_for(cls, key: Any) -> UUID:
        return inventory_id(check_sku(key))

    @classmethod
    def not_found(cls, key: Any) -> DomainError:
        return SkuNotFound(f"no stock was ever received for SKU {key!r}", sku=key)

    @classmethod
    def id_taken(cls, key: Any) -> DomainError:
        aggregate_id = cls.id_for(key)
        return IdTaken(
            f"SKU {key!r} cannot be created: its id {aggregate_id} is used by another kind "
            "of record (an account opened with that id, say); choose another SKU",
            id=str(aggregate_id),
            kind=cls.__name__,
            sku=key,
        )

    def _lapsed(self) -> list[str]:
        """Reservations whose timeout has passed at ``as_of`` (expiry perhaps unrecorded)."""
        moment = self.as_of
        if not self.expiring or moment is None:
            return []
        return [rid for rid, expires_at in self.expiring.items() if moment >= expires_at]

    def _has_lapsed(self, reservation_id: str) -> bool:
        """Whether this one reservation's timeout has passed at ``as_of`` (without listing
        every lapsed one)."""
        expires_at = self.expiring.get(reservation_id)
        return expires_at is not None and self.as_of is not None and self.as_of >= expires_at

    @property
    def held(self) -> int:
        """Units reserved at ``as_of``: a reservation stops counting the instant it expires."""
        return self.reserved - sum(self.reservations[rid] for rid in self._lapsed())

    def _record_lapses(self) -> None:
        """Record the expiry of every reservation lapsed at ``as_of``. Called by a command
        about to rely on their units, before its own event: written with it, the expiry
        changes the SKU's version, so a writer whose clock is behind (another host, or this
        one after a step back) cannot still ship a lapsed reservation's units as well; it
        meets the version, reloads, and finds the reservation resolved."""
        for reservation_id in self._lapsed():
            self.trigger_event(
                self.ReservationExpired,
                reservation_id=reservation_id,
                quantity=self.reservations[reservation_id],
            )

    @property
    def available(self) -> int:
        return self.on_hand - self.held

    def view(self) -> StockView:
        lapsed = set(self._lapsed())
        reservations = {r: q for r, q in self.reservations.items() if r not in lapsed}
        reserved = sum(reservations.values())
        return StockView(
            sku=self.sku,
            on_hand=self.on_hand,
            reserved=reserved,
            available=self.on_hand - reserved,
            reservations=reservations,
            version=self.version,
        )

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
        reserved = self.held
        if after < reserved:
            raise StockBelowReserved(
                f"SKU {self.sku} has {self.on_hand} on hand and {reserved} reserved; "
                f"adjusting by {delta} would leave {after}, below what is reserved",
                sku=self.sku,
                on_hand=self.on_hand,
                reserved=reserved,
                delta=delta,
            )
        if after < self.reserved:  # allowed only by reservations that lapsed
            self._record_lapses()
        self.trigger_event(self.StockAdjusted, delta=delta, reason=reason)

    def used(self, reservation_id: str, claimed: bool = False) -> bool:
        """Whether ``reservation_id`` was ever reserved on this SKU. ``claimed``: whether its
        ``ReservationClaim`` exists (the commands look it up; see ``is_claimed``), which the
        SKU's own state cannot tell once the reservation is resolved."""
        return claimed or reservation_id in self.reservations or reservation_id in self.unclaimed

    def reserve(
        self,
        reservation_id: str,
        quantity: int,
        expires_at: datetime | None = None,
        *,
        claimed: bool = False,
    ) -> None:
        if self.used(reservation_id, claimed):
            raise ReservationExists(
                f"SKU {self.sku} already has a reservation {reservation_id!r}",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        reserved = self.held
        available = self.on_hand - reserved
        if quantity > available:
            raise OutOfStock(
                f"SKU {self.sku} has {available} available ({self.on_hand} on hand, "
                f"{reserved} reserved); cannot reserve {quantity}",
                sku=self.sku,
                available=available,
                on_hand=self.on_hand,
                reserved=reserved,
                quantity=quantity,
            )
        if quantity > self.on_hand - self.reserved:  # allowed only by reservations that lapsed
            self._record_lapses()
        self.trigger_event(
            self.StockReserved,
            reservation_id=reservation_id,
            quantity=quantity,
            expires_at=expires_at,
        )

    def _open_reservation(self, reservation_id: str, claimed: bool = False) -> int:
        if reservation_id not in self.reservations and self.used(reservation_id, claimed):
            raise ReservationResolved(
                f"reservation {reservation_id!r} of SKU {self.sku} was already committed, "
                "released or expired",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        try:
            held = self.reservations[reservation_id]
        except KeyError:
            raise ReservationNotFound(
                f"SKU {self.sku} has no reservation {reservation_id!r}",
                sku=self.sku,
                reservation_id=reservation_id,
            ) from None
        if self._has_lapsed(reservation_id):
            expires_at = self.expiring[reservation_id]
            raise ReservationExpired(
                f"reservation {reservation_id!r} of SKU {self.sku} expired at "
                f"{expires_at.isoformat()}; its units are available again",
                sku=self.sku,
                reservation_id=reservation_id,
                expires_at=expires_at.isoformat(),
            )
        return held

    def commit(
        self, reservation_id: str, quantity: int | None = None, *, claimed: bool = False
    ) -> int:
        """Ship ``quantity`` units of the reservation (all by default); release the rest.
        Returns the units shipped."""
        held = self._open_reservation(reservation_id, claimed)
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
        if shipped > self.on_hand:
            # Never true while every reliance on a lapse is recorded (``_record_lapses``);
            # checked all the same, since stock shipped twice cannot be taken back.
            raise OutOfStock(
                f"SKU {self.sku} has {self.on_hand} on hand; cannot ship {shipped} for "
                f"reservation {reservation_id!r}",
                sku=self.sku,
                on_hand=self.on_hand,
                reservation_id=reservation_id,
                quantity=shipped,
            )
        self.trigger_event(
            self.ReservationCommitted,
            reservation_id=reservation_id,
            shipped=shipped,
            released=held - shipped,
        )
        return shipped

    def release(self, reservation_id: str, *, claimed: bool = False) -> None:
        held = self._open_reservation(reservation_id, claimed)
        self.trigger_event(self.ReservationReleased, reservation_id=reservation_id, quantity=held)

    def expire(self, reservation_id: str, *, claimed: bool = False) -> None:
        """Record the expiry of a reservation whose timeout has passed."""
        if reservation_id not in self.reservations and self.used(reservation_id, claimed):
            raise ReservationResolved(
                f"reservation {reservation_id!r} of SKU {self.sku} was already resolved",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        if reservation_id not in self.reservations:
            raise ReservationNotFound(
                f"SKU {self.sku} has no reservation {reservation_id!r}",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        if not self._has_lapsed(reservation_id):
            raise ReservationNotExpired(
                f"reservation {reservation_id!r} of SKU {self.sku} has not expired",
                sku=self.sku,
                reservation_id=reservation_id,
            )
        self.trigger_event(
            self.ReservationExpired,
            reservation_id=reservation_id,
            quantity=self.reservations[reservation_id],
        )


def check_reservation_id(value: object, what: str = "reservation_id") -> str:
    """Reservation ids are short printable strings chosen by the caller or by the ledger."""
    if not isinstance(value, str) or not 0 < len(value) <= 100 or not value.isprintable():
        raise InvalidRequest(
            f"{what} must be 1-100 printable characters, got {shown(value)}",
            field=what,
        )
    return value


ReservationId = Annotated[str, Check(check_reservation_id)]


# -- commands ---------------------------------------------------------------------------------


class ReservationClaim(LedgerAggregate):
    """That a reservation id of a SKU was used: created with the reservation, never
    changed. Found by ``(sku, reservation_id)``."""

    flat_state = True
    write_once = True
    key_name = "reservation"

    if TYPE_CHECKING:
        sku: str
        reservation_id: str

    class Claimed(LedgerAggregate.Created):
        sku: str
        reservation_id: str

        def apply(self, claim: ReservationClaim) -> None:
            claim.sku, claim.reservation_id = self.sku, self.reservation_id

    @classmethod
    def id_for(cls, key: Any) -> UUID:
        sku, reservation_id = key
        return uuid5(inventory_id(check_sku(sku)), reservation_id)

    @classmethod
    def id_taken(cls, key: Any) -> DomainError:
        sku, reservation_id = key
        aggregate_id = cls.id_for(key)
        return IdTaken(
            f"reservation id {reservation_id!r} of SKU {sku!r} cannot be used: its claim's "
            f"id {aggregate_id} is used by another kind of record (an account opened with "
            "that id, say); choose another reservation id",
            id=str(aggregate_id),
            kind=cls.__name__,
            sku=sku,
            reservation_id=reservation_id,
        )

    @classmethod
    def claim(cls, sku: str, reservation_id: str) -> ReservationClaim:
        return cls._create(
            cls.Claimed,
            id=cls.id_for((sku, reservation_id)),
            sku=sku,
            reservation_id=reservation_id,
        )


def is_claimed(
    aggregates: Aggregates, inventory: Inventory, reservation_id: str, *, to_reserve: bool = False
) -> bool:
    """Whether a claim marks ``reservation_id`` as used on ``inventory``'s SKU (looked up
    only when the SKU's own state cannot tell). Only making a reservation (``to_reserve``)
    creates the claim, so only it refuses a claim id another kind of record has: for a
    commit or release, that id means no reservation was ever made."""
    if reservation_id in inventory.reservations or reservation_id in inventory.unclaimed:
        return False  # not needed: the SKU knows
    key = (inventory.sku, reservation_id)
    if to_reserve:
        return find_to_create(aggregates, ReservationClaim, key) is not None
    return aggregates.find(ReservationClaim, key) is not None


class ReservationShipment(LedgerAggregate):
    """That a reservation was committed (shipped), and how many units: created with the
    commit, never changed. Found by ``(sku, reservation_id)``. The SKU forgets a reservation
    once resolved, and "resolved" alone does not tell shipped from released or expired; a
    release refused for a shipped reservation says so (an order saga compensating must not
    count stock gone as given back)."""

    flat_state = True
    write_once = True
    key_name = "reservation"

    if TYPE_CHECKING:
        sku: str
        reservation_id: str
        shipped: int

    class Recorded(LedgerAggregate.Created):
        sku: str
        reservation_id: str
        shipped: int

        def apply(self, shipment: ReservationShipment) -> None:
            shipment.sku, shipment.reservation_id = self.sku, self.reservation_id
            shipment.shipped = self.shipped

    @classmethod
    def id_for(cls, key: Any) -> UUID:
        # Named within the reservation's claim: no reservation id can name it as a claim.
        return uuid5(ReservationClaim.id_for(key), "shipment")

    @classmethod
    def record(cls, sku: str, reservation_id: str, shipped: int) -> ReservationShipment:
        return cls._create(
            cls.Recorded,
            id=cls.id_for((sku, reservation_id)),
            sku=sku,
            reservation_id=reservation_id,
            shipped=shipped,
        )


class ReceiveStock(Command):
    """Add received units to a SKU's stock (the first receipt creates the SKU)."""

    sku: Sku
    quantity: Amount

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        inventory = find_to_create(aggregates, Inventory, self.sku)
        if inventory is None:
            sku = check_new_sku(self.sku)
            inventory = aggregates.add(Inventory.create(inventory_id(sku), sku))
        inventory.receive(self.quantity)
        return {"sku": self.sku}


class AdjustStock(Command):
    """Correct on-hand stock after a count (``delta`` may be negative)."""

    sku: Sku
    delta: Delta
    reason: Text

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        aggregates.get(Inventory, self.sku).adjust(self.delta, self.reason)
        return {"sku": self.sku}


class ReserveStock(Command):
    """Hold ``quantity`` units for an order (for ``timeout`` seconds, if given)."""

    sku: Sku
    quantity: Amount
    timeout: OptionalTimeout = field(default=None, kw_only=True)
    reservation_id: ReservationId = generated(factory=new_id_text, kw_only=True)

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        inventory = aggregates.get(Inventory, self.sku)
        expires_at = None
        if self.timeout is not None:
            if inventory.as_of is None:
                msg = "a reservation with a timeout was made without the ledger's clock"
                raise RuntimeError(msg)
            expires_at = inventory.as_of + timedelta(seconds=self.timeout)
        inventory.reserve(
            self.reservation_id,
            self.quantity,
            expires_at,
            claimed=is_claimed(aggregates, inventory, self.reservation_id, to_reserve=True),
        )
        aggregates.add(ReservationClaim.claim(self.sku, self.reservation_id))
        return {"sku": self.sku, "reservation_id": self.reservation_id}


class CommitReservation(Command):
    """Ship a reservation, fully or ``quantity`` units of it; the rest is released."""

    sku: Sku
    reservation_id: ReservationId
    quantity: OptionalAmount = None

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        inventory = aggregates.get(Inventory, self.sku)
        shipped = inventory.commit(
            self.reservation_id,
            self.quantity,
            claimed=is_claimed(aggregates, inventory, self.reservation_id),
        )
        # The record's id is derived, and anyone may open an account on any id: one taken
        # so must not stop the shipping. The commit goes on without its record, and a later
        # release says "resolved", as for a reservation committed before records were kept.
        if not aggregates.taken(ReservationShipment, (self.sku, self.reservation_id)):
            aggregates.add(ReservationShipment.record(self.sku, self.reservation_id, shipped))
        return {"sku": self.sku, "reservation_id": self.reservation_id}


class ReleaseReservation(Command):
    """Give a reservation's units back to available stock."""

    sku: Sku
    reservation_id: ReservationId

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        inventory = aggregates.get(Inventory, self.sku)
        try:
            inventory.release(
                self.reservation_id, claimed=is_claimed(aggregates, inventory, self.reservation_id)
            )
        except ReservationResolved:
            key = (self.sku, self.reservation_id)
            shipment = aggregates.find(ReservationShipment, key)
            if shipment is None:
                if aggregates.taken(ReservationShipment, key):
                    # Another kind of record has the shipment record's id: a commit went on
                    # without its record, so "resolved" cannot tell shipped from released.
                    raise ReservationResolved(
                        f"reservation {self.reservation_id!r} of SKU {self.sku} was already "
                        "resolved, perhaps committed (its shipment record's id is used by "
                        "another kind of record, so whether it shipped is unknown)",
                        sku=self.sku,
                        reservation_id=self.reservation_id,
                        resolution="unknown",
                    ) from None
                raise
            raise ReservationResolved(
                f"reservation {self.reservation_id!r} of SKU {self.sku} was already "
                f"committed: {shipment.shipped} units shipped",
                sku=self.sku,
                reservation_id=self.reservation_id,
                resolution="committed",
                shipped=shipment.shipped,
            ) from None
        return {"sku": self.sku, "reservation_id": self.reservation_id}


class ExpireReservation(Command):
    """Record that a reservation's timeout passed (its units were free from then)."""

    sku: Sku
    reservation_id: ReservationId

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        inventory = aggregates.get(Inventory, self.sku)
        inventory.expire(
            self.reservation_id, claimed=is_claimed(aggregates, inventory, self.reservation_id)
        )
        return {"sku": self.sku, "reservation_id": self.reservation_id}
