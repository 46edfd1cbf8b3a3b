"""The sagas read model agrees with the write side (``ledger.saga``) once caught up: its step
too, which ``daybook sagas list`` and the dashboard show."""

from __future__ import annotations

from pathlib import Path

import pytest

from daybook import open_ledger, place_order, run_projections
from daybook.infrastructure.bootstrap import saga_processor
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.projections import SAGA_LIST


@pytest.mark.parametrize(
    ("decline_rate", "state", "step"),
    [(1.0, "compensated", "charge"), (0.0, "completed", None)],
    ids=["declined", "paid"],
)
def test_a_finished_sagas_step_agrees_with_the_write_side(
    tmp_path: Path, decline_rate: float, state: str, step: str | None
) -> None:
    """It kept the last step it had moved to: ``reserve-0`` for an order compensated after
    its charge was declined (the write side: ``charge``), ``fulfil`` for a completed one
    (the write side: none)."""
    gateway = FakeGatewayServer(Knobs(decline_rate=decline_rate, seed=3)).start()
    try:
        with open_ledger(f"sqlite:///{tmp_path}/ledger.db") as ledger:
            customer = ledger.open_account("ann", "EUR").account_id
            merchant = ledger.open_account("shop", "EUR").account_id
            assert customer is not None and merchant is not None
            ledger.deposit(customer, 50_000)
            ledger.receive_stock("KETTLE", 5)
            with run_projections(ledger, f"sqlite:///{tmp_path}/views.db") as runner:
                processor = saga_processor(ledger, runner.views, HttpPaymentGateway(gateway.url))
                saga_id = place_order(
                    ledger, "o-1", customer, merchant, [("KETTLE", 1, 4_500)], payment_deadline=120
                ).saga_id
                assert saga_id is not None
                processor.drive(saga_id)
                processor.stop()
                row = runner.views.row(
                    SAGA_LIST, "sagas", (str(saga_id),), min_position=ledger.head(), timeout=10
                ).value
                written = ledger.saga(saga_id)
    finally:
        gateway.stop()
    assert row is not None and row["state"] == written.state == state
    assert (row["step"], written.step) == (step, step)
