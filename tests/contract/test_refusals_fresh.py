"""A refusal is judged on fresh state: not on an account an earlier command of the same batch
read from the store (or found absent there) while another process changed it since."""

from __future__ import annotations

import threading
import time
from uuid import UUID

from daybook import Receipt, open_ledger
from daybook.domain.accounts import Deposit, Withdraw
from daybook.domain.errors import DomainError
from daybook.infrastructure.ledger.group_commit import GroupCommitter
from tests.contract.test_isolation import hold_commits


def _applied(committer: GroupCommitter, count: int) -> None:
    deadline = time.monotonic() + 10
    while (b := committer._building) is None or len(b.items) < count:
        assert time.monotonic() < deadline, "the command never reached the batch"
        time.sleep(0.001)


def test_a_refusal_is_not_judged_on_an_account_read_earlier_in_the_batch(
    shared_store_url: str,
) -> None:
    """A withdrawal sent after another process's deposit was acknowledged is refused
    ``insufficient_funds`` (and the refusal recorded under its request id), because an
    earlier command of the same batch loaded the account from the store before the deposit."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    committer = ours.service.committer
    assert isinstance(committer, GroupCommitter)
    spare = ours.open_account("spare", "EUR").account_id
    account = theirs.open_account("ann", "EUR").account_id  # not in our cache
    assert account is not None and spare is not None
    entered, release = hold_commits(ours.service)
    held = threading.Thread(target=ours.deposit, args=(spare, 1))
    held.start()
    assert entered.wait(10)
    outcomes: dict[str, object] = {}

    def send(name: str, commands: list) -> None:
        outcomes[name] = ours.submit(commands)[0]

    first = threading.Thread(target=send, args=("w-1", [Withdraw(account, 50, request_id="w-1")]))
    first.start()
    _applied(committer, 1)  # refused on the balance read from the store: 0, right then
    assert theirs.deposit(account, 100).position > 0  # acknowledged before w-2 is sent
    second = threading.Thread(
        target=send,
        args=("w-2", [Withdraw(account, 50, request_id="w-2")] + [Deposit(spare, 1)] * 3),
    )
    second.start()
    _applied(committer, 5)
    release.set()
    for thread in (held, first, second):
        thread.join(10)
    assert isinstance(outcomes["w-1"], DomainError)
    outcome = outcomes["w-2"]
    assert isinstance(outcome, Receipt), f"w-2 was refused on a stale balance: {outcome!r}"
    assert ours.account(account).balance == 50
    ours.close()
    theirs.close()


def test_a_deposit_is_not_refused_account_not_found_for_an_account_opened_meanwhile(
    shared_store_url: str,
) -> None:
    """The same with an account that did not exist when an earlier command of the batch
    looked for it: opened by another process, acknowledged, then deposited to."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    committer = ours.service.committer
    assert isinstance(committer, GroupCommitter)
    spare = ours.open_account("spare", "EUR").account_id
    chosen = UUID("3f1c8a52-9d4e-4b7a-8c61-2e5f9a0b7d13")
    entered, release = hold_commits(ours.service)
    held = threading.Thread(target=ours.deposit, args=(spare, 1))
    held.start()
    assert entered.wait(10)
    outcomes: dict[str, object] = {}

    def send(name: str, commands: list) -> None:
        outcomes[name] = ours.submit(commands)[0]

    first = threading.Thread(target=send, args=("d-1", [Deposit(chosen, 5, request_id="d-1")]))
    first.start()
    _applied(committer, 1)  # account_not_found: right then, it did not exist
    theirs.open_account("ann", "EUR", account_id=chosen)  # acknowledged before d-2 is sent
    second = threading.Thread(
        target=send,
        args=("d-2", [Deposit(chosen, 5, request_id="d-2")] + [Deposit(spare, 1)] * 3),
    )
    second.start()
    _applied(committer, 5)
    release.set()
    for thread in (held, first, second):
        thread.join(10)
    outcome = outcomes["d-2"]
    assert isinstance(outcome, Receipt), f"d-2 was refused on a stale read: {outcome!r}"
    # Recorded: the retry replays the wrong refusal for the whole retention window.
    assert ours.deposit(chosen, 5, request_id="d-2").replayed
    ours.close()
    theirs.close()
