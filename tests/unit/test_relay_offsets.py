"""The relay's test that the broker lost messages it had acknowledged."""

from __future__ import annotations

from daybook.infrastructure.streaming.relay import lost_offsets


def test_a_broker_that_lost_only_the_last_acknowledged_message_is_caught() -> None:
    """Partition 0 acknowledged up to offset 9 (next: 10); the broker now acknowledges the
    next message at 9: the last one is gone (an unclean leader election), and the relay
    must publish it again. Offsets at or past the next are fine."""
    assert lost_offsets({0: 9}, [10, 4]) == [(0, 10, 9)]
    assert lost_offsets({0: 0, 1: 4}, [10, 4]) == [(0, 10, 0)]
    assert lost_offsets({0: 10, 1: 7}, [10, 4]) == []
