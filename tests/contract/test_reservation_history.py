"""A SKU's live state holds its open reservations only, however many it resolved before;
and still each reservation resolves exactly once, seen from any process, also for
reservations made before this rule existed."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from daybook import (
    Ledger,
    ReservationExists,
    ReservationNotFound,
    ReservationResolved,
    open_ledger,
)
from daybook.domain.inventory import Inventory, ReserveStock
from daybook.infrastructure.ledger.cache import AggregateCache

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ledger-v0.1.db"


def live_entries(inventory: Inventory) -> int:
    """How many entries the aggregate's containers hold (what every copy of it copies)."""
    return sum(
        len(value)
        for name, value in vars(inventory).items()
        if name != "_pending_events" and isinstance(value, dict | list | set | frozenset)
    )


def reserve_and_ship(ledger: Ledger, sku: str, count: int, start: int = 0) -> None:
    for number in range(start, start + count):
        reservation = f"r-{number}"
        ledger.reserve_stock(sku, 1, reservation_id=reservation)
        if number % 2:
            ledger.commit_reservation(sku, reservation)
        else:
            ledger.release_reservation(sku, reservation)


def test_live_state_does_not_grow_with_past_reservations(store_url: str) -> None:
    with open_ledger(store_url) as ledger:
        ledger.receive_stock("SKU-1", 1_000)
        reserve_and_ship(ledger, "SKU-1", 10)
        ledger.reserve_stock("SKU-1", 2, reservation_id="open-one")
        after_ten = live_entries(ledger.read(Inventory, "SKU-1"))
        reserve_and_ship(ledger, "SKU-1", 300, start=10)
        assert live_entries(ledger.read(Inventory, "SKU-1")) == after_ten == 1
        stock = ledger.inventory("SKU-1")
        assert stock.reservations == {"open-one": 2}
        assert (stock.on_hand, stock.reserved) == (1_000 - 155, 2)


def test_reservation_claims_take_no_place_in_the_aggregate_cache(store_url: str) -> None:
    """A claim is written once and read only when the SKU's state cannot tell (a repeated
    or unknown reservation id): cached, every reservation would push a useful aggregate
    out of the cache, and a long run's memory would follow the count of reservations."""
    with open_ledger(store_url) as ledger:
        ledger.receive_stock("SKU-1", 1_000)
        reserve_and_ship(ledger, "SKU-1", 50)
        cache = ledger.service.repository.cache
        assert cache is not None
        cached = [type(cache.get(key)).__name__ for key in cache.ids()]
        assert "ReservationClaim" not in cached
        assert "Inventory" in cached
        # And still each reservation resolves exactly once, and an id is never reused.
        with pytest.raises(ReservationResolved):
            ledger.commit_reservation("SKU-1", "r-1")
        with pytest.raises(ReservationExists):
            ledger.reserve_stock("SKU-1", 1, reservation_id="r-2")
        # Refusals of repeats look claims up in the store (a shipment confirmed twice): the
        # claims they read are kept apart, in the cache's small LRU of write-once aggregates,
        # never among the live ones. (With something else cached: the store's repository
        # puts what it reads in a cache that is not empty.)
        ledger.open_account("ann", "EUR")
        for number in range(50):
            with pytest.raises(ReservationResolved):
                ledger.commit_reservation("SKU-1", f"r-{number}")
        cached = [type(cache.get(key)).__name__ for key in cache.ids()]
        assert "ReservationClaim" not in cached, cached
        assert isinstance(cache, AggregateCache)
        apart = {type(cache.get(key)).__name__ for key in cache.write_once_ids()}
        assert apart == {"ReservationClaim"} and len(cache.write_once_ids()) == 50


def assert_resolved_exactly_once(
    ledger: Ledger, sku: str, committed: str, released: str, *, shipment_recorded: bool = True
) -> None:
    for reservation in (committed, released):
        with pytest.raises(ReservationResolved):
            ledger.commit_reservation(sku, reservation)
        with pytest.raises(ReservationResolved) as refused:
            ledger.release_reservation(sku, reservation)
        # A release says whether the reservation shipped: an order saga compensating must
        # not count stock shipped as given back.
        told = shipment_recorded and reservation == committed
        shipped = {"resolution": "committed", "shipped": 1} if told else {}
        assert {k: refused.value.details.get(k) for k in shipped} == shipped
        assert ("resolution" in refused.value.details) is told
        with pytest.raises(ReservationExists):
            ledger.reserve_stock(sku, 1, reservation_id=reservation)
    with pytest.raises(ReservationNotFound):
        ledger.commit_reservation(sku, "never-made")


