"""Linked lists' staging, on the aggregates alone (no store, no ledger)."""

from __future__ import annotations

from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest

from daybook.domain.accounts import Account
from daybook.domain.errors import DomainError
from daybook.domain.events import LedgerAggregate
from daybook.domain.inventory import Inventory
from daybook.domain.linked import Staged
from daybook.domain.values import inventory_id

A = TypeVar("A", bound=LedgerAggregate)


class Batch:
    """The aggregates a handler works on, in a dict."""

    now = None

    def __init__(self) -> None:
        self.aggregates: dict[UUID, LedgerAggregate] = {}

    def find(self, kind: type[A], key: Any) -> A | None:
        aggregate = self.aggregates.get(kind.id_for(key))
        return aggregate if isinstance(aggregate, kind) else None

    def get(self, kind: type[A], key: Any) -> A:
        aggregate = self.find(kind, key)
        if aggregate is None:
            raise kind.not_found(key)
        return aggregate

    def add(self, aggregate: A) -> A:
        self.aggregates[aggregate.id] = aggregate
        return aggregate

    def taken(self, kind: type[A], key: Any) -> bool:
        return kind.id_for(key) in self.aggregates

    def confirm_refusal(self) -> None:
        """Nothing here is behind a store."""


def test_a_list_cannot_create_an_aggregate_it_holds_already() -> None:
    """Replacing it would drop what the list did to it, while the receipts stand."""
    staged = Staged(Batch())
    account_id = uuid4()
    staged.add(Account.open(account_id, "ann", "EUR", 0))
    staged.get(Account, account_id).deposit(700)
    with pytest.raises(ValueError, match=str(account_id)):
        staged.add(Account.open(account_id, "bob", "USD", 0))
    assert staged.get(Account, account_id).balance == 700


def test_a_list_refuses_an_aggregate_on_an_id_it_holds_one_of_another_kind_of() -> None:
    """A refusal with a code (the store would refuse the creation anyway), not a crash."""
    staged = Staged(Batch())
    staged.add(Account.open(inventory_id("SKU-1"), "mallory", "EUR", 0))
    with pytest.raises(DomainError) as refused:
        staged.add(Inventory.create(inventory_id("SKU-1"), "SKU-1"))
    assert refused.value.code == "id_taken"
    assert "(Account)" in str(refused.value)


def test_a_list_inside_a_list_hands_its_changes_back_to_it() -> None:
    batch = Batch()
    account_id = uuid4()
    outer = Staged(batch)
    outer.add(Account.open(account_id, "ann", "EUR", 0))
    inner = Staged(outer)
    inner.get(Account, account_id).deposit(700)
    inner.hand_back()
    outer.get(Account, account_id).deposit(50)
    outer.hand_back()
    assert batch.get(Account, account_id).balance == 750
