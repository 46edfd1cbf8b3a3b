"""A relay's producer stopped while its broker is down: ``AIOKafkaProducer.stop`` waits for
its undelivered batches before it closes anything, and cut short by the relay's time limit it
left its sender task and its connections running (and a second stop does nothing): one more
after every outage, sending the old batch again whenever the broker came back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from daybook.infrastructure.compat.aiokafka import stop_producer
from daybook.infrastructure.streaming.broker import ensure_topic
from tests.streaming.test_outages import broker_behind_a_proxy

pytestmark = [pytest.mark.kafka]


def test_a_producer_stopped_while_its_broker_is_down_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    with broker_behind_a_proxy(tmp_path) as (outage, bootstrap):

        async def scenario() -> None:
            await ensure_topic(bootstrap, "stopped", 1)
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap, request_timeout_ms=2000, retry_backoff_ms=100
            )
            await producer.start()
            await (await producer.send("stopped", b"first"))  # the topic's metadata is known
            outage.cut()
            undelivered = await producer.send("stopped", b"second")
            await stop_producer(producer, 1.0)
            await asyncio.sleep(0.2)
            # Asked here, while the loop runs (closing it cancels whatever is left).
            sender = producer._sender.sender_task
            assert sender is not None and sender.done(), "the sender task still runs"
            assert not [c for c in producer.client._conns.values() if c.connected()], (
                "connections left open"
            )
            assert undelivered.done(), "the undelivered batch's future is never resolved"
            assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

        asyncio.run(scenario())
