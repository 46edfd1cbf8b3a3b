"""A worker's partition lag while its read-model database is away: it says the worker is
behind, as the runner's and the relay's lag do in an outage (it stayed at 0)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daybook import open_ledger
from scripts import services
from scripts.outage import Outage
from scripts.streams import open_accounts, unique, wait_until, write_money
from tests.streaming.test_observability import metrics_port, partition_lags, sample, scrape
from tests.streaming.test_outages import READ_MODEL_OUTAGE_SECONDS, _cursor, relay, worker
from tests.streaming.test_workers import PARTITIONS, applied

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


def test_a_workers_partition_lag_grows_while_its_read_models_are_away(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The worker has applied everything (lag 0 everywhere); its read-model database goes,
    300 transfers are published and fetched, and the worker retries the batch in hand. The
    lag it reports must say it is behind, as the runner's and the relay's do in an outage."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("worker-lag-outage"), unique("group")
    log = tmp_path / "w.log"
    more = ["--metrics-port", "0", "--log-format", "json"]
    with Outage.of_url(readmodels) as outage:
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
        process = worker(
            pg_url, kafka_bootstrap, topic, group, log, {}, outage.url(readmodels), more
        )
        process.start()
        try:
            write_money(ledger, accounts, 400)
            head = ledger.head()
            wait_until(lambda: applied(readmodels, group, topic) == head, "the first events")
            lags = partition_lags(log, group, PARTITIONS)
            port = metrics_port(log)
            assert port is not None
            wait_until(lambda: all(lag == 0 for lag in lags()), "every partition's lag: 0")
            outage.cut()
            write_money(ledger, accounts, 300, seed=2)
            published = ledger.head() - head
            head = ledger.head()
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to publish them")
            retrying = "daybook_service_retrying"
            wait_until(
                lambda: sample(scrape(port), retrying, service=f"stream worker {group}") == 1,
                "the worker to say it retries",
            )
            time.sleep(READ_MODEL_OUTAGE_SECONDS)
            during = lags()
            outage.restore()
        finally:
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    ledger.close()
    # 300 transfers published, fetched and not applied: every one of their events counts
    # (it read 0 on every partition; then, counted from the batch's last message, 1).
    assert sum(lag or 0 for lag in during) >= published, (published, during)
