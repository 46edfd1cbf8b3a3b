"""A worker's partition lag while its partitions wait for events the topic no longer holds
(retention deleted the topic's oldest messages before a new group read it): nothing of what
it fetched is applied, yet the lag it reports is 0."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from daybook import open_ledger
from daybook.infrastructure.readmodels.handover import partition_of
from daybook.infrastructure.streaming.broker import ensure_topic
from daybook.infrastructure.streaming.progress import GAP, read_status
from scripts.streams import open_accounts, unique, wait_until, write_money
from tests.streaming.messages import Stream
from tests.streaming.test_observability import partition_lags
from tests.streaming.test_outages import worker
from tests.streaming.test_workers import PARTITIONS

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


def accounts_in_every_partition(ledger: Any, each: int = 3) -> list[Any]:
    """Accounts, at least ``each`` of them in every partition: twenty random ones left a
    partition with none in about one run of eighty, and the test failed its own check."""
    partition = partition_of(PARTITIONS)
    accounts: list[Any] = []
    counts = Counter[int]()
    while min(counts[p] for p in range(PARTITIONS)) < each:
        (account,) = open_accounts(ledger, 1)
        accounts.append(account)
        counts[partition(str(account))] += 1
    return accounts


def test_a_partition_waiting_for_a_gap_reports_its_unapplied_messages_as_lag(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    write_money(ledger, accounts_in_every_partition(ledger), 200)
    messages = Stream(PARTITIONS).publish(ledger)
    ledger.close()
    # What the relay published, its two oldest messages of each partition gone (retention).
    # (Its oldest 20 were, and a partition that had been given no more than 21 held nothing
    # for the first worker: it never waited, and the test timed out, in about one run of
    # six by how many messages the random account ids gave each partition.)
    kept = [m for m in messages if m.offset >= 2]
    topic, group = unique("gap-lag"), unique("group")

    # One of each partition's last messages comes after the first worker has stopped.
    last = {m.partition: m for m in kept}
    later = list(last.values())
    first = [m for m in kept if m not in later]
    assert {m.partition for m in first} == set(range(PARTITIONS)), "a partition got too little"

    async def put(batch: list[Any]) -> None:
        await ensure_topic(kafka_bootstrap, topic, PARTITIONS)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for m in batch:
                await producer.send(topic, m.value, partition=m.partition)
            await producer.flush()
        finally:
            await producer.stop()

    def measured(log: Path) -> tuple[list[float | None], list[Any]]:
        process = worker(pg_url, kafka_bootstrap, topic, group, log, {}, None, more).start()
        try:
            wait_until(
                lambda: (
                    len(read_status(pg_url, group, topic)) == PARTITIONS
                    and all(p.state == GAP for p in read_status(pg_url, group, topic))
                ),
                "every partition to wait for its gap",
            )
            lags = partition_lags(log, group, PARTITIONS)
            wait_until(lambda: all(lag is not None for lag in lags()), "every partition's lag")
            return lags(), read_status(pg_url, group, topic)
        finally:
            assert process.stop() == 0, process.output

    more = ["--metrics-port", "0", "--log-format", "json"]
    asyncio.run(put(first))
    reported, status = measured(tmp_path / "w.log")
    assert sum(p.applied for p in status) == 0  # nothing of what it holds is applied
    # Every message fetched and not applied is lag ("Messages of a partition fetched and not
    # yet applied by this worker"): not 0.
    assert sum(lag or 0 for lag in reported) == len(first), (reported, len(first))
    # A worker started while the partitions wait counts from the first message it fetched
    # (what the one before it held back is acknowledged): here, one a partition.
    asyncio.run(put(later))
    again, status = measured(tmp_path / "w2.log")
    assert sum(p.applied for p in status) == 0
    assert again == [1.0] * PARTITIONS, again
