"""A stream worker's inputs it cannot take (rows the database refuses, an option out of
range), each stopping as little as it can, with a reason; and its status read from a progress
table an older daybook made."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from daybook import open_ledger, projections
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.checkpoints import PROGRESS_TABLE
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.streaming.progress import read_status
from daybook.infrastructure.streaming.worker import StreamApplier
from scripts.streams import Daybook, unique
from tests.projections.helpers import assert_tables_match, workload
from tests.projections.test_runner_errors import TOO_BIG
from tests.streaming.messages import Stream

pytestmark = pytest.mark.postgres


@pytest.mark.kafka
def test_a_worker_port_out_of_range_is_a_bad_option_not_a_traceback(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """``--metrics-port`` is checked (0-65535); ``--port`` (faust's web port) is not: faust
    refuses it at the app's construction, with ``ImproperlyConfigured`` and a traceback,
    exit status 1, after the preflight checks."""
    args = ["worker", "--url", pg_url, "--broker", f"kafka://{kafka_bootstrap}"]
    args += ["--topic", unique("port"), "--group", unique("g"), "--port", "99999"]
    process = Daybook(args, tmp_path / "w.log").start()
    code = process.wait(60)
    assert "Traceback" not in process.output, process.output[-600:]
    assert code == 2, process.output[-600:]
    assert "--port: must be at most 65535" in process.output


def test_rows_a_worker_cannot_write_stop_that_projection_not_the_whole_group(
    pg_url: str,
) -> None:
    """The runner stops only the projection whose rows the database refuses (a value out of
    a column's range), and goes on with the others
    (``test_a_value_out_of_the_columns_range_stops_that_projection_only``). A stream worker
    raised the error out of the batch: no retry cures it, so the worker stopped, and every
    worker of the group stopped again at every start on the same batch; every projection
    the group writes stayed behind for good."""
    ledger = open_ledger(pg_url)
    try:
        workload(ledger, 20)
        messages = Stream(1).publish(ledger)
        head = ledger.head()
        worker = StreamApplier(
            pg_url,
            [TOO_BIG, projections.ACCOUNT_BALANCES],
            group="g",
            topic="t",
            partitions=1,
            writer="test",
        )
        try:
            worker.apply(messages)
        finally:
            worker.close()
        store = open_store(pg_url)
        try:
            catalog = VersionCatalog(store)
            huge = catalog.version("huge", 1)
            assert huge is not None and huge.state is VersionState.STOPPED
            assert huge.error is not None and "writing its rows failed" in huge.error
        finally:
            store.close()
        (status,) = read_status(pg_url, "g", "t")
        assert status.position == head
        # The other projection of the group, written after the refused one, has every event.
        assert_tables_match(ledger, pg_url, projections.ACCOUNT_BALANCES)
    finally:
        ledger.close()


def test_status_reads_a_progress_table_an_older_daybook_made(pg_url: str) -> None:
    """Upgraded, ``daybook stream status`` may run before any new worker has connected (and
    added its columns to the progress table): it reads what is there, the rest as unknown,
    rather than failing on a column an older daybook did not have."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {PROGRESS_TABLE} ("
            "group_id TEXT NOT NULL, topic TEXT NOT NULL, partition BIGINT NOT NULL, "
            "position BIGINT NOT NULL DEFAULT 0, applied BIGINT NOT NULL DEFAULT 0, "
            "duplicates BIGINT NOT NULL DEFAULT 0, dead_letters BIGINT NOT NULL DEFAULT 0, "
            "state TEXT NOT NULL DEFAULT 'live', last_error TEXT, "
            "waiting_for BIGINT NOT NULL DEFAULT 0, "
            "PRIMARY KEY (group_id, topic, partition))"
        )
        conn.execute(
            f"INSERT INTO {PROGRESS_TABLE} (group_id, topic, partition, position, applied)"
            " VALUES ('g', 't', 0, 7, 7)"
        )
    (status,) = read_status(pg_url, "g", "t")
    assert (status.partition, status.position, status.applied) == (0, 7, 7)
    assert (status.bound, status.writer) == (0, None)
