"""The order the suite's tests are handed to its processes in, so the long ones start first.

``make test`` runs the suite in several processes with pytest-xdist's ``worksteal``
scheduler: it cuts the collected list into one contiguous share per process, each process
runs its share from the front, and an idle process takes the back half of the longest
queue left. In file order, the slow tests (``@pytest.mark.slow``: processes killed, outages
waited out) sit together (``tests/streaming`` alone holds most of them), so one share held
most of them and the suite ended with one process working through them while the others
had finished. Here every share starts with an even part of the slow tests, and the rest
keep their file order.

A test using a module- or class-scoped fixture (a server and a browser for a module, say)
moves with the rest of its module's slow tests, so that fixture is still set up once per
share rather than once per test.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Protocol, TypeVar


class Item(Protocol):
    @property
    def nodeid(self) -> str: ...


T = TypeVar("T", bound=Item)


def share_sizes(total: int, processes: int) -> list[int]:
    """The sizes of the contiguous shares worksteal first hands out, in order (its
    ``check_schedule``: each idle process in turn gets what is left over the processes left)."""
    sizes = []
    left = total
    for index in range(processes):
        size = left // (processes - index)
        sizes.append(size)
        left -= size
    return sizes


def slow_first(items: Sequence[T], slow: set[str], grouped: set[str], processes: int) -> list[T]:
    """``items`` reordered so each of the ``processes`` shares starts with about as many slow
    tests as the others. ``slow`` and ``grouped`` are node ids: the slow tests, and those among
    them that stay with their module's other slow tests."""
    if processes < 2:
        return list(items)
    units: dict[str, list[T]] = {}
    fast: list[T] = []
    for item in items:
        if item.nodeid not in slow:
            fast.append(item)
            continue
        module = item.nodeid.partition("::")[0]
        key = module if item.nodeid in grouped else item.nodeid
        units.setdefault(key, []).append(item)
    sizes = share_sizes(len(items), processes)
    heads: list[list[T]] = [[] for _ in range(processes)]
    # Largest unit first, each to the share with the fewest slow tests (and room for them).
    for unit in sorted(units.values(), key=len, reverse=True):
        candidates = [i for i in range(processes) if len(heads[i]) + len(unit) <= sizes[i]]
        target = min(candidates or range(processes), key=lambda i: len(heads[i]))
        heads[target].extend(unit)
    ordered: list[T] = []
    rest = iter(fast)
    for head, size in zip(heads, sizes, strict=True):
        ordered.extend(head)
        ordered.extend(islice(rest, max(0, size - len(head))))
    ordered.extend(rest)
    return ordered
