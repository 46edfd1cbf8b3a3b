"""A SKU with many lapsed reservations whose expiry is not recorded yet (no sweeper runs, or
it is behind: README) is read, and its reservations resolved, in time linear in them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daybook.domain.inventory import Inventory
from daybook.domain.values import inventory_id

LAPSED = 2_000


class Scanned(list[str]):
    """The lapsed reservations' ids, counting the ids a membership test walks through."""

    walked = 0

    def __contains__(self, item: object) -> bool:
        Scanned.walked += len(self)
        return super().__contains__(item)


@pytest.fixture
def inventory(monkeypatch: pytest.MonkeyPatch) -> Inventory:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    inventory = Inventory.create(inventory_id("SKU-1"), "SKU-1")
    inventory.receive(1_000_000)
    for number in range(LAPSED):
        inventory.reserve(f"r-{number}", 1, start + timedelta(seconds=10))
    inventory.collect_events()
    inventory.as_of = start + timedelta(seconds=11)
    lapsed = Inventory._lapsed

    def counted(self: Inventory) -> Any:
        return Scanned(lapsed(self))

    monkeypatch.setattr(Inventory, "_lapsed", counted)
    Scanned.walked = 0
    return inventory


def test_a_view_walks_the_lapsed_reservations_once_not_once_per_reservation(
    inventory: Inventory,
) -> None:
    """``view()`` (``ledger.inventory``) tested each open reservation for membership in a
    list of the lapsed ones: 20,000 lapsed took seconds per read."""
    view = inventory.view()
    assert (view.reserved, view.available, view.reservations) == (0, 1_000_000, {})
    assert Scanned.walked <= LAPSED, Scanned.walked


def test_expiring_one_reservation_does_not_walk_every_lapsed_one(inventory: Inventory) -> None:
    """A sweeper recording m expiries walked the n lapsed ones for each: n * m."""
    for number in range(10):
        inventory.expire(f"r-{number}")
    assert Scanned.walked <= LAPSED, Scanned.walked
