"""aiokafka's private internals that daybook relies on (written against 0.14).

aiokafka ships no type information, so everything taken from it is ``Any`` to mypy; the
functions here give those values their types, and ``RELIED_ON`` (checked by
tests/unit/test_compat.py) says what each name must be.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import errors, partitioner
from aiokafka.errors import KafkaConnectionError

from daybook.infrastructure.compat import Internal, Kind


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key``: murmur2, as the Java
    client computes it (``aiokafka.partitioner.murmur2``, the hash aiokafka's own
    ``DefaultPartitioner`` uses)."""
    # Looked up at each call (a dict lookup), so that this module imports without it and
    # the compat test can say what is missing.
    hashed: int = partitioner.murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


def set_fetch_max_wait(consumer: Any, seconds: float) -> None:
    """Make an ``AIOKafkaConsumer`` that has not started yet wait at most ``seconds`` for
    a fetch to fill, as if built with ``fetch_max_wait_ms``.

    For a consumer someone else builds (faust): the constructor stores the setting in
    ``_fetch_max_wait_ms``, and ``AIOKafkaConsumer.start`` hands it to the fetcher it
    creates, so it must be set before ``start``.
    """
    consumer._fetch_max_wait_ms = int(seconds * 1000)


async def stop_producer(producer: Any, timeout: float) -> None:
    """Stop an ``AIOKafkaProducer`` within about ``timeout`` seconds, and everything it runs
    with it; batches not delivered by then fail (``KafkaConnectionError``).

    ``AIOKafkaProducer.stop`` marks the producer closed, then waits for its batches to be
    delivered before it closes its sender task and its client. Cut short (a broker that is
    down takes nothing), it left both running, and a second ``stop`` returns at once (closed
    already): the relay leaked one producer per broker outage, each sending its old batch
    again when the broker came back. So, once the time is up: the sender task
    (``_sender.sender_task``) is cancelled, the accumulator's batches
    (``_message_accumulator``) failed, and the client closed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def left() -> float:  # one deadline for the three steps (at least a moment for each)
        return max(0.1, deadline - loop.time())

    try:
        await asyncio.wait_for(producer.stop(), left())
        return
    except Exception:  # cut short (or failed part way): closed here, whatever is left
        pass
    sender = producer._sender.sender_task
    if sender is not None and not sender.done():
        sender.cancel()
        await asyncio.wait([sender], timeout=left())
    accumulator = producer._message_accumulator
    failed = [
        *(batch for batches in accumulator._batches.values() for batch in batches),
        *accumulator._pending_batches,
    ]
    # A batch that leaves the pending set twice raised KeyError ("Exception in callback",
    # logged): one put back for a retry (the accumulator's ``reenqueue``) keeps the
    # callback that removes it from there once it is done, and a request still in flight
    # may put a batch back after it is failed here, before that callback runs.
    accumulator._pending_batches = _PendingOfAStoppedProducer(accumulator._pending_batches)
    accumulator.fail_all(
        KafkaConnectionError("the producer stopped before the broker took this batch")
    )
    # Taken as seen: nobody waits for a batch's drain waiter once its sender is gone, nor
    # for a send whose caller was cut short; each was logged, when collected, as "Future
    # exception was never retrieved". A caller still awaiting one gets the error all the
    # same.
    for batch in failed:
        for future in (batch.future, batch._drain_waiter, *(f for f, _ in batch._msg_futures)):
            if future.done() and not future.cancelled():
                future.exception()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.client.close(), left())


class _PendingOfAStoppedProducer(set[Any]):
    """The batches a stopped producer's accumulator had in flight; removing one twice is
    not an error (see ``stop_producer``)."""

    def remove(self, batch: Any) -> None:
        self.discard(batch)


def broker_error(code: int, message: str) -> Exception:
    """The error a broker's answer ``code`` stands for, as aiokafka's own class for it (its
    ``retriable`` tells an election or a timeout, which the relay waits out as an outage,
    from a refusal no retry cures); aiokafka's ``for_code`` is not in its ``__all__``."""
    error: Exception = errors.for_code(code)(message)
    return error


#: Every private aiokafka name used above, with the shape daybook expects.
RELIED_ON: tuple[Internal, ...] = (
    Internal(
        "aiokafka",
        "aiokafka:AIOKafkaProducer",
        "_sender",
        stop_producer,
        "AIOKafkaProducer.stop (what it closes, and after what it waits)",
        on_instance=True,
        members=("sender_task",),
        used_in="aiokafka:AIOKafkaProducer.stop",
    ),
    Internal(
        "aiokafka",
        "aiokafka:AIOKafkaProducer",
        "_message_accumulator",
        stop_producer,
        "AIOKafkaProducer.stop and the accumulator's fail_all",
        on_instance=True,
        members=("fail_all",),
        used_in="aiokafka:AIOKafkaProducer.stop",
    ),
    Internal(
        "aiokafka",
        "aiokafka.producer.message_accumulator:MessageAccumulator",
        "_batches",
        stop_producer,
        "MessageAccumulator.fail_all (the batches it fails: queued ones, per partition)",
        on_instance=True,
        types=(dict,),
        used_in="aiokafka.producer.message_accumulator:MessageAccumulator.fail_all",
    ),
    Internal(
        "aiokafka",
        "aiokafka.producer.message_accumulator:MessageAccumulator",
        "_pending_batches",
        stop_producer,
        "MessageAccumulator._pop_batch and reenqueue (how a batch leaves the pending set)",
        on_instance=True,
        types=(set,),
        used_in="aiokafka.producer.message_accumulator:MessageAccumulator._pop_batch",
    ),
    Internal(
        "aiokafka",
        "aiokafka.producer.message_accumulator:MessageBatch",
        "_drain_waiter",
        stop_producer,
        "MessageBatch.failure (the futures a failed batch sets)",
        on_instance=True,
        types=(asyncio.Future,),
        used_in="aiokafka.producer.message_accumulator:MessageBatch.failure",
    ),
    Internal(
        "aiokafka",
        "aiokafka.producer.message_accumulator:MessageBatch",
        "_msg_futures",
        stop_producer,
        "MessageBatch.failure (the futures a failed batch sets)",
        on_instance=True,
        types=(list,),
        used_in="aiokafka.producer.message_accumulator:MessageBatch.failure",
    ),
    Internal(
        "aiokafka",
        "aiokafka.partitioner",
        "murmur2",
        default_partition,
        "aiokafka's DefaultPartitioner (it must still hash keys as the Java client does)",
        kind=Kind.FUNCTION,
        parameters=("data",),
    ),
    Internal(
        "aiokafka",
        "aiokafka:AIOKafkaConsumer",
        "_fetch_max_wait_ms",
        set_fetch_max_wait,
        "AIOKafkaConsumer.__init__ and start (where fetch_max_wait_ms goes)",
        on_instance=True,
        types=(int,),
        used_in="aiokafka:AIOKafkaConsumer.start",
    ),
    Internal(
        "aiokafka",
        "aiokafka.errors",
        "for_code",
        broker_error,
        "aiokafka.errors.for_code (a broker's error code to its error class)",
        kind=Kind.FUNCTION,
        parameters=("error_code",),
    ),
)
