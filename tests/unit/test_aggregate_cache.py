"""The ledger's aggregate cache keeps the most recently used aggregates, like eventsourcing's."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import uuid4

import pytest

from daybook import open_ledger
from daybook.infrastructure.ledger.cache import AggregateCache


@dataclass(frozen=True)
class Cached:
    """What the cache holds: anything with ``settled`` and ``write_once`` (an aggregate)."""

    name: str
    settled: bool = False
    write_once: bool = False


def test_it_evicts_the_least_recently_used() -> None:
    cache = AggregateCache(maxsize=2)
    a, b, c = uuid4(), uuid4(), uuid4()
    cache.put(a, Cached("A"))
    cache.put(b, Cached("B"))
    assert cache.get(a) == Cached("A")  # a is now the most recent
    cache.put(c, Cached("C"))  # evicts b
    with pytest.raises(KeyError):
        cache.get(b)
    assert (cache.get(a), cache.get(c)) == (Cached("A"), Cached("C"))
    cache.put(a, Cached("A2"))  # replacing refreshes too
    cache.put(b, Cached("B"))  # evicts c
    with pytest.raises(KeyError):
        cache.get(c)
    assert cache.get(a, evict=True) == Cached("A2")
    with pytest.raises(KeyError):
        cache.get(a)


def test_a_settled_value_is_not_kept_and_drops_the_one_it_replaces() -> None:
    cache = AggregateCache(maxsize=2)
    a, b = uuid4(), uuid4()
    cache.put(a, Cached("A"))
    cache.put(a, Cached("A", settled=True))
    cache.put(b, Cached("B", settled=True))
    assert cache.ids() == []


def test_the_ledger_uses_it_with_the_configured_size() -> None:
    ledger = open_ledger("memory://", group_commit=False)
    try:
        cache = ledger.service.repository.cache
        assert isinstance(cache, AggregateCache)
        assert cache.maxsize == int(ledger.service.env["AGGREGATE_CACHE_MAXSIZE"])
        account = ledger.open_account("Ada", "EUR").account_id
        assert cache.get(account).id == account
    finally:
        ledger.close()


def test_write_once_values_are_kept_apart_in_a_small_lru() -> None:
    """Reservation claims come in through the reads that refuse repeats: kept apart, a
    flood of them never pushes live aggregates out, and their own LRU stays bounded."""
    cache = AggregateCache(maxsize=3)
    live = uuid4()
    cache.put(live, Cached("live"))
    claims = [uuid4() for _ in range(cache.once_maxsize + 2)]
    for claim in claims:
        cache.put(claim, Cached("claim", write_once=True))
    assert cache.ids() == [live] and len(cache) == 1
    assert cache.get(live) == Cached("live")
    assert cache.get(claims[-1]) == Cached("claim", write_once=True)
    with pytest.raises(KeyError):
        cache.get(claims[0])  # the oldest went
    assert cache.get(claims[-1], evict=True).write_once
    with pytest.raises(KeyError):
        cache.get(claims[-1])
