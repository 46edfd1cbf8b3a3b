"""A refusal is judged on fresh state: not on an account an earlier command of the same batch
read from the store (or found absent there) while another process changed it since."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

from daybook import Receipt, open_ledger, place_order
from daybook.domain.accounts import Deposit, Withdraw
from daybook.domain.errors import DomainError
from daybook.domain.holds import ExpireHold, PlaceHold
from daybook.domain.sagas import RunLocalStep
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


def test_a_refusal_is_not_judged_on_an_account_an_accepted_command_only_read(
    shared_store_url: str,
) -> None:
    """An earlier command of the batch, accepted, only read the account (a hold towards it):
    its copy is brought up to date too (a deposit does not change what that command judged
    of it), and the withdrawal is accepted."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    assert isinstance(ours.service.committer, GroupCommitter)
    spare = ours.open_account("spare", "EUR").account_id
    payer = ours.open_account("payer", "EUR").account_id
    ours.deposit(payer, 100)
    x = theirs.open_account("x", "EUR").account_id  # not in our cache
    entered, release = hold_commits(ours.service)
    held = threading.Thread(target=ours.deposit, args=(spare, 1))
    held.start()
    assert entered.wait(10)
    outcomes: dict[str, object] = {}

    def send(name: str, commands: list) -> None:
        outcomes[name] = ours.submit(commands)[0]

    first = threading.Thread(
        target=send, args=("h", [PlaceHold(payer, 10, destination=x, timeout=600)])
    )
    first.start()
    _applied(ours.service.committer, 1)
    assert theirs.deposit(x, 100).position > 0  # acknowledged before w is sent
    second = threading.Thread(
        target=send, args=("w", [Withdraw(x, 50, request_id="w")] + [Deposit(spare, 1)] * 3)
    )
    second.start()
    _applied(ours.service.committer, 5)
    release.set()
    for thread in (held, first, second):
        thread.join(10)
    assert isinstance(outcomes["h"], Receipt)
    assert isinstance(outcomes["w"], Receipt), f"w refused on a stale balance: {outcomes['w']!r}"
    ours.close()
    theirs.close()


