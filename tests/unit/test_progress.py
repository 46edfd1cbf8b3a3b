"""How a stream worker judges each message against its partition's last applied position
(``classify``): the rule that keeps every event applied once and in order."""

from __future__ import annotations

import pytest

from daybook.infrastructure.streaming.progress import Step, classify


@pytest.mark.parametrize(
    ("applied", "position", "prev", "step"),
    [
        (3, 7, 3, Step.APPLY),  # the next of the chain
        (0, 1, 0, Step.APPLY),  # the partition's first event
        (5, 5, 3, Step.DUPLICATE),  # the last applied, delivered again
        (5, 4, 2, Step.DUPLICATE),  # an earlier one, delivered again
        (3, 9, 7, Step.GAP),  # an event before it was not delivered yet: wait
        # Its chain names an event before the last applied, which it is not after: never
        # applied out of order (one relay's partitioning cannot make it; a second relay
        # with another partitioning can).
        (3, 7, 1, Step.GAP),
    ],
)
def test_each_message_is_applied_once_and_in_order(
    applied: int, position: int, prev: int, step: Step
) -> None:
    assert classify(applied, position, prev) is step
