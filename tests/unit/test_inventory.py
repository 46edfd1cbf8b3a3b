"""Inventory rules, on the aggregate alone (no store, no ledger)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daybook import (
    OutOfStock,
    ReservationExists,
    ReservationNotFound,
    ReservationResolved,
    StockBelowReserved,
    StockOverflow,
)
from daybook.domain.errors import DomainError, InvalidAmount, InvalidRequest
from daybook.domain.inventory import Inventory, check_reservation_id
from daybook.domain.values import MAX_AMOUNT, inventory_id


def stocked(on_hand: int = 0, **reservations: int) -> Inventory:
    """SKU-1 with ``on_hand`` received, ``reservations`` held, and no pending events."""
    inventory = Inventory.create(inventory_id("SKU-1"), "SKU-1")
    if on_hand:
        inventory.receive(on_hand)
    for reservation_id, quantity in reservations.items():
        inventory.reserve(reservation_id, quantity)
    inventory.collect_events()
    return inventory


def check_invariants(inventory: Inventory) -> None:
    assert 0 <= inventory.reserved <= inventory.on_hand
    assert inventory.available == inventory.on_hand - inventory.reserved >= 0
    assert inventory.reserved == sum(inventory.reservations.values())


def refused(inventory: Inventory, attempt: object, error_class: type[DomainError]) -> DomainError:
    """Run a command that must be refused; check it changed nothing."""
    before = (inventory.on_hand, inventory.reserved, dict(inventory.reservations))
    with pytest.raises(error_class) as caught:
        attempt()  # type: ignore[operator]
    assert (inventory.on_hand, inventory.reserved, dict(inventory.reservations)) == before
    assert inventory.collect_events() == []
    return caught.value


def test_a_new_sku_has_nothing() -> None:
    inventory = Inventory.create(inventory_id("SKU-1"), "SKU-1")
    assert (inventory.sku, inventory.on_hand, inventory.reserved, inventory.available) == (
        "SKU-1",
        0,
        0,
        0,
    )
    assert inventory.id == inventory_id("SKU-1")


def test_receive_adds_to_on_hand() -> None:
    inventory = stocked()
    inventory.receive(10)
    inventory.receive(5)
    assert (inventory.on_hand, inventory.available) == (15, 15)
    assert [type(e).__name__ for e in inventory.collect_events()] == [
        "StockReceived",
        "StockReceived",
    ]


def test_receive_past_the_maximum_is_a_stock_overflow() -> None:
    inventory = stocked(MAX_AMOUNT)
    error = refused(inventory, lambda: inventory.receive(1), StockOverflow)
    assert error.code == "stock_overflow"
    assert str(MAX_AMOUNT) in str(error)


def test_adjust_corrects_on_hand_both_ways_with_a_reason() -> None:
    inventory = stocked(10)
    inventory.adjust(-3, "count found 7")
    inventory.adjust(5, "found a box")
    assert inventory.on_hand == 12
    first, second = inventory.collect_events()
    assert isinstance(first, Inventory.StockAdjusted)
    assert (first.delta, first.reason) == (-3, "count found 7")
    assert (second.delta, second.reason) == (5, "found a box")


def test_adjust_down_to_exactly_what_is_reserved_is_allowed() -> None:
    inventory = stocked(10, r1=4)
    inventory.adjust(-6, "shrinkage")
    assert (inventory.on_hand, inventory.reserved, inventory.available) == (4, 4, 0)
    check_invariants(inventory)


def test_adjust_below_what_is_reserved_is_refused_with_the_numbers() -> None:
    inventory = stocked(10, r1=4)
    error = refused(inventory, lambda: inventory.adjust(-7, "shrinkage"), StockBelowReserved)
    assert error.code == "stock_below_reserved"
    message = str(error)
    assert "10" in message and "4" in message and "-7" in message and "3" in message
    assert error.details == {"sku": "SKU-1", "on_hand": 10, "reserved": 4, "delta": -7}


def test_adjust_below_zero_is_refused() -> None:
    inventory = stocked(3)
    refused(inventory, lambda: inventory.adjust(-4, "lost"), StockBelowReserved)


def test_adjust_past_the_maximum_is_a_stock_overflow() -> None:
    inventory = stocked(MAX_AMOUNT - 1)
    refused(inventory, lambda: inventory.adjust(2, "miscount"), StockOverflow)


def test_reserve_holds_units_out_of_available() -> None:
    inventory = stocked(10)
    inventory.reserve("r1", 3)
    inventory.reserve("r2", 7)
    assert (inventory.on_hand, inventory.reserved, inventory.available) == (10, 10, 0)
    assert inventory.reservations == {"r1": 3, "r2": 7}
    check_invariants(inventory)


def test_reserve_more_than_available_is_out_of_stock_with_the_numbers() -> None:
    inventory = stocked(10, r1=4)
    error = refused(inventory, lambda: inventory.reserve("r2", 7), OutOfStock)
    assert error.code == "out_of_stock"
    message = str(error)
    assert "6 available" in message and "10" in message and "4" in message and "7" in message
    assert error.details["available"] == 6
    assert error.details["quantity"] == 7


def test_reserve_with_nothing_received_is_out_of_stock() -> None:
    inventory = stocked()
    refused(inventory, lambda: inventory.reserve("r1", 1), OutOfStock)


@pytest.mark.parametrize("resolve", ["open", "commit", "release"])
def test_a_reservation_id_is_used_once(resolve: str) -> None:
    inventory = stocked(10, r1=2)
    if resolve == "commit":
        inventory.commit("r1")
    elif resolve == "release":
        inventory.release("r1")
    inventory.collect_events()
    # Once resolved, only its claim (which the command looks up) remembers the id was used.
    claimed = resolve != "open"
    error = refused(
        inventory, lambda: inventory.reserve("r1", 1, claimed=claimed), ReservationExists
    )
    assert error.code == "reservation_exists"
    assert "r1" in str(error)


def test_commit_in_full_ships_everything() -> None:
    inventory = stocked(10, r1=4)
    inventory.commit("r1")
    assert (inventory.on_hand, inventory.reserved, inventory.available) == (6, 0, 6)
    (event,) = inventory.collect_events()
    assert isinstance(event, Inventory.ReservationCommitted)
    assert (event.shipped, event.released) == (4, 0)
    check_invariants(inventory)


def test_commit_with_the_full_quantity_named() -> None:
    inventory = stocked(10, r1=4)
    inventory.commit("r1", 4)
    assert (inventory.on_hand, inventory.reserved) == (6, 0)


def test_partial_commit_ships_part_and_releases_the_rest() -> None:
    inventory = stocked(10, r1=4, r2=1)
    inventory.commit("r1", 3)
    assert (inventory.on_hand, inventory.reserved, inventory.available) == (7, 1, 6)
    assert inventory.reservations == {"r2": 1}
    (event,) = inventory.collect_events()
    assert (event.shipped, event.released) == (3, 1)
    check_invariants(inventory)


def test_commit_more_than_held_is_an_invalid_amount() -> None:
    inventory = stocked(10, r1=4)
    error = refused(inventory, lambda: inventory.commit("r1", 5), InvalidAmount)
    assert error.code == "invalid_amount"
    assert "4" in str(error) and "5" in str(error)


def test_release_gives_the_units_back() -> None:
    inventory = stocked(10, r1=4)
    inventory.release("r1")
    assert (inventory.on_hand, inventory.reserved, inventory.available) == (10, 0, 10)
    (event,) = inventory.collect_events()
    assert isinstance(event, Inventory.ReservationReleased)
    assert event.quantity == 4
    check_invariants(inventory)


@pytest.mark.parametrize("first", ["commit", "partial", "release"])
@pytest.mark.parametrize("second", ["commit", "partial", "release"])
def test_each_reservation_resolves_exactly_once(first: str, second: str) -> None:
    inventory = stocked(10, r1=4)

    def resolve(how: str) -> None:
        if how == "commit":
            inventory.commit("r1", claimed=True)
        elif how == "partial":
            inventory.commit("r1", 1, claimed=True)
        else:
            inventory.release("r1", claimed=True)

    resolve(first)
    inventory.collect_events()
    error = refused(inventory, lambda: resolve(second), ReservationResolved)
    assert error.code == "reservation_resolved"
    assert "r1" in str(error)


def test_unknown_reservations_are_not_found() -> None:
    inventory = stocked(10, r1=4)
    for attempt in (lambda: inventory.commit("nope"), lambda: inventory.release("nope")):
        error = refused(inventory, attempt, ReservationNotFound)
        assert error.code == "reservation_not_found"
        assert "nope" in str(error)


def test_state_is_rebuilt_from_the_events() -> None:
    inventory = Inventory.create(inventory_id("SKU-1"), "SKU-1")
    inventory.receive(10)
    inventory.reserve("r1", 3)
    inventory.reserve("r2", 2)
    inventory.commit("r1", 2)
    inventory.release("r2")
    inventory.adjust(-1, "broken")
    rebuilt = None
    for event in inventory.collect_events():
        rebuilt = event.mutate(rebuilt)
    assert isinstance(rebuilt, Inventory)
    assert (rebuilt.on_hand, rebuilt.reserved, rebuilt.reservations) == (7, 0, {})
    assert rebuilt.unclaimed == set()  # resolved reservations leave no trace in the state


@pytest.mark.parametrize("value", ["r-1", "order 7", "x" * 100, "ü"])
def test_reservation_ids(value: str) -> None:
    assert check_reservation_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 101, "a\nb", "\x00", None, 7], ids=repr)
def test_bad_reservation_ids_are_invalid_requests(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_reservation_id(value)
    assert caught.value.code == "invalid_request"


stock_operations = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), st.integers(1, 20)),
        st.tuples(st.just("adjust"), st.integers(-20, 20).filter(bool)),
        st.tuples(st.just("reserve"), st.integers(1, 20)),
        st.tuples(st.just("commit"), st.integers(0, 20)),
        st.tuples(st.just("release"), st.integers(0, 20)),
    ),
    max_size=50,
)


@given(stock_operations)
def test_invariants_hold_whatever_is_tried(operations: list[tuple[str, int]]) -> None:
    inventory = stocked()
    issued: list[str] = []
    for name, number in operations:
        try:
            if name == "receive":
                inventory.receive(number)
            elif name == "adjust":
                inventory.adjust(number, "count")
            elif name == "reserve":
                issued.append(f"r{len(issued)}")
                inventory.reserve(issued[-1], number)
            elif issued:
                reservation_id = issued[number % len(issued)]
                if name == "commit":
                    inventory.commit(reservation_id, number or None)
                else:
                    inventory.release(reservation_id)
        except DomainError:
            assert inventory.collect_events() == []
        inventory.collect_events()
        check_invariants(inventory)


def test_a_clone_changes_independently_of_its_original() -> None:
    original = stocked(10, order_1=3)
    copy = original.clone()
    copy.reserve("order_2", 2)
    copy.commit("order_1")
    assert original.reservations == {"order_1": 3}
    assert original.pending_events == []
    assert copy.reservations == {"order_2": 2}


def test_a_reservation_never_ships_more_than_is_on_hand() -> None:
    """A log written before reservations recorded the lapses they rely on may hold two
    reservations of the same units (one made while the other had lapsed): the second to
    ship is refused rather than taking stock below zero."""
    from datetime import UTC, datetime, timedelta

    start = datetime(2030, 1, 1, tzinfo=UTC)
    inventory = stocked(10)
    inventory.reserve("r-1", 10, start + timedelta(seconds=60))
    # What such a writer wrote: r-2's reservation, without r-1's expiry.
    inventory.trigger_event(
        Inventory.StockReserved, reservation_id="r-2", quantity=10, expires_at=None
    )
    inventory.collect_events()
    inventory.as_of = start + timedelta(seconds=59)
    inventory.commit("r-1")
    inventory.collect_events()
    error = refused(inventory, lambda: inventory.commit("r-2"), OutOfStock)
    assert error.details["on_hand"] == 0 and error.details["quantity"] == 10
