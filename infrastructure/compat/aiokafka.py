"""aiokafka's private internals that daybook relies on (written against 0.14).

aiokafka ships no type information, so everything taken from it is ``Any`` to mypy; the
functions here give those values their types, and ``RELIED_ON`` (checked by
tests/unit/test_compat.py) says what each name must be.
"""

from __future__ import annotations

from typing import Any

from aiokafka import partitioner

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


#: Every private aiokafka name used above, with the shape daybook expects.
RELIED_ON: tuple[Internal, ...] = (
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
)
