"""``views.balances(...)``: many balances read at one log position, so totals never tear,
even while transfers are being applied."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daybook import open_ledger, run_projections
from daybook.infrastructure.readmodels import EmbeddedProjections
from daybook.infrastructure.readmodels.queries import Balances
from daybook.infrastructure.streaming import faults
from daybook.projections.accounts import ACCOUNT_BALANCES
from scripts.streams import wait_until

#: Log events per runner batch: three transfers (two events each), so no batch splits one.
BATCH = 6
BATCHES = 10

#: A transfer as written: its receipt's position, source, destination and amount.
Move = tuple[int, uuid.UUID, uuid.UUID, int]


class Pauses:
    """Fault points armed to pause, one passage at a time: ``reached`` waits for the
    thread to stop at its next passage, ``release`` lets it go on to the one after."""

    def __init__(self, directory: Path, *names: str) -> None:
        self.directory = directory
        self.armed = dict.fromkeys(names, 0)
        for name in names:
            self._arm_next(name)

    def _arm_next(self, name: str) -> None:
        self.armed[name] += 1
        faults.arm(f"{name}:{self.armed[name]}:pause", self.directory)

    def paused(self, name: str) -> bool:
        return faults.paused_file(name, self.directory).exists()

    def reached(self, name: str) -> None:
        wait_until(lambda: self.paused(name), f"a pause at {name}")

    def release(self, name: str) -> None:
        self._arm_next(name)
        faults.paused_file(name, self.directory).unlink()

    def release_all(self) -> None:
        faults.disarm()
        for name in self.armed:
            faults.paused_file(name, self.directory).unlink(missing_ok=True)


@contextmanager
def pausing(directory: Path, *names: str) -> Iterator[Pauses]:
    pauses = Pauses(directory, *names)
    try:
        yield pauses
    finally:
        pauses.release_all()


def replay(
    accounts: list[uuid.UUID], moves: list[Move], position: int
) -> dict[uuid.UUID, tuple[int, int]]:
    """Each account's balance and version after the log up to ``position``."""
    state = {account: (1_000, 2) for account in accounts}  # opened, deposited
    for at, source, destination, amount in moves:
        if at <= position:
            state[source] = (state[source][0] - amount, state[source][1] + 1)
            state[destination] = (state[destination][0] + amount, state[destination][1] + 1)
    return state


def as_read(snapshot: Balances) -> dict[uuid.UUID, tuple[int, int]]:
    return {b.account_id: (b.balance, b.version) for b in snapshot.balances}


def test_a_snapshot_total_never_tears_while_transfers_apply(store_url: str, tmp_path: Path) -> None:
    """The runner applies a backlog of transfers in batches; each read starts while a batch
    is written and not committed, and stops between the checkpoint and the rows while that
    batch commits. The rows it then reads must be those of the position it answers with:
    a replay of the transfers up to it, every account's version included, the total whole.
    (Rows read outside the checkpoint's snapshot come back a batch ahead of it.)"""
    with open_ledger(store_url) as ledger:
        runner = run_projections(
            ledger, projections=(ACCOUNT_BALANCES,), batch_size=BATCH, start=False
        )
        try:
            accounts: list[uuid.UUID] = []
            for i in range(10):
                account = ledger.open_account(f"owner-{i}", "EUR").account_id
                assert account is not None
                accounts.append(account)
                start = ledger.deposit(account, 1_000).position
            runner.run_until_caught_up()  # the balances serve from here on
            # Opening the views' connection writes (it makes sure the catalog is there), so
            # the first read is made now, not while the runner holds a batch.
            assert runner.views.balances().as_of_position == start
            rng = random.Random(3)
            moves: list[Move] = []
            for _ in range(BATCH * BATCHES // 2):
                source, destination = rng.sample(accounts, 2)
                amount = rng.randint(1, 50)
                receipt = ledger.transfer(source, destination, amount)
                moves.append((receipt.position, source, destination, amount))
            # Two events per transfer, one after the other: batch k ends at start + k * BATCH.
            assert [m[0] for m in moves] == list(range(start + 2, start + 2 * len(moves) + 1, 2))
            end = moves[-1][0]
            snapshots = reads_across_commits(runner, tmp_path)
            assert [s.as_of_position for s in snapshots] == [
                start + batch * BATCH for batch in range(1, BATCHES - 1)
            ]
            for snapshot in snapshots:
                assert start < snapshot.as_of_position < end
                assert snapshot.totals == {"EUR": 10_000}
                assert snapshot.missing == ()
                assert as_read(snapshot) == replay(accounts, moves, snapshot.as_of_position), (
                    f"the rows are not those of position {snapshot.as_of_position}"
                )
            final = runner.views.balances(min_position=end, timeout=10)
            assert as_read(final) == replay(accounts, moves, end)
            assert {b.account_id: b.balance for b in final.balances} == {
                a: ledger.account(a).balance for a in accounts
            }
        finally:
            runner.stop()


def reads_across_commits(runner: EmbeddedProjections, directory: Path) -> list[Balances]:
    """Start the runner on its backlog and read the balances once per batch from its second
    to its last but one, each read paused between its checkpoint and its rows while the
    runner commits the batch it held when the read began."""
    snapshots: list[Balances] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            snapshots.append(runner.views.balances(timeout=10))
        except BaseException as error:
            errors.append(error)
            raise

    with pausing(directory, "runner.before_commit", "query.rows") as pauses:
        runner.start()
        pauses.reached("runner.before_commit")  # batch 1 written, not committed
        pauses.release("runner.before_commit")
        for _ in range(2, BATCHES):
            pauses.reached("runner.before_commit")  # this batch written, not committed
            reader = threading.Thread(target=read)
            reader.start()
            # The reader has the checkpoint of the batch before (or failed).
            wait_until(lambda: pauses.paused("query.rows") or bool(errors), "the reader")
            assert not errors
            pauses.release("runner.before_commit")
            pauses.reached("runner.before_commit")  # that batch committed, the next written
            pauses.release("query.rows")
            reader.join()
            assert not errors
    return snapshots


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


def test_a_read_answers_at_its_min_position_and_not_one_event_before(tmp_path: Path) -> None:
    """Read-your-writes is exact: a receipt's position is answered once the read model has
    it, and a position one past what it has is not answered (here: refused at once)."""
    from daybook.infrastructure.readmodels.queries import StaleRead

    url = f"sqlite:///{tmp_path}/d.db"
    with open_ledger(url) as ledger, run_projections(ledger, url, start=False) as runner:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 5)
        runner.run_until_caught_up()
        answer = runner.views.balance(account, min_position=receipt.position, timeout=0)
        assert answer.balance == 5 and answer.as_of_position == receipt.position
        later = ledger.deposit(account, 7)  # not applied: the runner is not running
        assert later.position == receipt.position + 1
        try:
            early = runner.views.balance(account, min_position=later.position, timeout=0)
        except StaleRead:
            early = None
        assert early is None, f"asked for {later.position}, answered as of {early}"
