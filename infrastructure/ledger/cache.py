"""The ledger's cache of aggregates, on the write path of every command."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any
from uuid import UUID

from eventsourcing.application import Cache, LRUCache

from daybook.infrastructure.ledger.application import LedgerService

#: The most write-once aggregates (reservation claims) the cache keeps, apart from the rest.
ONCE_MAXSIZE = 10_000


class AggregateCache(Cache[UUID, Any]):
    """eventsourcing's ``LRUCache`` on an ``OrderedDict``: the same recency order, kept by
    C code rather than a linked list of Python lists, and keyed by ``UUID.int`` (a UUID's
    hash is computed by Python code on every lookup, an int's is not). Each command reads
    two aggregates from it and each commit writes them back."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self._entries: OrderedDict[int, Any] = OrderedDict()
        #: Write-once aggregates (reservation claims), apart: see ``put``.
        self._once: OrderedDict[int, Any] = OrderedDict()
        self.once_maxsize = min(maxsize, ONCE_MAXSIZE)
        self.lock = threading.Lock()

    def get(self, key: UUID, *, evict: bool = False) -> Any:
        entry = key.int
        with self.lock:
            entries = self._entries if entry in self._entries else self._once
            if evict:
                return entries.pop(entry)
            value = entries[entry]
            entries.move_to_end(entry)
            return value

    def ids(self) -> list[UUID]:
        """The ids of the cached aggregates, least recently used first (write-once ones,
        kept apart, are not among them)."""
        with self.lock:
            return [UUID(int=entry) for entry in self._entries]

    def write_once_ids(self) -> list[UUID]:
        """The ids of the write-once aggregates kept apart, least recently used first."""
        with self.lock:
            return [UUID(int=entry) for entry in self._once]

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: UUID, value: Any) -> None:
        entry = key.int
        if value.settled:
            # Nothing will change it again, so no command needs it at hand. Kept, one per
            # resolved hold and finished saga would push live aggregates out, and a process
            # would hold as many as the cache has room for (a finished saga is a few KB).
            with self.lock:
                self._entries.pop(entry, None)
            return
        # Write-once aggregates (reservation claims) come in only through reads that refuse
        # a repeat (a shipment confirmed twice); kept, the next repeat of the same id is
        # refused at once. Apart, in a small LRU of their own: a flood of repeats never
        # pushes live accounts and SKUs out.
        entries, maxsize = (
            (self._once, self.once_maxsize) if value.write_once else (self._entries, self.maxsize)
        )
        with self.lock:
            entries[entry] = value
            entries.move_to_end(entry)
            if len(entries) > maxsize:
                entries.popitem(last=False)


def install_aggregate_cache(ledger: LedgerService) -> None:
    """Replace the ledger's LRU cache (if it has one) with an ``AggregateCache`` of the same
    size. A size of 0 (``cache_size=0``) means no cache: eventsourcing makes that an
    unbounded ``Cache``, which would keep every aggregate ever written; the write path then
    loads each aggregate from the store instead."""
    cache = ledger.repository.cache
    if isinstance(cache, LRUCache):
        ledger.repository.cache = AggregateCache(cache.maxsize)
    elif cache is not None and not isinstance(cache, AggregateCache):
        ledger.repository.cache = None
