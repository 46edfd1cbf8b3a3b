"""Kafka settings shared by the relay and the workers: URLs, topics, topic creation."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from daybook.infrastructure import settings
from daybook.infrastructure.compat.aiokafka import broker_error
from daybook.infrastructure.lifecycle import Refused
from daybook.infrastructure.urls import BadURL, redacted

DEFAULT_TOPIC = settings.DEFAULT_TOPIC
DEFAULT_PARTITIONS = settings.DEFAULT_PARTITIONS
DEFAULT_BROKER = settings.DEFAULT_BROKER
BROKER_ENV = "DAYBOOK_KAFKA_URL"


def dead_letter_topic(topic: str) -> str:
    return f"{topic}{settings.DEAD_LETTERS_SUFFIX}"


def bootstrap_servers(url: str) -> str:
    """``kafka://host:port[,host:port]`` (or a bare ``host:port``) -> ``host:port,...``."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.scheme != "kafka" or not parts.netloc:
        raise BadURL(f"unsupported broker URL {redacted(url)!r}: use kafka://host:port")
    return parts.netloc


class TopicMismatch(Refused):
    """The topic, or the relay's cursor for it, has another partition count than the one
    the relay was started with: an operator's mistake (a missing or wrong --partitions),
    refused with one line, since the relay's partitioning (and the ``prev`` chain consumers
    have recorded) depends on it."""

    code = "partitioning_mismatch"


async def ensure_topic(bootstrap: str, topic: str, partitions: int) -> int:
    """Create ``topic`` with ``partitions`` if missing; return its partition count.

    An existing topic with another count is refused: the relay's partitioning (and the
    ``prev`` chain consumers have recorded) depends on it.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, partitions, 1)])
        for _name, code, *_ in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                # The broker's error class: a retriable one (a controller election, a
                # timeout) is an outage the relay waits out; the others stop it.
                raise broker_error(code, f"cannot create topic {topic!r}: error code {code}")
        (description,) = await admin.describe_topics([topic])
        if (code := description.get("error_code", 0)) != 0:
            # No partitions to count (metadata not there yet, a leader moving): no mismatch.
            raise broker_error(code, f"cannot describe topic {topic!r}: error code {code}")
        found = len(description["partitions"])
        if found != partitions:
            raise TopicMismatch(
                f"topic {topic!r} has {found} partitions, and the relay runs with "
                f"{partitions}: start it with --partitions {found}, or publish to a new "
                "--topic to change the partition count"
            )
        return found
    finally:
        await admin.close()


async def topic_partitions(bootstrap: str, topic: str) -> int | None:
    """The partition count ``topic`` has on the broker (None: no such topic)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
        if description.get("error_code", 0) != 0:
            return None
        return len(description["partitions"]) or None
    finally:
        await admin.close()
