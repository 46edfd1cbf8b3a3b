"""``views.balances(...)``: many balances read at one log position, so totals never tear,
even while transfers are being applied."""

from __future__ import annotations

import random
import threading
import uuid

from daybook import open_ledger, run_projections


def test_a_snapshot_total_never_tears_while_transfers_apply(store_url: str) -> None:
    with open_ledger(store_url) as ledger, run_projections(ledger) as runner:
        accounts = [ledger.open_account(f"owner-{i}", "EUR").account_id for i in range(10)]
        for account in accounts:
            assert account is not None
            last = ledger.deposit(account, 1_000)
        done = threading.Event()
        moved: list[int] = [last.position]

        def transfers() -> None:
            rng = random.Random(3)
            for _ in range(300):
                source, destination = rng.sample(accounts, 2)
                receipt = ledger.transfer(source, destination, rng.randint(1, 50))  # type: ignore[arg-type]
                moved.append(receipt.position)
            done.set()

        mover = threading.Thread(target=transfers)
        mover.start()
        positions = set()
        while not done.is_set() or not positions:
            # Wait for the newest transfer seen so far: each read is at a later position,
            # taken while the runner may be applying the next ones.
            snapshot = runner.views.balances(min_position=moved[-1], timeout=10)
            assert snapshot.totals == {"EUR": 10_000}
            assert len(snapshot.balances) == 10 and snapshot.missing == ()
            positions.add(snapshot.as_of_position)
        mover.join()
        final = runner.views.balances(min_position=ledger.head(), timeout=10)
        assert final.totals == {"EUR": 10_000}
        assert {b.account_id: b.balance for b in final.balances} == {
            a: ledger.account(a).balance
            for a in accounts  # type: ignore[arg-type]
        }
        assert positions  # it read while the transfers were being applied


def test_a_snapshot_of_listed_ids_says_which_it_did_not_find(store_url: str) -> None:
    with open_ledger(store_url) as ledger, run_projections(ledger) as runner:
        ann = ledger.open_account("ann", "EUR").account_id
        bob = ledger.open_account("bob", "USD").account_id
        ledger.deposit(ann, 5)  # type: ignore[arg-type]
        receipt = ledger.deposit(bob, 7)  # type: ignore[arg-type]
        nobody = uuid.uuid4()
        snapshot = runner.views.balances(
            [bob, str(nobody), ann],  # type: ignore[list-item]
            min_position=receipt.position,
        )
        assert [b.account_id for b in snapshot.balances] == [bob, ann]
        assert snapshot.missing == (nobody,)
        assert snapshot.totals == {"EUR": 5, "USD": 7}
        page = runner.views.balance_page(limit=1)
        rest = runner.views.balance_page(after=page.next_after, limit=1)
        assert {page.balances[0].account_id, rest.balances[0].account_id} == {ann, bob}
        assert rest.next_after is None
