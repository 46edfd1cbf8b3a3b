"""An older daybook's runner meeting what newer code wrote beside it (a rolling deploy)."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import orjson
import pytest
from eventsourcing.persistence import StoredEvent

from daybook import Ledger, open_ledger, run_projections
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels import StaleRead


@pytest.fixture
def ledger(shared_store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(shared_store_url)
    yield ledger
    ledger.close()


def _issued_by_newer_code() -> StoredEvent:
    """The first event of an aggregate kind that newer code adds ("Extending daybook": a
    coupon), as that code stores it; this code has no such class."""
    state = {
        "timestamp": "2026-01-01T00:00:00.000000+00:00",
        "originator_topic": "shop.coupons:Coupon",
        "meta": {"request_id": "c-1"},
        "code": "WELCOME-10",
        "value": 1000,
    }
    return StoredEvent(uuid4(), 1, "shop.coupons:Coupon.Issued", orjson.dumps(state))


def test_an_old_runner_goes_on_past_an_event_type_newer_code_added(ledger: Ledger) -> None:
    """Newer code, deployed beside this one, writes events of a type this code does not
    define. No projection of this code handles them (the stream workers pass them by); the
    runner must go on with the events it does handle, not fail for good (every old server's
    ``/health`` then 503 at once)."""
    account = ledger.open_account("ann", "EUR").account_id
    ledger.service.recorder.insert_events([_issued_by_newer_code()])
    receipt = ledger.deposit(account, 100)
    with run_projections(ledger) as runner:
        try:
            row = runner.views.balance(account, min_position=receipt.position, timeout=10)
        except StaleRead:
            row = None
        health = runner.health()
        assert health.state is not ServiceState.FAILED, health.error
        assert row is not None and row.balance == 100
