"""What a command only reads, checked when its batch commits."""

from __future__ import annotations

from typing import Any

import pytest

from daybook import open_ledger
from daybook.domain.holds import PlaceHold


def test_a_saga_step_refused_out_of_stock_commits_while_the_sku_keeps_changing(
    shared_store_url: str,
) -> None:
    """A reserve step refused out_of_stock records the step's failure; it only read the
    SKU, and its refusal was confirmed on the latest state. Stock another writer receives
    (not enough to change the answer) must not refuse the commit of that failure."""
    from daybook import place_order
    from daybook.domain.sagas import RunLocalStep, Saga

    ours = open_ledger(shared_store_url, group_commit=False)
    theirs = open_ledger(shared_store_url, group_commit=False)
    try:
        customer = ours.open_account("ann", "EUR").account_id
        merchant = ours.open_account("shop", "EUR").account_id
        ours.receive_stock("KETTLE", 1)
        ours.deposit(customer, 50_000)
        saga_id = place_order(ours, "order-1", customer, merchant, [("KETTLE", 100, 450)]).saga_id
        assert saga_id is not None
        commits = 0
        insert = ours.service.recorder.insert_events

        def counted(stored: Any, **options: Any) -> Any:
            nonlocal commits
            commits += 1
            theirs.receive_stock("KETTLE", 1)  # the SKU moves on before every commit of ours
            return insert(stored, **options)

        ours.service.recorder.insert_events = counted  # type: ignore[method-assign]
        ours.execute(RunLocalStep(saga_id, "reserve-0"))
        ours.service.recorder.insert_events = insert  # type: ignore[method-assign]
        view = ours.read(Saga, saga_id).view()
        assert view.last_error is not None, view
        assert commits == 1, f"{commits} commits to record one refused step"
    finally:
        ours.close()
        theirs.close()


def test_what_only_a_caught_refusal_read_is_not_checked_at_the_commit(
    shared_store_url: str,
) -> None:
    """The same, one commit: the refusal was confirmed on the latest state when it was
    judged, as any refusal is; the SKU it read is not among what the commit checks
    (Inventory's changes_for_readers is None: any event would refuse the commit)."""
    from daybook import place_order
    from daybook.domain.sagas import RunLocalStep

    ours = open_ledger(shared_store_url, group_commit=False)
    theirs = open_ledger(shared_store_url, group_commit=False)
    try:
        customer = ours.open_account("ann", "EUR").account_id
        merchant = ours.open_account("shop", "EUR").account_id
        ours.receive_stock("KETTLE", 1)
        saga_id = place_order(ours, "order-1", customer, merchant, [("KETTLE", 100, 450)]).saga_id
        prepared = ours.service.prepare([RunLocalStep(saga_id, "reserve-0")])
        assert prepared.uow.reads() == []
        theirs.receive_stock("KETTLE", 1)
        ours.service.commit(prepared)
    finally:
        ours.close()
        theirs.close()


def _closed_behind_our_cache(ours: Any, theirs: Any) -> tuple[Any, Any, Any]:
    payer = ours.open_account("payer", "EUR").account_id
    shop = ours.open_account("shop", "EUR").account_id
    other = ours.open_account("other", "EUR").account_id
    ours.deposit(payer, 1_000)
    ours.deposit(shop, 1)  # cached here, open
    theirs.withdraw(shop, 1)
    theirs.close_account(shop)
    return payer, shop, other


