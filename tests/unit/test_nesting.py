"""The nesting check in front of the JSON parsers: exact at its limit."""

from __future__ import annotations

import json

import pytest

from daybook.infrastructure.nesting import MAX_NESTING, nested_deeper_than


def _nested(depth: int, kind: str) -> str:
    opening, closing = {"array": ("[", "]"), "object": ('{"a": ', "}")}[kind]
    return opening * depth + "1" + closing * depth


@pytest.mark.parametrize("kind", ["array", "object"])
def test_nesting_is_refused_one_level_past_the_limit_and_not_at_it(kind: str) -> None:
    """The limit is the depth a body may have: one level more is refused, and one level
    is enough to tell (a check off by some levels lets bodies deep enough to use up the
    parser's stack through)."""
    at_limit, past = _nested(MAX_NESTING, kind), _nested(MAX_NESTING + 1, kind)
    assert not nested_deeper_than(at_limit, MAX_NESTING)
    assert nested_deeper_than(past, MAX_NESTING)
    # Padded with brackets in strings, and with siblings that go back up: the same.
    padding = json.dumps("[" * 200 + "{" * 200)
    assert not nested_deeper_than(f"[{padding}, {at_limit}, [[[]]]]", MAX_NESTING + 1)
    assert nested_deeper_than(f"[{padding}, {at_limit}, [[[]]]]", MAX_NESTING)
    assert not nested_deeper_than("[" + "[], " * 1000 + "1]", 2)
