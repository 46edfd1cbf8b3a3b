"""A refusal is judged on fresh state: not on an account an earlier command of the same batch
read from the store (or found absent there) while another process changed it since.

Each test makes one batch of our ledger (group commit) hold two commands: the first is applied
while the commit before it is held, so the batch waits; then another process (theirs, without
group commit) changes something and is acknowledged; then the second command joins the batch,
with three deposits to a spare account so that it is not alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from daybook import Ledger, Receipt, open_ledger, place_order
from daybook.domain.accounts import Deposit, Withdraw
from daybook.domain.commands import Command
from daybook.domain.errors import DomainError
from daybook.domain.holds import ExpireHold, PlaceHold
from daybook.domain.sagas import RunLocalStep
from daybook.infrastructure.ledger.group_commit import GroupCommitter
from tests.contract.test_isolation import hold_commits

T = TypeVar("T")


def _applied(committer: GroupCommitter, count: int) -> None:
    deadline = time.monotonic() + 10
    while (b := committer._building) is None or len(b.items) < count:
        assert time.monotonic() < deadline, "the command never reached the batch"
        time.sleep(0.001)


@dataclass
class Writers:
    ours: Ledger
    theirs: Ledger
    spare: UUID

    def in_one_batch(
        self, first: Command, meanwhile: Callable[[], T], second: Callable[[T], Command]
    ) -> tuple[Any, Any]:
        """The outcomes of ``first`` and of ``second`` (made from what ``meanwhile``, the
        other process's acknowledged change, returned), applied in one batch of ours."""
        ours = self.ours
        committer = ours.service.committer
        assert isinstance(committer, GroupCommitter)
        entered, release = hold_commits(ours.service)
        held = threading.Thread(target=ours.deposit, args=(self.spare, 1))
        held.start()
        assert entered.wait(10)
        outcomes: dict[str, object] = {}

        def send(name: str, commands: list[Command]) -> None:
            outcomes[name] = ours.submit(commands)[0]

        threads = [held, threading.Thread(target=send, args=("first", [first]))]
        threads[1].start()
        _applied(committer, 1)
        then = second(meanwhile())
        threads.append(
            threading.Thread(target=send, args=("second", [then, *[Deposit(self.spare, 1)] * 3]))
        )
        threads[2].start()
        _applied(committer, 5)
        release.set()
        for thread in threads:
            thread.join(10)
        return outcomes["first"], outcomes["second"]


@contextmanager
def two_writers(url: str, **ours: Any) -> Iterator[Writers]:
    mine = open_ledger(url, **ours)
    theirs = open_ledger(url, group_commit=False)
    try:
        spare = mine.open_account("spare", "EUR").account_id
        assert spare is not None
        yield Writers(mine, theirs, spare)
    finally:
        mine.close()
        theirs.close()


def test_a_refusal_is_not_judged_on_an_account_read_earlier_in_the_batch(
    shared_store_url: str,
) -> None:
    """A withdrawal sent after another process's deposit was acknowledged was refused
    ``insufficient_funds`` (and the refusal recorded under its request id), because an
    earlier command of the same batch loaded the account from the store before the deposit."""
    with two_writers(shared_store_url) as writers:
        account = writers.theirs.open_account("ann", "EUR").account_id  # not in our cache
        assert account is not None
        first, second = writers.in_one_batch(
            Withdraw(account, 50, request_id="w-1"),  # refused: 0 right then
            lambda: writers.theirs.deposit(account, 100),
            lambda _: Withdraw(account, 50, request_id="w-2"),
        )
        assert isinstance(first, DomainError)
        assert isinstance(second, Receipt), f"w-2 was refused on a stale balance: {second!r}"
        assert writers.ours.account(account).balance == 50


def test_a_deposit_is_not_refused_account_not_found_for_an_account_opened_meanwhile(
    shared_store_url: str,
) -> None:
    """The same with an account that did not exist when an earlier command of the batch
    looked for it: opened by another process, acknowledged, then deposited to."""
    chosen = UUID("3f1c8a52-9d4e-4b7a-8c61-2e5f9a0b7d13")
    with two_writers(shared_store_url) as writers:
        _, second = writers.in_one_batch(
            Deposit(chosen, 5, request_id="d-1"),  # account_not_found: right then
            lambda: writers.theirs.open_account("ann", "EUR", account_id=chosen),
            lambda _: Deposit(chosen, 5, request_id="d-2"),
        )
        assert isinstance(second, Receipt), f"d-2 was refused on a stale read: {second!r}"
        # Recorded: a retry replayed the wrong refusal for the whole retention window.
        assert writers.ours.deposit(chosen, 5, request_id="d-2").replayed


def _payer_and_payee(writers: Writers) -> tuple[UUID, UUID]:
    """A funded account of ours, and one of theirs not in our cache."""
    payer = writers.ours.open_account("payer", "EUR").account_id
    assert payer is not None
    writers.ours.deposit(payer, 100)
    payee = writers.theirs.open_account("x", "EUR").account_id
    assert payee is not None
    return payer, payee


def test_a_refusal_is_not_judged_on_an_account_an_accepted_command_only_read(
    shared_store_url: str,
) -> None:
    """An earlier command of the batch, accepted, only read the account (a hold towards it):
    its copy is brought up to date too (a deposit does not change what that command judged
    of it), and the withdrawal is accepted."""
    with two_writers(shared_store_url) as writers:
        payer, x = _payer_and_payee(writers)
        first, second = writers.in_one_batch(
            PlaceHold(payer, 10, destination=x, timeout=600),
            lambda: writers.theirs.deposit(x, 100),
            lambda _: Withdraw(x, 50, request_id="w"),
        )
        assert isinstance(first, Receipt)
        assert isinstance(second, Receipt), f"w refused on a stale balance: {second!r}"


def test_a_reader_whose_account_closed_meanwhile_is_judged_again_not_committed(
    shared_store_url: str,
) -> None:
    """As above, but the other process closed the account the accepted hold is towards: a
    change that accepted command's judgement rests on. Bringing the copy up to date for the
    later refusal must not hide it from the commit's check, which refuses the batch: both
    commands are judged again on fresh state, and the hold towards a closed account is
    refused."""
    with two_writers(shared_store_url) as writers:
        payer, x = _payer_and_payee(writers)
        outcomes = writers.in_one_batch(
            PlaceHold(payer, 10, destination=x, timeout=600),
            lambda: writers.theirs.close_account(x),
            lambda _: Withdraw(x, 50, request_id="w"),
        )
        for outcome in outcomes:
            assert isinstance(outcome, DomainError) and outcome.code == "account_closed", outcome
        assert writers.ours.account(payer).held == 0


def test_a_saga_step_is_not_recorded_failed_on_an_account_read_earlier_in_the_batch(
    shared_store_url: str,
) -> None:
    """README: a step refused (recorded as the step's failure) is judged on the latest
    committed state. The customer was read from the store by an earlier command of the
    batch; another process funds it (acknowledged); the hold step runs."""
    with two_writers(shared_store_url) as writers:
        theirs = writers.theirs
        customer = theirs.open_account("ann", "EUR").account_id
        merchant = theirs.open_account("shop", "EUR").account_id
        assert customer is not None and merchant is not None
        theirs.receive_stock("KETTLE", 5)
        order = place_order(theirs, "order-1", customer, merchant, [("KETTLE", 1, 4_500)])
        saga_id = order.saga_id
        assert saga_id is not None
        theirs.execute(RunLocalStep(saga_id, "reserve-0"))
        _, second = writers.in_one_batch(
            Withdraw(customer, 1, request_id="w"),  # refused: 0 right then
            lambda: theirs.deposit(customer, 10_000),
            lambda _: RunLocalStep(saga_id, "hold"),
        )
        assert isinstance(second, Receipt), second
        failed = [e for e in theirs.service.events.get(saga_id) if type(e).__name__ == "StepFailed"]
        assert not failed, f"hold step recorded as failed on a stale balance: {failed[0]!r}"


def test_a_lapsed_hold_expired_releases_the_funds_on_an_account_an_earlier_command_read(
    shared_store_url: str,
) -> None:
    """A refusal a command catches and records (``holding_account``: the account no longer
    counts the hold) is judged on fresh state too: ``ExpireHold`` on an account copy an
    accepted command of the batch read before another process placed the hold. Judged on
    that copy, the hold's funds stayed held on the account for good."""

    def later() -> datetime:  # past the hold's timeout
        return datetime.now(UTC) + timedelta(hours=1)

    with two_writers(shared_store_url, clock=later) as writers:
        payer, x = _payer_and_payee(writers)
        writers.theirs.deposit(x, 100)
        outcomes = writers.in_one_batch(
            PlaceHold(payer, 10, destination=x, timeout=600),
            lambda: writers.theirs.submit([PlaceHold(x, 30, timeout=60)])[0].hold_id,
            ExpireHold,
        )
        for outcome in outcomes:
            assert isinstance(outcome, Receipt), outcome
        names = [type(e).__name__ for e in writers.theirs.service.events.get(x)]
        assert "HoldReleased" in names, f"the expired hold's funds stay held on x: {names}"
