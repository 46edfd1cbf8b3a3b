"""A relay's producer stopped while its broker is down: ``AIOKafkaProducer.stop`` waits for
its undelivered batches before it closes anything, and cut short by the relay's time limit it
left its sender task and its connections running (and a second stop does nothing): one more
after every outage, sending the old batch again whenever the broker came back."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

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
        logged: list[dict[str, Any]] = []  # what the loop's exception handler was given

        async def scenario() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, c: logged.append(c))
            await ensure_topic(bootstrap, "stopped", 1)
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap, request_timeout_ms=2000, retry_backoff_ms=100
            )
            await producer.start()
            await (await producer.send("stopped", b"first"))  # the topic's metadata is known
            outage.cut()
            undelivered = await producer.send("stopped", b"second")
            futures = futures_of_batches(producer)
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
            # A caller gone (the relay's publish cut short by the outage) takes no error,
            # and nobody waits for aiokafka's own (a batch's drain waiter): each would be
            # logged once collected, "Future exception was never retrieved" (asyncio's
            # ``_log_traceback`` says it will be; when is up to the collector).
            assert futures and not [f for f in futures if f._log_traceback], futures

        asyncio.run(scenario())
    gc.collect()
    # Nothing else was logged (a batch's callback raising KeyError was).
    assert not logged, [c["message"] + ": " + repr(c.get("exception")) for c in logged]


def futures_of_batches(producer: AIOKafkaProducer) -> list[asyncio.Future[Any]]:
    """Every future of the batches a producer's accumulator holds (aiokafka's internals)."""
    accumulator = producer._message_accumulator
    batches = [*accumulator._pending_batches]
    batches += [batch for queue in accumulator._batches.values() for batch in queue]
    return [
        future
        for batch in batches
        for future in (batch.future, batch._drain_waiter, *(f for f, _ in batch._msg_futures))
    ]
