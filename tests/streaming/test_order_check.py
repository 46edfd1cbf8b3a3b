"""The relay test's order check fails on the faults it is named for (no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from daybook.infrastructure.streaming import envelope
from scripts.streams import assert_in_log_order


def _message(position: int, prev: int, aggregate: object, version: int) -> envelope.Envelope:
    state = {
        "originator_id": aggregate,
        "originator_version": version,
        "timestamp": datetime.now(UTC),
        "amount": 1,
    }
    _, value = envelope.encode("daybook.domain.accounts:Account.Deposited", state, position, prev)
    return envelope.decode(value)


def _partition() -> list[envelope.Envelope]:
    a, b = uuid4(), uuid4()
    return [_message(1, 0, a, 1), _message(3, 1, b, 1), _message(4, 3, a, 2), _message(6, 4, b, 2)]


def test_messages_in_order_with_repeats_pass() -> None:
    first = _partition()
    repeated = [*first[:3], *first[1:3], first[3]]  # a batch published again after a crash
    assert_in_log_order({0: repeated})


def test_a_reordered_message_fails() -> None:
    one, two, three, four = _partition()
    with pytest.raises(AssertionError, match="out of order"):
        assert_in_log_order({0: [one, three, two, four]})


def test_a_repeat_that_is_not_the_same_event_fails() -> None:
    one, two, three, four = _partition()
    impostor = _message(3, 1, uuid4(), 7)
    with pytest.raises(AssertionError, match="out of order"):
        assert_in_log_order({0: [one, two, three, impostor, four]})
