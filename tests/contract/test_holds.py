"""Holds and reservation timeouts, on every backend, with the ledger's clock injected."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from daybook import Ledger, open_async_ledger, open_ledger
from daybook.domain.accounts import Account
from daybook.domain.errors import DomainError
from daybook.domain.holds import Hold, HoldView


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(store_url: str, clock: Clock) -> Iterator[Ledger]:
    ledger = open_ledger(store_url, clock=clock)
    yield ledger
    ledger.close()


@pytest.fixture
def accounts(ledger: Ledger) -> tuple[UUID, UUID]:
    a = ledger.open_account("alice", "EUR").account_id
    b = ledger.open_account("bob", "EUR").account_id
    assert a is not None and b is not None
    ledger.deposit(a, 1_000)
    return a, b


def refusal(call: Callable[[], object]) -> DomainError:
    with pytest.raises(DomainError) as caught:
        call()
    return caught.value


def test_a_hold_lowers_available_not_balance(ledger: Ledger, accounts: tuple[UUID, UUID]) -> None:
    a, _ = accounts
    receipt = ledger.hold(a, 300, timeout=60, request_id="h-1")
    assert receipt.command == "hold" and receipt.hold_id is not None
    assert receipt.account_id == a and receipt.position == ledger.head()
    view = ledger.account(a)
    assert (view.balance, view.held, view.available) == (1_000, 300, 700)
    status = ledger.hold_status(receipt.hold_id)
    assert (status.status, status.amount, status.account_id) == ("open", 300, a)
    # A debit is judged against what is available, not the balance.
    error = refusal(lambda: ledger.withdraw(a, 701))
    assert error.code == "insufficient_funds" and error.details["held"] == 300
    ledger.withdraw(a, 700)
    assert ledger.account(a).available == 0


def test_capture_all_posts_a_debit(ledger: Ledger, accounts: tuple[UUID, UUID]) -> None:
    a, _ = accounts
    hold_id = ledger.hold(a, 300, timeout=60).hold_id
    assert hold_id is not None
    receipt = ledger.capture(hold_id)
    assert receipt.hold_id == hold_id and receipt.transfer_id is None
    view = ledger.account(a)
    assert (view.balance, view.held, view.available) == (700, 0, 700)
    assert ledger.hold_status(hold_id).status == "captured"
    assert ledger.hold_status(hold_id).captured == 300


def test_capture_part_of_a_pending_transfer_releases_the_rest(
    ledger: Ledger, accounts: tuple[UUID, UUID]
) -> None:
    a, b = accounts
    hold_id = ledger.hold(a, 300, destination=b, timeout=60).hold_id
    assert hold_id is not None
    receipt = ledger.capture(hold_id, 120)
    assert receipt.transfer_id is not None
    assert ledger.account(a).balance == 880 and ledger.account(a).available == 880
    assert ledger.account(b).balance == 120
    assert ledger.hold_status(hold_id).captured == 120


def test_a_capture_beyond_its_hold_is_refused_for_its_amount_before_the_destination_is_judged(
    ledger: Ledger, accounts: tuple[UUID, UUID]
) -> None:
    """The request's own mistake first, as every command judges its own values before the
    state they meet: a capture of more than the hold toward an account closed meanwhile was
    told ``account_closed``, and a caller who fixed that would then meet ``invalid_amount``."""
    a, b = accounts
    hold_id = ledger.hold(a, 300, destination=b, timeout=60).hold_id
    assert hold_id is not None
    ledger.close_account(b)
    head = ledger.head()
    error = refusal(lambda: ledger.capture(hold_id, 400))
    assert error.code == "invalid_amount" and error.details["held"] == 300
    assert refusal(lambda: ledger.capture(hold_id, 100)).code == "account_closed"
    assert ledger.head() == head


def test_void_releases_everything(ledger: Ledger, accounts: tuple[UUID, UUID]) -> None:
    a, _ = accounts
    hold_id = ledger.hold(a, 300, timeout=60).hold_id
    assert hold_id is not None
    ledger.void(hold_id)
    view = ledger.account(a)
    assert (view.balance, view.held, view.available) == (1_000, 0, 1_000)
    assert ledger.hold_status(hold_id).status == "voided"


def test_a_hold_resolves_exactly_once(ledger: Ledger, accounts: tuple[UUID, UUID]) -> None:
    a, _ = accounts
    hold_id = ledger.hold(a, 300, timeout=60).hold_id
    assert hold_id is not None
    ledger.capture(hold_id, 100)
    head = ledger.head()
    for again in (lambda: ledger.capture(hold_id), lambda: ledger.void(hold_id)):
        error = refusal(again)
        assert error.code == "hold_resolved"
        assert error.details["resolution"] == "captured"
    assert refusal(lambda: ledger.expire_hold(hold_id)).code == "hold_resolved"
    assert ledger.head() == head
    assert ledger.account(a).balance == 900


def test_expiry_is_exact_at_decision_time(
    ledger: Ledger, accounts: tuple[UUID, UUID], clock: Clock
) -> None:
    a, _ = accounts
    hold_id = ledger.hold(a, 600, timeout=30).hold_id
    assert hold_id is not None
    clock.advance(29.999999)
    assert ledger.account(a).available == 400
    assert refusal(lambda: ledger.withdraw(a, 401)).code == "insufficient_funds"
    assert refusal(lambda: ledger.expire_hold(hold_id)).code == "hold_not_expired"
    clock.advance(0.000001)  # the instant it expires: nothing has recorded it yet
    view = ledger.account(a)
    assert (view.held, view.available) == (0, 1_000)
    status = ledger.hold_status(hold_id)
    assert (status.status, status.recorded) == ("expired", False)
    head = ledger.head()
    error = refusal(lambda: ledger.capture(hold_id))
    assert error.code == "hold_expired" and error.details["recorded"] is False
    assert refusal(lambda: ledger.void(hold_id)).code == "hold_expired"
    assert ledger.head() == head
    ledger.withdraw(a, 1_000)  # the expired hold no longer stands in the way
    ledger.expire_hold(hold_id, request_id=f"expire-{hold_id}")
    assert ledger.hold_status(hold_id).recorded is True
    assert ledger.expire_hold(hold_id, request_id=f"expire-{hold_id}").replayed
    assert refusal(lambda: ledger.capture(hold_id)).details["recorded"] is True


def test_hold_refusals_have_their_codes_and_change_nothing(
    ledger: Ledger, accounts: tuple[UUID, UUID]
) -> None:
    a, b = accounts
    other = ledger.open_account("carl", "USD").account_id
    assert other is not None
    head = ledger.head()
    cases = {
        "insufficient_funds": lambda: ledger.hold(a, 1_001, timeout=5),
        "invalid_timeout": lambda: ledger.hold(a, 1, timeout=0),
        "invalid_amount": lambda: ledger.hold(a, 0, timeout=5),
        "account_not_found": lambda: ledger.hold(uuid4(), 1, timeout=5),
        "same_account": lambda: ledger.hold(a, 1, destination=a, timeout=5),
        "currency_mismatch": lambda: ledger.hold(a, 1, destination=other, timeout=5),
        "hold_not_found": lambda: ledger.capture(uuid4()),
    }
    for code, call in cases.items():
        assert refusal(call).code == code, code
    # None too: the method passed it on as "not given", and the command then lacked its
    # required timeout (a TypeError, not a refusal).
    for bad in (1.5, "60", True, -1, 10**9, None):
        error = refusal(lambda bad=bad: ledger.hold(a, 1, timeout=bad))
        assert error.code == "invalid_timeout" and "seconds" in str(error)
    assert ledger.head() == head
    hold_id = ledger.hold(a, 10, destination=b, timeout=5).hold_id
    assert hold_id is not None
    assert refusal(lambda: ledger.capture(hold_id, 11)).code == "invalid_amount"
    again = refusal(lambda: ledger.hold(a, 10, timeout=5, hold_id=hold_id))
    assert again.code == "hold_exists"
    error = refusal(lambda: ledger.close_account(a))
    assert error.code == "account_not_empty"


def test_a_hold_is_idempotent_by_request_id(ledger: Ledger, accounts: tuple[UUID, UUID]) -> None:
    a, _ = accounts
    first = ledger.hold(a, 300, timeout=60, request_id="h-9")
    again = ledger.hold(a, 300, timeout=60, request_id="h-9")
    assert again.replayed and again.hold_id == first.hold_id
    assert ledger.account(a).held == 300
    assert refusal(lambda: ledger.hold(a, 301, timeout=60, request_id="h-9")).code == (
        "idempotency_conflict"
    )


def test_the_hold_aggregate_is_found_by_hold_id_only(
    ledger: Ledger, accounts: tuple[UUID, UUID]
) -> None:
    a, _ = accounts
    # An account id is no hold id: the hold's aggregate id is derived from its own id.
    assert refusal(lambda: ledger.capture(a)).code == "hold_not_found"
    assert Hold.id_for(a) != a


def test_reservations_expire_at_their_timeout(ledger: Ledger, clock: Clock) -> None:
    ledger.receive_stock("SKU-T", 10)
    receipt = ledger.reserve_stock("SKU-T", 7, timeout=10, reservation_id="r-1")
    ledger.reserve_stock("SKU-T", 2, reservation_id="r-2")  # no timeout: never expires
    assert ledger.inventory("SKU-T").available == 1
    assert refusal(lambda: ledger.reserve_stock("SKU-T", 2)).code == "out_of_stock"
    error = refusal(lambda: ledger.expire_reservation("SKU-T", "r-1"))
    assert error.code == "reservation_not_expired"
    clock.advance(10)
    stock = ledger.inventory("SKU-T")
    assert (stock.reserved, stock.available, stock.reservations) == (2, 8, {"r-2": 2})
    assert refusal(lambda: ledger.commit_reservation("SKU-T", "r-1")).code == (
        "reservation_expired"
    )
    assert refusal(lambda: ledger.release_reservation("SKU-T", "r-1")).code == (
        "reservation_expired"
    )
    ledger.reserve_stock("SKU-T", 1)  # needs none of r-1's units
    ledger.expire_reservation("SKU-T", "r-1")
    ledger.reserve_stock("SKU-T", 7)
    assert refusal(lambda: ledger.expire_reservation("SKU-T", "r-1")).code == (
        "reservation_resolved"
    )
    assert refusal(lambda: ledger.expire_reservation("SKU-T", "r-2")).code == (
        "reservation_not_expired"
    )
    assert receipt.reservation_id == "r-1"
    assert ledger.inventory("SKU-T").on_hand == 10


def test_units_a_lapsed_reservation_gave_up_never_ship_twice(ledger: Ledger, clock: Clock) -> None:
    """A reservation that needs a lapsed reservation's units records that expiry with it:
    a clock stepped back (an NTP correction) then finds the lapsed one expired, and cannot
    ship its units as well."""
    ledger.receive_stock("SKU-S", 10)
    ledger.reserve_stock("SKU-S", 10, reservation_id="r-1", timeout=60)
    clock.advance(61)
    ledger.reserve_stock("SKU-S", 10, reservation_id="r-2")
    assert ledger.inventory("SKU-S").reservations == {"r-2": 10}
    clock.advance(-2)  # r-1 is not due on this reading, but its expiry is recorded
    head = ledger.head()
    assert refusal(lambda: ledger.commit_reservation("SKU-S", "r-1")).code == (
        "reservation_resolved"
    )
    assert ledger.head() == head
    ledger.commit_reservation("SKU-S", "r-2")
    stock = ledger.inventory("SKU-S")
    assert (stock.on_hand, stock.reserved) == (0, 0)


def test_an_adjustment_that_needs_lapsed_units_records_their_expiry(
    ledger: Ledger, clock: Clock
) -> None:
    ledger.receive_stock("SKU-A", 10)
    ledger.reserve_stock("SKU-A", 4, reservation_id="r-1", timeout=60)
    ledger.reserve_stock("SKU-A", 3, reservation_id="r-2", timeout=600)
    ledger.adjust_stock("SKU-A", -2, "count")  # 8 on hand, 7 reserved: no lapse needed
    assert ledger.inventory("SKU-A").reservations == {"r-1": 4, "r-2": 3}
    clock.advance(61)
    ledger.adjust_stock("SKU-A", -5, "count")  # 3 on hand: only r-1's lapse allows it
    clock.advance(-2)
    assert ledger.inventory("SKU-A").reservations == {"r-2": 3}
    assert refusal(lambda: ledger.commit_reservation("SKU-A", "r-1")).code == (
        "reservation_resolved"
    )
    ledger.commit_reservation("SKU-A", "r-2")
    assert ledger.inventory("SKU-A").on_hand == 0


def test_two_writers_whose_clocks_disagree_never_oversell(shared_store_url: str) -> None:
    """Writer b's clock is past r-1's timeout, writer a's is not: b reserves r-1's units
    again, and a, on its older reading, can no longer ship r-1."""
    now_a, now_b = Clock(), Clock()
    with (
        open_ledger(shared_store_url, clock=now_a) as a,
        open_ledger(shared_store_url, clock=now_b) as b,
    ):
        a.receive_stock("KETTLE", 10)
        a.reserve_stock("KETTLE", 10, reservation_id="r-1", timeout=60)
        now_b.advance(61)
        now_a.advance(59)
        b.reserve_stock("KETTLE", 10, reservation_id="r-2")
        assert refusal(lambda: a.commit_reservation("KETTLE", "r-1")).code == (
            "reservation_resolved"
        )
        b.commit_reservation("KETTLE", "r-2")
        stock = a.inventory("KETTLE")
        assert (stock.on_hand, stock.reserved) == (0, 0)


def test_capturing_a_hold_whose_funds_were_spent_meanwhile_is_refused_as_expired(
    ledger: Ledger, accounts: tuple[UUID, UUID], clock: Clock
) -> None:
    """The funds of a lapsed hold were withdrawn, which records its release; on a clock
    stepped back the hold looks open again, and capturing or voiding it is refused as
    expired, changing nothing. Its status says so too (it said ``open``, though no capture
    could succeed, until the clock passed the timeout again)."""
    a, b = accounts
    hold_id = ledger.hold(a, 1_000, destination=b, timeout=60).hold_id
    assert hold_id is not None
    clock.advance(61)
    ledger.withdraw(a, 1_000)
    assert ledger.account(a).held == 0
    clock.advance(-2)
    head = ledger.head()
    error = refusal(lambda: ledger.capture(hold_id))
    assert (error.code, error.details["recorded"]) == ("hold_expired", True)
    assert refusal(lambda: ledger.void(hold_id)).code == "hold_expired"
    assert ledger.head() == head
    assert (ledger.account(a).balance, ledger.account(b).balance) == (0, 0)
    status = ledger.hold_status(hold_id)
    assert (status.status, status.recorded) == ("expired", True), status
    assert ledger.head() == head  # a read


def test_an_async_ledger_says_a_hold_its_account_released_is_expired(tmp_path: Path) -> None:
    """As above, through ``AsyncLedger.hold_status``."""
    clock = Clock()

    async def scenario() -> HoldView:
        ledger = open_async_ledger(f"sqlite:///{tmp_path}/holds.db", clock=clock)
        try:
            a = (await ledger.open_account("a", "EUR")).account_id
            b = (await ledger.open_account("b", "EUR")).account_id
            assert a is not None and b is not None
            await ledger.deposit(a, 1_000)
            hold_id = (await ledger.hold(a, 1_000, destination=b, timeout=60)).hold_id
            assert hold_id is not None
            clock.advance(61)
            await ledger.withdraw(a, 1_000)
            clock.advance(-2)
            return await ledger.hold_status(hold_id)
        finally:
            await ledger.close()

    status = asyncio.run(scenario())
    assert (status.status, status.recorded) == ("expired", True), status


def test_a_hold_captured_while_its_status_is_read_is_not_said_expired(tmp_path: Path) -> None:
    """``hold_status`` reads the hold, then (for an open one) its account: a capture by
    another writer landing between the two reads made the account no longer count the hold,
    and the status said ``expired``, for a captured hold."""
    url = f"sqlite:///{tmp_path}/holds.db"
    with open_ledger(url) as reader, open_ledger(url) as writer:
        a = reader.open_account("a", "EUR").account_id
        assert a is not None
        reader.deposit(a, 1_000)
        hold_id = reader.hold(a, 300, timeout=3600).hold_id
        assert hold_id is not None
        read = reader.service.read

        def capture_before_the_account(kind: type[Any], key: Any) -> Any:
            if kind is Account:
                writer.capture(hold_id)  # lands between the hold's read and the account's
            return read(kind, key)

        reader.service.read = capture_before_the_account  # type: ignore[method-assign]
        status = reader.hold_status(hold_id)
        assert (status.status, status.captured) == ("captured", 300), status


@pytest.mark.parametrize("spend", ["withdraw", "transfer", "hold", "close"])
def test_funds_a_lapsed_hold_gave_up_are_never_spent_twice(
    ledger: Ledger, accounts: tuple[UUID, UUID], clock: Clock, spend: str
) -> None:
    """A debit that needs a lapsed hold's funds records the hold's release with it. A clock
    stepped back then finds the account no longer counts the hold, though the money came
    back meanwhile: the hold is not captured as well (it was, charging the payer twice)."""
    a, b = accounts
    hold_id = ledger.hold(a, 1_000, destination=b, timeout=60).hold_id
    assert hold_id is not None
    clock.advance(61)
    if spend == "withdraw":
        ledger.withdraw(a, 1_000)
    elif spend == "transfer":
        ledger.transfer(a, b, 1_000)
    elif spend == "hold":
        ledger.hold(a, 1_000, timeout=600)
    else:
        ledger.withdraw(a, 1_000)  # nothing needs the lapsed hold: it is still counted
        assert ledger.account(a).held == 0 and ledger.hold_status(hold_id).status == "expired"
        ledger.close_account(a)  # which relies on it
    clock.advance(-2)
    if spend != "close":
        ledger.deposit(a, 1_000)  # money again, a salary
    balances = (ledger.account(a).balance, ledger.account(b).balance)
    head = ledger.head()
    assert refusal(lambda: ledger.capture(hold_id)).code == "hold_expired"
    assert ledger.head() == head
    assert (ledger.account(a).balance, ledger.account(b).balance) == balances
    clock.advance(2)
    ledger.expire_hold(hold_id)  # the sweeper records the hold's own expiry
    assert ledger.hold_status(hold_id).status == "expired"
    assert ledger.account(a).held == (1_000 if spend == "hold" else 0)


def test_a_debit_within_what_no_hold_sets_aside_records_no_lapse(
    ledger: Ledger, accounts: tuple[UUID, UUID], clock: Clock
) -> None:
    a, _ = accounts
    hold_id = ledger.hold(a, 400, timeout=60).hold_id
    assert hold_id is not None
    clock.advance(61)
    ledger.withdraw(a, 600)  # 1,000 less the 400 held: the lapse is not needed
    clock.advance(-2)
    ledger.capture(hold_id)
    assert ledger.account(a).balance == 0


def test_a_clock_without_a_time_zone_is_refused_before_anything_is_written(
    store_url: str,
) -> None:
    """A naive reading written into a hold's or a reservation's expiry made every process
    with a correct clock fail on that account or SKU (comparing naive with aware times), so
    that no command could resolve the hold. The ledger refuses such a clock at once."""
    with pytest.raises(TypeError, match="aware"):
        open_ledger(store_url, clock=datetime.now)
    reading = [datetime.now(UTC)]
    with open_ledger(store_url, clock=lambda: reading[0]) as ledger:
        reading[0] = reading[0].replace(tzinfo=None)  # a clock that loses its zone later
        with pytest.raises(TypeError, match="aware"):
            ledger.open_account("ann", "EUR")
        assert ledger.head() == 0


def test_a_clock_refused_at_open_leaves_the_store_untouched(tmp_path: Path) -> None:
    """Nothing is created or migrated for a ledger that will not run (an old SQLite file's
    migration would stop its older writers)."""
    path = tmp_path / "never.db"
    with pytest.raises(TypeError, match="aware"):
        open_ledger(f"sqlite:///{path}", clock=datetime.now)
    assert not path.exists() or path.stat().st_size == 0


def test_a_capture_by_a_writer_whose_clock_is_behind_is_a_coded_refusal(
    shared_store_url: str,
) -> None:
    now_a, now_b = Clock(), Clock()
    with (
        open_ledger(shared_store_url, clock=now_a) as a,
        open_ledger(shared_store_url, clock=now_b) as b,
    ):
        payer = a.open_account("payer", "EUR").account_id
        shop = a.open_account("shop", "EUR").account_id
        a.deposit(payer, 1_000)
        hold_id = a.hold(payer, 1_000, destination=shop, timeout=60).hold_id
        assert hold_id is not None
        now_b.advance(61)
        now_a.advance(59)
        b.withdraw(payer, 1_000)
        b.deposit(payer, 1_000)  # money again: the hold's lapse is what said no
        assert refusal(lambda: a.capture(hold_id)).code == "hold_expired"
        assert refusal(lambda: a.void(hold_id)).code == "hold_expired"
        assert (a.account(payer).balance, a.account(shop).balance) == (1_000, 0)


@pytest.mark.parametrize("resolution", ["captured", "voided", "expired"])
def test_a_hold_another_writer_placed_resolves_through_an_older_cached_account(
    shared_store_url: str, resolution: str
) -> None:
    """Writer a cached the account before writer b placed the hold on it (a server and a
    saga processor, each with its own cache): a finds the hold in the store but not in its
    copy of the account, and judges the command again on the latest state."""
    clock = Clock()
    with (
        open_ledger(shared_store_url, clock=clock) as a,
        open_ledger(shared_store_url, clock=clock) as b,
    ):
        payer = a.open_account("payer", "EUR").account_id
        shop = a.open_account("shop", "EUR").account_id
        assert payer is not None and shop is not None
        a.deposit(payer, 1_000)
        hold_id = b.hold(payer, 600, destination=shop, timeout=60).hold_id
        assert hold_id is not None
        if resolution == "captured":
            a.capture(hold_id)
        elif resolution == "voided":
            a.void(hold_id)
        else:
            clock.advance(60)
            a.expire_hold(hold_id)
        assert a.hold_status(hold_id).status == resolution
        view = b.account(payer)
        assert (view.held, view.available) == (0, 400 if resolution == "captured" else 1_000)


def test_a_hold_sent_again_with_its_generated_id_is_told_it_exists(
    ledger: Ledger, accounts: tuple[UUID, UUID]
) -> None:
    """The same command object sent again after an answer was lost, or twice in one list:
    the hold it names exists, and the caller is told so (``hold_exists``), not to retry
    (which a new command would turn into a second hold on the same funds)."""
    from daybook.domain.holds import PlaceHold

    ann, _ = accounts
    twice = PlaceHold(ann, 100, timeout=60)
    assert refusal(lambda: ledger.atomic([twice, twice])).code == "hold_exists"
    once = PlaceHold(ann, 100, timeout=60)
    ledger.execute(once)
    head = ledger.head()
    again = PlaceHold(ann, 100, timeout=60)
    object.__setattr__(again, "hold_id", once.hold_id)  # as a caller keeping the first id
    assert refusal(lambda: ledger.execute(again)).code == "hold_exists"
    assert ledger.head() == head


def test_a_hold_past_its_timeout_does_not_count_against_what_holds_may_set_aside(
    ledger: Ledger, clock: Clock
) -> None:
    """A hold stops counting in every admission check at the instant its timeout passes:
    the bound on what an account's holds set aside (2**63-1, as the read models store it)
    too. The account said nothing was held and all was available, and a hold of 1 was
    refused ``balance_overflow``, "9223372036854775807 on hold"."""
    most = 2**63 - 1
    account = ledger.open_account("big", "EUR", overdraft_limit=most).account_id
    assert account is not None
    ledger.hold(account, most, timeout=60)
    clock.advance(60)
    view = ledger.account(account)
    assert (view.held, view.available) == (0, most)
    hold_id = ledger.hold(account, 1, timeout=60).hold_id  # refused balance_overflow before
    assert hold_id is not None
    assert ledger.account(account).held == 1
