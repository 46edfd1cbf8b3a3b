"""What a hold toward a busy merchant costs its commit, as others keep crediting it."""

from __future__ import annotations

import pytest

from daybook import open_ledger
from daybook.domain.holds import PlaceHold


@pytest.mark.xfail(strict=True, reason="a merchant only read stays cached at its first version")
def test_the_version_a_hold_checks_its_merchant_from_keeps_up(shared_store_url: str) -> None:
    """The commit checks the merchant's events newer than the version the hold judged,
    under the lock every writer takes: judged on a cached copy that never moves on (this
    writer only reads the merchant; others credit it), that range grows with every credit,
    and so does the check."""
    with (
        open_ledger(shared_store_url, group_commit=False) as ours,
        open_ledger(shared_store_url, group_commit=False) as theirs,
    ):
        payer = ours.open_account("payer", "EUR").account_id
        shop = ours.open_account("shop", "EUR").account_id
        ours.deposit(payer, 1_000)
        ours.hold(payer, 1, destination=shop, timeout=600)  # the merchant cached here
        for _ in range(3):
            for _ in range(20):
                theirs.deposit(shop, 1)
            ours.hold(payer, 1, destination=shop, timeout=600)
        prepared = ours.service.prepare([PlaceHold(payer, 1, destination=shop, timeout=600)])
        ((_, version, _),) = prepared.uow.reads()
        latest = ours.service.latest_versions([shop])[shop]
        assert latest - version < 20, f"judged at version {version}, the merchant is at {latest}"
