"""Several threads doing one thing at the same moment, over and over."""

from __future__ import annotations

import threading
from collections.abc import Callable


def failures_together(
    act: Callable[[int], object], *, rounds: int, threads: int
) -> list[Exception]:
    """Run ``act(round)`` in ``threads`` threads released at once, ``rounds`` times; the
    exceptions they raised."""
    failures: list[Exception] = []

    def one(number: int, start: threading.Barrier) -> None:
        start.wait()
        try:
            act(number)
        except Exception as error:
            failures.append(error)

    for number in range(rounds):
        start = threading.Barrier(threads)
        running = [threading.Thread(target=one, args=(number, start)) for _ in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
    return failures
