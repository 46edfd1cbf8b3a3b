"""The ledger's cache of aggregates, on the write path of every command."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any
from uuid import UUID

from eventsourcing.application import Cache, LRUCache

from daybook.infrastructure.ledger.application import LedgerService


class AggregateCache(Cache[UUID, Any]):
    """eventsourcing's ``LRUCache`` on an ``OrderedDict``: the same recency order, kept by
    C code rather than a linked list of Python lists, and keyed by ``UUID.int`` (a UUID's
    hash is computed by Python code on every lookup, an int's is not). Each command reads
    two aggregates from it and each commit writes them back."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self._entries: OrderedDict[int, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: UUID, *, evict: bool = False) -> Any:
        entry = key.int
        with self.lock:
            if evict:
                return self._entries.pop(entry)
            value = self._entries[entry]
            self._entries.move_to_end(entry)
            return value

    def ids(self) -> list[UUID]:
        """The ids of the cached aggregates, least recently used first."""
        with self.lock:
            return [UUID(int=entry) for entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: UUID, value: Any) -> None:
        entry = key.int
        if value.settled or value.write_once:
            # Nothing will change it again, so no command needs it at hand. Kept, one per
            # resolved hold and finished saga would push live aggregates out, and a process
            # would hold as many as the cache has room for (a finished saga is a few KB).
            # Write-once aggregates (reservation claims) likewise: read only to refuse a
            # repeat, they would come in through the repository's reads, one per repeat.
            with self.lock:
                self._entries.pop(entry, None)
            return
        with self.lock:
            self._entries[entry] = value
            self._entries.move_to_end(entry)
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)


def install_aggregate_cache(ledger: LedgerService) -> None:
    """Replace the ledger's LRU cache (if it has one) with an ``AggregateCache`` of the same
    size."""
    cache = ledger.repository.cache
    if isinstance(cache, LRUCache):
        ledger.repository.cache = AggregateCache(cache.maxsize)
