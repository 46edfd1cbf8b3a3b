"""The reconciler at its edges: an owner that changes while it folds, and how drifted rows
are named."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels import reconcile as reconcile_module
from daybook.infrastructure.readmodels.handover import handover
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from tests.projections.helpers import assert_tables_match, workload

GROUP, TOPIC = "g", "events"


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


@pytest.mark.postgres
@pytest.mark.parametrize("to", ["stream", "runner"])
@pytest.mark.parametrize("name", ["daily_activity"])
def test_a_handover_during_the_fold_neither_reports_drift_nor_repairs_it_in(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch, to: str, name: str
) -> None:
    """A healthy version is handed to another owner while the reconciler folds the log
    (minutes on a long log, no lock held): the run must not fold the log twice, report
    every row drifted, and --repair must not write the doubled rows into the read model."""
    workload(ledger, 120)
    log = event_log_of(ledger)
    projection = projections.by_name(name)
    runner = ProjectionRunner(log, pg_url, [projection])
    runner.run_until_caught_up()
    runner.stop()
    if to == "runner":  # start with the group owning it, hand it back during the fold
        handover(log, pg_url, [projection], f"stream:{GROUP}", topic=TOPIC, partitions=4)
    target = f"stream:{GROUP}" if to == "stream" else "runner"
    advance = reconcile_module.Fold.advance
    calls: list[int] = []

    def advance_then_hand_over(self: Any, point: Any, partitions: Any) -> None:
        advance(self, point, partitions)
        calls.append(1)
        if len(calls) == 1:
            handover(log, pg_url, [projection], target, topic=TOPIC, partitions=4)

    monkeypatch.setattr(reconcile_module.Fold, "advance", advance_then_hand_over)
    report = reconcile(log, pg_url, projection, repair=True)
    # The fold had folded the log twice (summed tables doubled) and the repair wrote it:
    assert_tables_match(ledger, pg_url, projection)
    assert report.clean, [d.describe() for d in report.drifts[:3]]


def test_drifted_rows_of_open_holds_are_named_by_their_sku(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README: drifted rows are printed with their business key (a SKU, not its
    inventory id). open_holds' inventory_skus and expiring_reservations rows are keyed by
    the inventory id and carry the SKU."""
    from daybook import run_projections
    from daybook.infrastructure.cli import main
    from daybook.infrastructure.readmodels.location import open_store
    from daybook.projections.holds import EXPIRING_RESERVATIONS, SKUS

    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        ledger.receive_stock("SKU-7", 10)
        ledger.reserve_stock("SKU-7", 2, timeout=3600)
        with run_projections(ledger, url, start=False) as runner:
            runner.run_until_caught_up()
    store = open_store(url)
    try:
        with store.transaction():
            store.execute(f"UPDATE {SKUS.physical_name(1)} SET sku = 'SKU-X'")
            store.execute(f"UPDATE {EXPIRING_RESERVATIONS.physical_name(1)} SET quantity = 3")
    finally:
        store.close()
    assert main(["reconcile", "open_holds", "--url", url]) == 1
    drifted = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(drifted) == 2, drifted
    for line in drifted:
        assert "SKU-7" in line.split(" different ")[0], line