def test_resolved_reservations_stay_resolved_in_the_process_that_resolved_them(
    store_url: str,
) -> None:
    with open_ledger(store_url) as ledger:
        ledger.receive_stock("SKU-1", 10)
        reserve_and_ship(ledger, "SKU-1", 2)  # r-0 released, r-1 committed
        head = ledger.head()
        assert_resolved_exactly_once(ledger, "SKU-1", committed="r-1", released="r-0")
        assert ledger.head() == head


def test_resolved_reservations_stay_resolved_for_another_process(shared_store_url: str) -> None:
    with open_ledger(shared_store_url) as first:
        first.receive_stock("SKU-1", 10)
        reserve_and_ship(first, "SKU-1", 2)
    with open_ledger(shared_store_url) as second:  # nothing cached
        head = second.head()
        assert_resolved_exactly_once(second, "SKU-1", committed="r-1", released="r-0")
        assert second.head() == head


def test_a_reservation_id_used_by_another_process_is_refused(shared_store_url: str) -> None:
    """The other process knows the SKU's latest state but has never seen the id: its
    reservation is refused, not applied a second time."""
    with open_ledger(shared_store_url) as first, open_ledger(shared_store_url) as second:
        first.receive_stock("SKU-1", 10)
        assert second.inventory("SKU-1").on_hand == 10
        second.reserve_stock("SKU-1", 1, reservation_id="warm")  # second's cache: current
        first.reserve_stock("SKU-1", 1, reservation_id="taken")
        first.release_reservation("SKU-1", "taken")
        second.reserve_stock("SKU-1", 1, reservation_id="warm-2")  # catches up on the SKU
        head = second.head()
        outcomes: list[Any] = second.service.execute(
            [ReserveStock("SKU-1", 1, reservation_id="taken", request_id="reuse")]
        )
        assert isinstance(outcomes[0], ReservationExists), outcomes
        assert second.head() == head
        assert second.inventory("SKU-1").reservations == {"warm": 1, "warm-2": 1}


def test_reservations_made_before_claims_existed_stay_resolved(tmp_path: Path) -> None:
    """The v0.1 fixture: order-1 was committed and order-2 released, by daybook 0.1 (whose
    commits recorded no shipment: a release cannot say order-1 shipped)."""
    copy = tmp_path / "ledger-v0.1.db"
    shutil.copy(FIXTURE, copy)
    with open_ledger(f"sqlite:///{copy}") as ledger:
        assert_resolved_exactly_once(
            ledger, "SKU-1", committed="order-1", released="order-2", shipment_recorded=False
        )
        receipt = ledger.reserve_stock("SKU-1", 1, reservation_id="order-3")
        assert receipt.reservation_id == "order-3"
        ledger.commit_reservation("SKU-1", "order-3")
        assert_resolved_exactly_once(ledger, "SKU-1", committed="order-3", released="order-2")


def test_reservations_stored_at_version_2_without_claimed_stay_resolved(tmp_path: Path) -> None:
    """For a while daybook wrote ``StockReserved`` at schema version 2 with ``expires_at``
    but without ``claimed``, and made no claims (it remembered used ids in the SKU). Such
    a reservation has no claim, so it is remembered as the ones made before claims are:
    once resolved, its id is still used."""
    copy = tmp_path / "ledger-v0.1.db"
    shutil.copy(FIXTURE, copy)
    db = sqlite3.connect(copy)
    rows = db.execute(
        "SELECT rowid, state FROM stored_events WHERE topic LIKE '%StockReserved'"
    ).fetchall()
    assert len(rows) == 2
    for rowid, state in rows:
        written = orjson.loads(state)
        written.update(expires_at=None, class_version=2)  # as that code wrote it
        db.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?", (orjson.dumps(written), rowid)
        )
    db.commit()
    db.close()
    with open_ledger(f"sqlite:///{copy}") as ledger:
        head = ledger.head()
        assert_resolved_exactly_once(
            ledger, "SKU-1", committed="order-1", released="order-2", shipment_recorded=False
        )
        assert ledger.head() == head
