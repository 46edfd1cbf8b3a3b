"""The relay's topic check against broker answers a retry cures (no broker needed: the admin
client is a stand-in that answers as a Kafka cluster electing its controller, or one whose
metadata has not caught up with a topic just created, does)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from daybook.infrastructure.streaming import broker
from daybook.infrastructure.transient import is_transient


class _Admin:
    """``AIOKafkaAdminClient`` answering ``create_topics`` with ``create_code`` and
    ``describe_topics`` with ``describe``."""

    create_code = 0
    describe: dict[str, Any] = {}

    def __init__(self, **_: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create_topics(self, topics: list[Any]) -> Any:
        class Response:
            topic_errors = [(topics[0].name, type(self).create_code, None)]

        return Response()

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        return [type(self).describe]


def _check(monkeypatch: pytest.MonkeyPatch, create_code: int, describe: dict[str, Any]) -> None:
    admin = type("Admin", (_Admin,), {"create_code": create_code, "describe": describe})
    monkeypatch.setattr(broker, "AIOKafkaAdminClient", admin)
    asyncio.run(broker.ensure_topic("localhost:9092", "daybook.events", 4))


FOUR = {"error_code": 0, "topic": "daybook.events", "partitions": [{}, {}, {}, {}]}


@pytest.mark.parametrize("code", [7, 41])  # REQUEST_TIMED_OUT, NOT_CONTROLLER: retriable
def test_a_create_topics_answer_a_retry_cures_is_an_outage_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The relay waits out what ``is_transient`` calls transient and stops (FAILED, exit 1)
    on anything else: a controller election must be waited out like a broker outage."""
    with pytest.raises(Exception) as raised:
        _check(monkeypatch, code, FOUR)
    assert is_transient(raised.value), f"relay would stop for good on: {raised.value!r}"


@pytest.mark.parametrize("code", [3, 5])  # UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE
def test_a_topic_whose_metadata_is_not_there_yet_is_not_a_partitioning_mismatch(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Metadata for a topic just created (or while its leader moves) answers with an error
    and no partitions: that is no topic of 0 partitions to refuse ('start it with
    --partitions 0'), but an answer to wait out."""
    with pytest.raises(Exception) as raised:
        _check(monkeypatch, 0, {"error_code": code, "topic": "daybook.events", "partitions": []})
    assert not isinstance(raised.value, broker.TopicMismatch), str(raised.value)
    assert is_transient(raised.value), repr(raised.value)
