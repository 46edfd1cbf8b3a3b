"""A stream group's parked events as `projections status`, the dashboard and the parked gauge
see them: the letters left out of each version, not every letter of the group."""

from __future__ import annotations

from typing import Any

import pytest

from daybook import Ledger, open_ledger
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.status import projection_status
from daybook.infrastructure.streaming.worker import StreamApplier
from tests.streaming.messages import Stream, of_partitions
from tests.streaming.test_applier import BUGGY_TOTALS

pytestmark = pytest.mark.postgres


def a_deposit_of_13_parked(pg_url: str, stream: Stream) -> tuple[Ledger, Any]:
    """Deposits of 10, 13 and 7 to one account, applied by group ``g`` with the buggy
    deposit_totals v1, which parks the deposit of 13: the open ledger and the account."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("owner", "EUR").account_id
    for amount in (10, 13, 7):
        ledger.deposit(account, amount)
    worker = StreamApplier(pg_url, [BUGGY_TOTALS], group="g", topic="t", partitions=1, writer="w")
    try:
        assert len(worker.apply(of_partitions(stream.publish(ledger), 0)).parked) == 1
    finally:
        worker.close()
    return ledger, account


def test_projections_status_counts_a_groups_parked_events(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: `projections status` shows, per version, its parked events (and the
    dashboard, `parked`, reads the same figure). A group's letter left out of v1 counted 0."""
    ledger, _ = a_deposit_of_13_parked(pg_url, Stream(1))
    assert main(["stream", "status", "--url", pg_url, "--group", "g", "--topic", "t"]) == 1
    capsys.readouterr()
    (status,) = [
        s for s in projection_status(event_log_of(ledger), pg_url) if s.name == BUGGY_TOTALS.name
    ]
    ledger.close()
    assert status.owner == "stream:g"
    assert status.dead_letters == 1, status


def test_the_parked_gauge_of_a_fixed_version_does_not_count_letters_it_has_in(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`daybook_projection_parked_events` is per version ("unresolved dead letters"). A
    worker set it, for each version it writes, to every letter of its group: after the fix
    (v2, built by the runner with the event in, handed to the group), v2 reported v1's
    closed letter as parked for the 30 days it is kept."""
    from daybook.infrastructure.observability import metrics
    from daybook.infrastructure.readmodels.handover import handover
    from daybook.infrastructure.readmodels.runner import ProjectionRunner
    from tests.streaming.test_applier import FIXED_TOTALS

    stream = Stream(1)
    ledger, account = a_deposit_of_13_parked(pg_url, stream)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, pg_url, [FIXED_TOTALS])
    runner.run_until_caught_up()
    runner.stop()
    handover(log, pg_url, [FIXED_TOTALS], "stream:g", topic="t", partitions=1, known=[BUGGY_TOTALS])
    ledger.deposit(account, 1)
    worker = StreamApplier(pg_url, [FIXED_TOTALS], group="g", topic="t", partitions=1, writer="w2")
    try:
        worker.apply(of_partitions(stream.publish(ledger), 0))
    finally:
        worker.close()
    assert main(["stream", "status", "--url", pg_url, "--group", "g", "--topic", "t"]) == 0
    capsys.readouterr()
    (v2,) = [
        s for s in projection_status(log, pg_url) if s.name == FIXED_TOTALS.name and s.version == 2
    ]
    ledger.close()
    assert v2.dead_letters == 0
    gauge = metrics.PROJECTION_PARKED.labels(FIXED_TOTALS.name, "2")._value.get()
    assert gauge == 0