def test_a_saga_step_is_not_recorded_failed_on_an_account_read_earlier_in_the_batch(
    shared_store_url: str,
) -> None:
    """README: a step refused (recorded as the step's failure) is judged on the latest
    committed state. The customer was read from the store by an earlier command of the
    batch; another process funds it (acknowledged); the hold step runs."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    assert isinstance(ours.service.committer, GroupCommitter)
    spare = ours.open_account("spare", "EUR").account_id
    customer = theirs.open_account("ann", "EUR").account_id
    merchant = theirs.open_account("shop", "EUR").account_id
    theirs.receive_stock("KETTLE", 5)
    saga_id = place_order(theirs, "order-1", customer, merchant, [("KETTLE", 1, 4_500)]).saga_id
    theirs.execute(RunLocalStep(saga_id, "reserve-0"))
    entered, release = hold_commits(ours.service)
    held = threading.Thread(target=ours.deposit, args=(spare, 1))
    held.start()
    assert entered.wait(10)
    outcomes: dict[str, object] = {}

    def send(name: str, commands: list) -> None:
        outcomes[name] = ours.submit(commands)[0]

    first = threading.Thread(target=send, args=("w", [Withdraw(customer, 1, request_id="w")]))
    first.start()
    _applied(ours.service.committer, 1)  # refused: balance 0 right then
    assert theirs.deposit(customer, 10_000).position > 0
    second = threading.Thread(
        target=send, args=("s", [RunLocalStep(saga_id, "hold")] + [Deposit(spare, 1)] * 3)
    )
    second.start()
    _applied(ours.service.committer, 5)
    release.set()
    for thread in (held, first, second):
        thread.join(10)
    assert isinstance(outcomes["s"], Receipt), outcomes["s"]
    failed = [e for e in theirs.service.events.get(saga_id) if type(e).__name__ == "StepFailed"]
    assert not failed, f"hold step recorded as failed on a stale balance: {failed[0].__dict__}"
    ours.close()
    theirs.close()


def test_a_reader_whose_account_closed_meanwhile_is_judged_again_not_committed(
    shared_store_url: str,
) -> None:
    """As above, but the other process closed the account the accepted hold is towards: a
    change that accepted command's judgement rests on. Bringing the copy up to date for the
    later refusal must not hide it from the commit's check, which refuses the batch: both
    commands are judged again on fresh state, and the hold towards a closed account is
    refused."""
    ours = open_ledger(shared_store_url)
    theirs = open_ledger(shared_store_url, group_commit=False)
    assert isinstance(ours.service.committer, GroupCommitter)
    spare = ours.open_account("spare", "EUR").account_id
    payer = ours.open_account("payer", "EUR").account_id
    ours.deposit(payer, 100)
    x = theirs.open_account("x", "EUR").account_id  # not in our cache
    entered, release = hold_commits(ours.service)
    held = threading.Thread(target=ours.deposit, args=(spare, 1))
    held.start()
    assert entered.wait(10)
    outcomes: dict[str, object] = {}

    def send(name: str, commands: list) -> None:
        outcomes[name] = ours.submit(commands)[0]

    first = threading.Thread(
        target=send, args=("h", [PlaceHold(payer, 10, destination=x, timeout=600)])
    )
    first.start()
    _applied(ours.service.committer, 1)
    assert theirs.close_account(x).position > 0  # acknowledged before w is sent
    second = threading.Thread(
        target=send, args=("w", [Withdraw(x, 50, request_id="w")] + [Deposit(spare, 1)] * 3)
    )
    second.start()
    _applied(ours.service.committer, 5)
    release.set()
    for thread in (held, first, second):
        thread.join(10)
    for name in ("h", "w"):
        outcome = outcomes[name]
        assert isinstance(outcome, DomainError) and outcome.code == "account_closed", outcome
    assert ours.account(payer).held == 0
    ours.close()
    theirs.close()


def test_a_lapsed_hold_expired_releases_the_funds_on_an_account_an_earlier_command_read(
    shared_store_url: str,
) -> None:
    """A refusal a command catches and records (``holding_account``: the account no longer
    counts the hold) is judged on fresh state too: ``ExpireHold`` on an account copy an
    accepted command of the batch read before another process placed the hold. Judged on
    that copy, the hold's funds stayed held on the account for good."""
    ours = open_ledger(shared_store_url, clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    theirs = open_ledger(shared_store_url, group_commit=False)
    assert isinstance(ours.service.committer, GroupCommitter)
    spare = ours.open_account("spare", "EUR").account_id
    payer = ours.open_account("payer", "EUR").account_id
    ours.deposit(payer, 100)
    x = theirs.open_account("x", "EUR").account_id  # not in our cache
    theirs.deposit(x, 100)
    entered, release = hold_commits(ours.service)
    held = threading.Thread(target=ours.deposit, args=(spare, 1))
    held.start()
    assert entered.wait(10)
    outcomes: dict[str, object] = {}

    def send(name: str, commands: list) -> None:
        outcomes[name] = ours.submit(commands)[0]

    first = threading.Thread(
        target=send, args=("h", [PlaceHold(payer, 10, destination=x, timeout=600)])
    )
    first.start()
    _applied(ours.service.committer, 1)
    hold_id = theirs.submit([PlaceHold(x, 30, timeout=60)])[0].hold_id
    second = threading.Thread(
        target=send, args=("e", [ExpireHold(hold_id)] + [Deposit(spare, 1)] * 3)
    )
    second.start()
    _applied(ours.service.committer, 5)
    release.set()
    for thread in (held, first, second):
        thread.join(10)
    assert isinstance(outcomes["h"], Receipt), outcomes["h"]
    assert isinstance(outcomes["e"], Receipt), outcomes["e"]
    names = [type(e).__name__ for e in theirs.service.events.get(x)]
    assert "HoldReleased" in names, f"the expired hold's funds stay held on x: {names}"
    ours.close()
    theirs.close()
