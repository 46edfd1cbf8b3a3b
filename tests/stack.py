"""Whether code keeps the interpreter's stack for others while it works.

A reader that recurses once per level of its input's nesting goes down to the recursion
limit on a deep enough input. Whatever Python code the collector runs meanwhile (a
finalizer, a callback, another object's garbage) then finds no stack left and fails
("Exception ignored in ..."). ``collector_short_of_stack`` makes the collector run often
and, each time, asks for a few hundred frames.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_short_of_stack(frames: int = 300) -> Iterator[list[int]]:
    """Yields the list of the collections (their generation) that found fewer than
    ``frames`` frames of stack left."""
    short: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        try:
            _descend(frames)
        except RecursionError:
            short.append(info["generation"])

    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(20)
    try:
        yield short
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)


def _descend(frames: int) -> int:
    return 0 if frames == 0 else 1 + _descend(frames - 1)
