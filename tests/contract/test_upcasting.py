"""Old events stay readable: a version-1 ``Account.Opened`` (no overdraft) on every backend;
``StockReserved`` of every version."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import UUID, uuid4

import orjson
import pytest
from eventsourcing.persistence import StoredEvent

from daybook import InsufficientFunds, Ledger, open_ledger
from daybook.domain.accounts import Account
from daybook.domain.inventory import Inventory
from daybook.domain.values import inventory_id


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


def version_1_opened(account_id: UUID, owner: str = "olga", currency: str = "EUR") -> StoredEvent:
    """An ``Account.Opened`` as schema version 1 wrote it: no overdraft, no class_version."""
    state = {
        "timestamp": "2023-01-31T09:15:00.123456+00:00",
        "originator_topic": "domain.accounts:Account",
        "meta": {"request_id": "legacy-1", "correlation_id": "legacy-1", "causation_id": None},
        "owner": owner,
        "currency": currency,
    }
    return StoredEvent(
        originator_id=account_id,
        originator_version=1,
        topic="domain.accounts:Account.Opened",
        state=orjson.dumps(state),
    )


def test_a_version_1_account_reads_with_no_overdraft(ledger: Ledger) -> None:
    account_id = uuid4()
    ledger.service.recorder.insert_events([version_1_opened(account_id)])
    assert ledger.head() == 1

    view = ledger.account(account_id)
    assert (view.owner, view.currency, view.status) == ("olga", "EUR", "open")
    assert (view.balance, view.overdraft_limit, view.available, view.version) == (0, 0, 0, 1)

    (notification,) = ledger.service.recorder.select_notifications(1, 10)
    event = ledger.service.mapper.to_domain_event(notification)
    assert isinstance(event, Account.Opened)
    assert event.overdraft_limit == 0
    assert event.meta.request_id == "legacy-1"
    assert event.timestamp.microsecond == 123456


def test_a_version_1_account_accepts_commands(ledger: Ledger) -> None:
    account_id, other = uuid4(), uuid4()
    ledger.service.recorder.insert_events(
        [version_1_opened(account_id), version_1_opened(other, "ivan")]
    )

    ledger.deposit(account_id, 500)
    with pytest.raises(InsufficientFunds) as caught:
        ledger.withdraw(account_id, 501)  # the upcast limit is zero: no overdraft
    assert "overdraft limit 0" in str(caught.value)
    ledger.transfer(account_id, other, 200)
    ledger.withdraw(account_id, 300)
    assert ledger.account(account_id).balance == 0
    assert ledger.account(other).balance == 200
    ledger.close_account(account_id)
    assert ledger.account(account_id).status == "closed"
    assert ledger.account(account_id).version == 5


def test_a_version_1_account_next_to_current_ones(ledger: Ledger) -> None:
    modern = ledger.open_account("nina", "EUR", overdraft_limit=50).account_id
    legacy = uuid4()
    ledger.service.recorder.insert_events([version_1_opened(legacy)])
    ledger.transfer(modern, legacy, 50)
    assert ledger.account(modern).balance == -50
    assert ledger.account(legacy).balance == 50

    stored = ledger.service.recorder.select_events(modern, limit=1)[0]
    assert orjson.loads(stored.state)["class_version"] == 2
    assert orjson.loads(stored.state)["overdraft_limit"] == 50


def test_the_upcaster_is_applied_by_the_mapper(ledger: Ledger) -> None:
    state = ledger.service.mapper.decode_state(version_1_opened(UUID(int=5)))  # type: ignore[attr-defined]
    assert state["overdraft_limit"] == 0
    assert "class_version" not in state


def test_stock_reserved_reads_claimed_as_written_and_unclaimed_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``claimed`` says whether a claim marks the reservation id as used. Version 2 events
    were written with it and without it (by code that made no claims): those without it
    have none, as version 1 ones."""
    with open_ledger("memory://") as ledger:
        ledger.receive_stock("SKU-1", 5)
        ledger.reserve_stock("SKU-1", 1, reservation_id="r-1")
        (stored,) = [
            event
            for event in ledger.service.recorder.select_events(inventory_id("SKU-1"))
            if event.topic.endswith("StockReserved")
        ]
        written = orjson.loads(stored.state)
        assert (written["class_version"], written["claimed"]) == (3, True)
        mapper = ledger.service.mapper

        def read(state: dict[str, object]) -> Inventory.StockReserved:
            again = StoredEvent(stored.originator_id, 2, stored.topic, orjson.dumps(state))
            event = mapper.to_domain_event(again)
            assert isinstance(event, Inventory.StockReserved)
            return event

        assert read(written).claimed
        assert read({**written, "class_version": 2}).claimed
        without = {k: v for k, v in written.items() if k != "claimed"}
        assert not read({**without, "class_version": 2}).claimed
        version_1 = {k: v for k, v in without.items() if k not in ("class_version", "expires_at")}
        assert (read(version_1).claimed, read(version_1).expires_at) == (False, None)

        # A process still running the code of version 2 (a rolling upgrade) reads a version
        # 3 event as one of its own: the fields are the same, ``claimed`` always written.
        monkeypatch.setattr(Inventory.StockReserved, "class_version", 2)
        assert read(written).claimed
        assert read(written).reservation_id == "r-1"
