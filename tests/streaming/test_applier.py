"""The stream applier fed the relay's messages directly (no broker): what it logs."""

from __future__ import annotations

import logging

import pytest

from daybook import open_ledger, projections
from daybook.infrastructure.streaming.worker import StreamApplier
from tests.projections.helpers import workload
from tests.streaming.messages import Stream, of_partitions

pytestmark = pytest.mark.postgres


def test_a_partition_waiting_for_a_gap_logs_when_it_starts_not_per_event(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = open_ledger(pg_url)
    workload(ledger, 400)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    caplog.set_level(logging.INFO, logger="daybook.worker")
    try:
        worker.apply(messages[:10])
        for start in range(11, len(messages), 50):  # the eleventh never arrives
            worker.apply(messages[start : start + 50])
    finally:
        worker.close()
    gap_lines = [r for r in caplog.records if "re-publish" in r.getMessage()]
    assert len(messages) > 300
    # One line when the wait starts (and a summary if it outlasts the summary interval).
    assert 1 <= len(gap_lines) <= 2, [r.getMessage() for r in gap_lines[:5]]
