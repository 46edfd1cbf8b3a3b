"""The ledger's aggregate cache keeps the most recently used aggregates, like eventsourcing's."""

from __future__ import annotations

from uuid import uuid4

import pytest

from daybook import open_ledger
from daybook.infrastructure.ledger.cache import AggregateCache


def test_it_evicts_the_least_recently_used() -> None:
    cache = AggregateCache(maxsize=2)
    a, b, c = uuid4(), uuid4(), uuid4()
    cache.put(a, "A")
    cache.put(b, "B")
    assert cache.get(a) == "A"  # a is now the most recent
    cache.put(c, "C")  # evicts b
    with pytest.raises(KeyError):
        cache.get(b)
    assert (cache.get(a), cache.get(c)) == ("A", "C")
    cache.put(a, "A2")  # replacing refreshes too
    cache.put(b, "B")  # evicts c
    with pytest.raises(KeyError):
        cache.get(c)
    assert cache.get(a, evict=True) == "A2"
    with pytest.raises(KeyError):
        cache.get(a)


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
