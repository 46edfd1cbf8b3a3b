"""Python's cyclic garbage collector, set for a process that writes at full speed.

The collector is process-wide, so only entry points set it (``daybook serve``, and the write
benchmark, which runs as ``daybook serve`` does); an embedding service may call
``settle_collector`` itself once it has started.

Why: a batch of commands allocates several objects per command (the command, its events, their
stored form, its request record, its receipt) and keeps them all until the batch commits, so
they survive the youngest generation's collections and pile up in the older ones, whose
collections then walk every long-lived object of the process (modules, classes, the aggregate
cache) again and again. Two settings remove most of that work, and change nothing about what is
eventually freed:

- ``gc.freeze()``, once, after start-up: what exists then (modules, classes, settings, the
  ledger) lives as long as the process, so the collector stops walking it. Done once per
  process only: objects frozen are never collected, so freezing again later could keep
  garbage alive for good.
- A larger youngest generation (``_YOUNGEST`` allocations instead of 700): a batch's objects
  are then mostly freed by reference counting before a collection looks at them, and far
  fewer collections run. Cycles are still collected, a little later.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Allocations (less deallocations) between collections of the youngest generation.
_YOUNGEST = 10_000

_settled = False
_lock = threading.Lock()


def settle_collector() -> bool:
    """Freeze what start-up allocated and enlarge the youngest generation (see the module
    docstring); the first call in a process only. True if this call did it."""
    global _settled
    with _lock:
        if _settled:
            return False
        _settled = True
    gc.collect()  # start-up's garbage goes first: what is frozen is kept for good
    gc.freeze()
    youngest, middle, oldest = gc.get_threshold()
    if youngest:  # 0: the collector was switched off on purpose; leave it so
        gc.set_threshold(max(youngest, _YOUNGEST), middle, oldest)
    return True


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (it is process-wide: entry points only).

    A rebuild allocates several objects per event and keeps many (each batch's rows) until
    they are written, and its handlers build no reference cycles: the collector would walk
    the growing heap again and again for nothing. The README's benchmark section says what
    it costs."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
