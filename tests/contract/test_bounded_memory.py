"""Memory stays bounded under continuous load: committed batches are released.

Group commit builds each batch on the state of the one still committing. Once that batch
has committed nothing may keep it alive, or a process under steady load holds every batch
it ever built (with its aggregate copies) until the load pauses.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from daybook import Settings, open_ledger
from daybook.domain.accounts import OpenAccount
from daybook.domain.holds import Hold
from daybook.infrastructure.ledger.application import PreparedBatch, UnitOfWork
from daybook.infrastructure.ledger.group_commit import GroupCommitter
from scripts.streams import wait_until

CLIENTS = 16
BATCHES = 2_000
MAX_BATCH = 4  # small batches: callers always wait, so a batch is always being built


def test_live_units_of_work_stay_bounded_under_continuous_load(store_url: str) -> None:
    ledger = open_ledger(store_url, group_commit=False)
    service = ledger.service
    accounts = [ledger.open_account(f"owner-{i}", "EUR").account_id for i in range(32)]
    for account in accounts:
        ledger.deposit(account, 1_000_000)
    service.install_committer(lambda s: GroupCommitter(s, max_batch=MAX_BATCH))

    live: weakref.WeakSet[UnitOfWork] = weakref.WeakSet()
    samples: list[tuple[int, int]] = []  # (live units of work, aggregate copies they hold)
    built = 0
    new_batch = service.new_batch

    def counting_new_batch(**options: Any) -> PreparedBatch:
        nonlocal built
        prepared = new_batch(**options)
        live.add(prepared.uow)
        built += 1
        units = list(live)
        samples.append((len(units), sum(len(u.aggregates) for u in units)))
        return prepared

    service.new_batch = counting_new_batch  # type: ignore[method-assign]
    stop = threading.Event()

    def client(number: int) -> None:
        step = 0
        while not stop.is_set():
            source = accounts[(number + step) % len(accounts)]
            destination = accounts[(number + step + 1) % len(accounts)]
            ledger.transfer(source, destination, 1)
            step += 1
            if built >= BATCHES:
                stop.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert built >= BATCHES
    most_units = max(units for units, _ in samples)
    most_copies = max(copies for _, copies in samples)
    # At any moment: the batch committing, the one being built on it, and one the careful
    # path may be re-running. Each holds at most two accounts per transfer.
    assert most_units <= 3, f"{most_units} units of work alive at once"
    assert most_copies <= 3 * MAX_BATCH * 2, f"{most_copies} aggregate copies alive at once"
    balances = sum(ledger.account(a).balance for a in accounts)
    assert balances == 1_000_000 * len(accounts)
    ledger.close()


def test_resolved_holds_leave_the_aggregate_cache(store_url: str) -> None:
    """A captured or voided hold never changes again. Cached, every one would push a live
    aggregate out, and a process would hold one per hold it ever resolved until the cache
    is full; a read that loads one again does not cache it either."""
    ledger = open_ledger(store_url)
    try:
        account = ledger.open_account("alice", "EUR").account_id
        assert account is not None
        ledger.deposit(account, 10_000)
        cache = ledger.service.repository.cache
        holds = [ledger.hold(account, 10, timeout=60).hold_id for _ in range(20)]
        aggregates = {Hold.id_for(hold_id) for hold_id in holds}
        # The ledger's writer caches a batch's aggregates just after it has answered the
        # batch's callers: on a busy machine a caller may look before then. So the cache is
        # looked at until the writer has done so, for the open holds and the resolved ones.
        wait_until(lambda: aggregates <= set(cache.ids()), "the open holds to be cached")
        open_one = Hold.id_for(ledger.hold(account, 10, timeout=60).hold_id)
        for n, hold_id in enumerate(holds):
            assert hold_id is not None
            if n % 2:
                ledger.capture(hold_id)
            else:
                ledger.void(hold_id)
            assert ledger.hold_status(hold_id).status in ("captured", "voided")
        wait_until(lambda: not set(cache.ids()) & aggregates, "the resolved holds to leave it")
        assert {account, open_one} <= set(cache.ids())
        assert ledger.account(account).held == 10
    finally:
        ledger.close()


def test_a_cache_size_of_zero_keeps_no_aggregates(store_url: str) -> None:
    """``cache_size=0`` turns the aggregate cache off: every command loads its aggregates
    from the store, and none stays in memory (not all of them, without a bound)."""
    settings = Settings.load(url=store_url, cache_size=0)
    with open_ledger(settings=settings) as ledger:
        opened = ledger.submit([OpenAccount(f"owner-{n}", "EUR") for n in range(50)])
        accounts = [receipt.account_id for receipt in opened]
        ledger.deposit(accounts[0], 100)
        ledger.transfer(accounts[0], accounts[1], 40)
        ledger.receive_stock("SKU-1", 10)
        ledger.reserve_stock("SKU-1", 1, reservation_id="r-1")
        assert ledger.service.repository.cache is None
        assert ledger.account(accounts[1]).balance == 40
        assert ledger.inventory("SKU-1").reserved == 1