@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group"])
def test_a_batch_with_a_hold_toward_an_account_closed_elsewhere(
    shared_store_url: str, group_commit: bool
) -> None:
    from daybook import AccountClosed, Receipt
    from daybook.domain.accounts import Deposit

    with (
        open_ledger(shared_store_url, group_commit=group_commit) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        payer, shop, other = _closed_behind_our_cache(ours, theirs)
        outcomes = ours.submit(
            [
                PlaceHold(payer, 100, destination=shop, timeout=600),
                Deposit(other, 5),
                PlaceHold(payer, 100, destination=shop, timeout=600),
                Deposit(shop, 5),  # the account read above, changed by a later command
                Deposit(other, 7),
            ]
        )
        kinds = [type(o).__name__ for o in outcomes]
        assert kinds == ["AccountClosed", "Receipt", "AccountClosed", "AccountClosed", "Receipt"]
        assert isinstance(outcomes[1], Receipt) and isinstance(outcomes[0], AccountClosed)
        assert theirs.account(payer).available == 1_000
        assert theirs.account(other).balance == 12


def test_a_linked_list_with_a_hold_toward_an_account_closed_elsewhere(
    shared_store_url: str,
) -> None:
    from daybook import AccountClosed
    from daybook.domain.accounts import Deposit

    with (
        open_ledger(shared_store_url, group_commit=False) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        payer, shop, other = _closed_behind_our_cache(ours, theirs)
        with pytest.raises(AccountClosed):
            ours.atomic([Deposit(other, 5), PlaceHold(payer, 100, destination=shop, timeout=600)])
        assert theirs.account(payer).available == 1_000
        assert theirs.account(other).balance == 0


def test_a_saga_hold_step_toward_a_merchant_closed_elsewhere(shared_store_url: str) -> None:
    from daybook import place_order
    from daybook.domain.sagas import RunLocalStep, Saga

    with (
        open_ledger(shared_store_url, group_commit=False) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        customer = ours.open_account("ann", "EUR").account_id
        merchant = ours.open_account("shop", "EUR").account_id
        ours.receive_stock("KETTLE", 5)
        ours.deposit(customer, 50_000)
        saga_id = place_order(ours, "order-1", customer, merchant, [("KETTLE", 1, 4_500)]).saga_id
        ours.execute(RunLocalStep(saga_id, "reserve-0"))
        theirs.close_account(merchant)
        ours.execute(RunLocalStep(saga_id, "hold"))
        view = ours.read(Saga, saga_id).view()
        assert "hold" not in view.results, view
        assert theirs.account(customer).available == 50_000


def _a_merchant_only_read_here(ours: Any) -> tuple[Any, Any]:
    """A payer and a merchant, the merchant cached by ``ours`` as the destination of a hold
    (read, not changed)."""
    payer = ours.open_account("payer", "EUR").account_id
    shop = ours.open_account("shop", "EUR").account_id
    ours.deposit(payer, 1_000)
    ours.hold(payer, 1, destination=shop, timeout=600)
    return payer, shop


def test_the_version_a_hold_checks_its_merchant_from_keeps_up(shared_store_url: str) -> None:
    """The commit checks the merchant's events newer than the version the hold judged,
    under the lock every writer takes. This writer only reads the merchant and others credit
    it: its cached copy is brought up to date after each commit that read it, so the range
    checked stays what others wrote since. (Kept at the version first cached, it grew with
    every credit, and so did the check.)"""
    with (
        open_ledger(shared_store_url, group_commit=False) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        payer, shop = _a_merchant_only_read_here(ours)
        for _ in range(3):
            for _ in range(20):
                theirs.deposit(shop, 1)
            ours.hold(payer, 1, destination=shop, timeout=600)
        prepared = ours.service.prepare([PlaceHold(payer, 1, destination=shop, timeout=600)])
        ((_, version, _),) = prepared.uow.reads()
        latest = ours.service.latest_versions([shop])[shop]
        assert latest - version < 20, f"judged at version {version}, the merchant is at {latest}"


def test_an_account_only_read_is_caught_up_in_a_copy(shared_store_url: str) -> None:
    """Caching a committed batch brings the accounts it only read up to date, in a copy:
    under group commit the batch built on this one copies its aggregates in another thread
    while it is cached, and a copy taken half-way through a change in place could pair one
    version with another balance."""
    with (
        open_ledger(shared_store_url, group_commit=False) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        payer, shop = _a_merchant_only_read_here(ours)
        prepared = ours.service.prepare([PlaceHold(payer, 1, destination=shop, timeout=600)])
        judged = prepared.uow.aggregates[shop.int]
        version, balance = judged.version, judged.balance  # type: ignore[attr-defined]
        theirs.deposit(shop, 7)
        ours.service.commit(prepared)
        assert (judged.version, judged.balance) == (version, balance)  # type: ignore[attr-defined]
        cached = ours.service.repository.cache.get(shop)  # type: ignore[union-attr]
        assert (cached.version, cached.balance) == (version + 1, balance + 7)


def test_a_batch_built_on_the_one_before_judges_an_account_it_only_read_at_its_latest(
    shared_store_url: str,
) -> None:
    """Under steady load each batch is built on the one still committing, and takes the
    aggregates from it rather than from the cache. An account both only read was taken at
    the version first cached, batch after batch, while others credited it: each commit
    then checked, and each caching caught up, every event since. The batch takes the
    cache's copy when the one before only read it and the cache has a newer one."""
    with (
        open_ledger(shared_store_url, group_commit=False) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        service = ours.service
        payer = ours.open_account("payer", "EUR").account_id
        shop = ours.open_account("shop", "EUR").account_id
        ours.deposit(payer, 1_000)
        first = service.prepare([PlaceHold(payer, 1, destination=shop, timeout=600)])
        theirs.deposit(shop, 5)
        service.commit(first)  # cached: the shop caught up to the deposit
        second = service.new_batch(after=first)
        service.apply(second, [PlaceHold(payer, 1, destination=shop, timeout=600)])
        ((_, version, _),) = second.uow.reads()
        assert version == service.latest_versions([shop])[shop]
        service.commit(second)
        assert ours.account(payer).held == 2
