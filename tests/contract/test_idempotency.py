"""Request ids, on every backend: a repeated request replays its original outcome exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from uuid import UUID

import pytest

from daybook import InsufficientFunds, Ledger, OutOfStock, ReservationResolved, open_ledger
from daybook.domain import Receipt
from daybook.domain.accounts import Deposit, Transfer, Withdraw
from daybook.domain.errors import DomainError, IdempotencyConflict


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


def refusal(call: Callable[[], object]) -> DomainError:
    with pytest.raises(DomainError) as caught:
        call()
    return caught.value


def assert_replayed(original: Receipt, again: Receipt) -> None:
    assert again.replayed is True
    assert original.replayed is False
    assert again == replace(original, replayed=True)


@pytest.fixture
def funded(ledger: Ledger) -> tuple[UUID, UUID]:
    a = ledger.open_account("alice", "EUR").account_id
    b = ledger.open_account("bob", "EUR").account_id
    ledger.deposit(a, 1_000)
    return a, b


def test_a_repeated_deposit_is_replayed_and_writes_nothing(
    ledger: Ledger, funded: tuple[UUID, UUID]
) -> None:
    a, _ = funded
    first = ledger.deposit(a, 250, request_id="d-1")
    head = ledger.head()
    assert first.position == head
    for _ in range(3):
        assert_replayed(first, ledger.deposit(a, 250, request_id="d-1"))
    assert ledger.head() == head
    assert ledger.account(a).balance == 1_250


def test_a_repeated_transfer_is_replayed_with_its_transfer_id(
    ledger: Ledger, funded: tuple[UUID, UUID]
) -> None:
    a, b = funded
    first = ledger.transfer(a, b, 300, request_id="t-1")
    head = ledger.head()
    again = ledger.transfer(a, b, 300, request_id="t-1")
    assert_replayed(first, again)
    assert again.transfer_id == first.transfer_id
    assert ledger.head() == head
    assert (ledger.account(a).balance, ledger.account(b).balance) == (700, 300)


def test_a_replay_survives_later_writes(ledger: Ledger, funded: tuple[UUID, UUID]) -> None:
    a, b = funded
    first = ledger.withdraw(a, 100, request_id="w-1")
    ledger.transfer(a, b, 900)
    # the withdrawal would now be refused, but the request already succeeded
    head = ledger.head()
    assert_replayed(first, ledger.withdraw(a, 100, request_id="w-1"))
    assert ledger.head() == head
    assert ledger.account(a).balance == 0


def test_a_replay_is_seen_by_a_second_ledger_on_the_same_store(shared_store_url: str) -> None:
    first, second = open_ledger(shared_store_url), open_ledger(shared_store_url)
    try:
        a = first.open_account("alice", "EUR", request_id="o-1").account_id
        assert second.open_account("alice", "EUR", request_id="o-1").account_id == a
        receipt = first.deposit(a, 10, request_id="d-1")
        assert_replayed(receipt, second.deposit(a, 10, request_id="d-1"))
        assert isinstance(
            refusal(lambda: second.deposit(a, 11, request_id="d-1")), IdempotencyConflict
        )
        assert second.account(a).balance == 10
    finally:
        first.close()
        second.close()


def test_a_refused_request_stays_refused_after_the_state_changes(
    ledger: Ledger, funded: tuple[UUID, UUID]
) -> None:
    a, _ = funded
    original = refusal(lambda: ledger.withdraw(a, 1_500, request_id="w-big"))
    assert isinstance(original, InsufficientFunds)
    head = ledger.head()
    ledger.deposit(a, 1_000)  # now 2_000: the same withdrawal would succeed
    head = ledger.head()
    retried = refusal(lambda: ledger.withdraw(a, 1_500, request_id="w-big"))
    assert isinstance(retried, InsufficientFunds)
    assert retried.code == "insufficient_funds"
    assert str(retried) == str(original)
    assert retried.details == original.details
    assert ledger.head() == head
    assert ledger.account(a).balance == 2_000
    # a new request id is judged afresh
    assert ledger.withdraw(a, 1_500, request_id="w-big-2").replayed is False


def test_a_refused_reservation_stays_refused_after_restocking(ledger: Ledger) -> None:
    ledger.receive_stock("SKU-1", 2)
    original = refusal(lambda: ledger.reserve_stock("SKU-1", 5, request_id="o-1"))
    assert isinstance(original, OutOfStock)
    ledger.receive_stock("SKU-1", 10)
    head = ledger.head()
    retried = refusal(lambda: ledger.reserve_stock("SKU-1", 5, request_id="o-1"))
    assert isinstance(retried, OutOfStock)
    assert str(retried) == str(original)
    assert ledger.head() == head
    assert ledger.inventory("SKU-1").reserved == 0


def test_a_refusal_for_an_unknown_account_stays_refused(ledger: Ledger) -> None:
    missing = UUID(int=99)
    original = refusal(lambda: ledger.deposit(missing, 5, request_id="d-x"))
    assert original.code == "account_not_found"
    head = ledger.head()
    assert refusal(lambda: ledger.deposit(missing, 5, request_id="d-x")).code == (
        "account_not_found"
    )
    assert ledger.head() == head


@pytest.mark.parametrize(
    "different",
    [
        lambda lg, a, b: lg.deposit(a, 251, request_id="d-1"),
        lambda lg, a, b: lg.deposit(b, 250, request_id="d-1"),
        lambda lg, a, b: lg.withdraw(a, 250, request_id="d-1"),
        lambda lg, a, b: lg.transfer(a, b, 250, request_id="d-1"),
        lambda lg, a, b: lg.close_account(a, request_id="d-1"),
        lambda lg, a, b: lg.open_account("alice", "EUR", request_id="d-1").account_id,
        lambda lg, a, b: lg.receive_stock("SKU-1", 250, request_id="d-1"),
    ],
    ids=["amount", "account", "withdraw", "transfer", "close", "open", "receive"],
)
def test_the_same_id_with_another_payload_or_command_is_a_conflict(
    ledger: Ledger,
    funded: tuple[UUID, UUID],
    different: Callable[[Ledger, UUID, UUID], object],
) -> None:
    a, b = funded
    first = ledger.deposit(a, 250, request_id="d-1")
    head = ledger.head()
    error = refusal(lambda: different(ledger, a, b))
    assert isinstance(error, IdempotencyConflict)
    assert error.code == "idempotency_conflict"
    assert "d-1" in str(error)
    assert ledger.head() == head
    assert ledger.account(a).balance == 1_250
    # the original is still there to be replayed
    assert_replayed(first, ledger.deposit(a, 250, request_id="d-1"))


def test_a_conflict_with_a_recorded_refusal(ledger: Ledger, funded: tuple[UUID, UUID]) -> None:
    a, _ = funded
    assert refusal(lambda: ledger.withdraw(a, 5_000, request_id="w-1")).code == (
        "insufficient_funds"
    )
    assert refusal(lambda: ledger.withdraw(a, 5, request_id="w-1")).code == "idempotency_conflict"
    assert ledger.account(a).balance == 1_000


def test_metadata_is_not_part_of_the_payload(ledger: Ledger, funded: tuple[UUID, UUID]) -> None:
    a, _ = funded
    first = ledger.deposit(a, 5, request_id="d-1", correlation_id="c-1")
    again = ledger.deposit(a, 5, request_id="d-1", correlation_id="c-2", causation_id="x")
    assert_replayed(first, again)


def test_open_account_retried_returns_the_same_account(ledger: Ledger) -> None:
    first = ledger.open_account("alice", "EUR", 100, request_id="open-1").account_id
    head = ledger.head()
    assert ledger.open_account("alice", "EUR", 100, request_id="open-1").account_id == first
    assert ledger.head() == head
    for different in (
        lambda: ledger.open_account("alice", "USD", 100, request_id="open-1").account_id,
        lambda: ledger.open_account("alicia", "EUR", 100, request_id="open-1").account_id,
        lambda: ledger.open_account("alice", "EUR", 0, request_id="open-1").account_id,
    ):
        assert refusal(different).code == "idempotency_conflict"
    assert ledger.head() == head == 1


def test_reserve_stock_retried_returns_the_same_reservation(ledger: Ledger) -> None:
    ledger.receive_stock("SKU-1", 10)
    chosen = ledger.reserve_stock("SKU-1", 3, request_id="o-1")
    assert chosen.reservation_id
    head = ledger.head()
    again = ledger.reserve_stock("SKU-1", 3, request_id="o-1")
    assert_replayed(chosen, again)
    assert again.reservation_id == chosen.reservation_id
    assert ledger.inventory("SKU-1").reservations == {chosen.reservation_id: 3}
    assert ledger.head() == head

    named = ledger.reserve_stock("SKU-1", 2, reservation_id="res-2", request_id="o-2")
    assert_replayed(
        named, ledger.reserve_stock("SKU-1", 2, reservation_id="res-2", request_id="o-2")
    )
    conflict = refusal(
        lambda: ledger.reserve_stock("SKU-1", 2, reservation_id="res-3", request_id="o-2")
    )
    assert conflict.code == "idempotency_conflict"
    assert refusal(lambda: ledger.reserve_stock("SKU-1", 4, request_id="o-1")).code == (
        "idempotency_conflict"
    )
    assert ledger.inventory("SKU-1").reserved == 5


def test_commit_retried_is_replayed_not_resolved_twice(ledger: Ledger) -> None:
    ledger.receive_stock("SKU-1", 10)
    reservation = ledger.reserve_stock("SKU-1", 4, reservation_id="r-1").reservation_id
    assert reservation == "r-1"
    first = ledger.commit_reservation("SKU-1", "r-1", 3, request_id="ship-1")
    assert_replayed(first, ledger.commit_reservation("SKU-1", "r-1", 3, request_id="ship-1"))
    # a fresh request for the same reservation meets the rule instead
    assert isinstance(
        refusal(lambda: ledger.commit_reservation("SKU-1", "r-1", 3, request_id="ship-2")),
        ReservationResolved,
    )
    assert refusal(lambda: ledger.commit_reservation("SKU-1", "r-1", request_id="ship-1")).code == (
        "idempotency_conflict"
    )
    stock = ledger.inventory("SKU-1")
    assert (stock.on_hand, stock.reserved) == (7, 0)


def test_requests_without_an_id_are_never_replayed(
    ledger: Ledger, funded: tuple[UUID, UUID]
) -> None:
    a, _ = funded
    first = ledger.deposit(a, 5)
    second = ledger.deposit(a, 5)
    assert first.request_id != second.request_id
    assert not first.replayed and not second.replayed
    assert second.position > first.position
    assert ledger.account(a).balance == 1_010


def test_a_batch_with_the_same_request_twice(ledger: Ledger, funded: tuple[UUID, UUID]) -> None:
    a, b = funded
    head = ledger.head()
    outcomes = ledger.service.execute(
        [
            Deposit(a, 10, request_id="b-1"),
            Transfer(a, b, 20, request_id="b-2"),
            Deposit(a, 10, request_id="b-1"),
            Deposit(a, 11, request_id="b-1"),
            Transfer(a, b, 20, request_id="b-2"),
            Withdraw(b, 1_000, request_id="b-3"),
            Withdraw(b, 1_000, request_id="b-3"),
        ]
    )
    deposit, transfer, deposit_again, conflict, transfer_again, refused, refused_again = outcomes
    assert isinstance(deposit, Receipt) and isinstance(transfer, Receipt)
    assert deposit.replayed is False and transfer.replayed is False
    assert deposit_again == replace(deposit, replayed=True)
    assert transfer_again == replace(transfer, replayed=True)
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(refused, InsufficientFunds)
    assert isinstance(refused_again, InsufficientFunds)
    assert str(refused_again) == str(refused)
    # one deposit event and two transfer events, nothing for the repeats
    assert ledger.head() == head + 3 == transfer.position
    assert deposit.position == head + 1
    assert (ledger.account(a).balance, ledger.account(b).balance) == (990, 20)

    # and after the batch, each id replays its first outcome
    assert_replayed(deposit, ledger.deposit(a, 10, request_id="b-1"))
    assert refusal(lambda: ledger.withdraw(b, 1_000, request_id="b-3")).code == (
        "insufficient_funds"
    )
    assert ledger.head() == head + 3


def test_a_batch_repeating_an_earlier_request(ledger: Ledger, funded: tuple[UUID, UUID]) -> None:
    a, _ = funded
    earlier = ledger.deposit(a, 7, request_id="e-1")
    head = ledger.head()
    outcomes: list[Any] = ledger.service.execute(
        [Deposit(a, 7, request_id="e-1"), Deposit(a, 8, request_id="e-1")]
    )
    assert outcomes[0] == replace(earlier, replayed=True)
    assert isinstance(outcomes[1], IdempotencyConflict)
    assert ledger.head() == head


def test_a_request_that_races_itself_is_applied_once(
    ledger: Ledger, funded: tuple[UUID, UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers both see a request id as new (the window between looking it up and
    committing); the request record's uniqueness makes the second one a replay."""
    a, b = funded
    first = ledger.transfer(a, b, 100, request_id="race-1")
    # Another command in between, so the retry cannot be recognised from the batch that
    # committed just before it (a group committer replays those from memory).
    ledger.open_account("spacer", "EUR")
    head = ledger.head()
    lookups = ledger.service.recorder.select_requests
    calls = []

    def blind_once(request_ids: Any, *args: Any) -> Any:
        calls.append(list(request_ids))
        return {} if len(calls) == 1 else lookups(request_ids, *args)

    monkeypatch.setattr(ledger.service.recorder, "select_requests", blind_once)
    again = ledger.transfer(a, b, 100, request_id="race-1")
    assert len(calls) >= 2, "the blind first attempt must have been retried"
    assert_replayed(first, again)
    assert ledger.head() == head
    assert (ledger.account(a).balance, ledger.account(b).balance) == (900, 100)


def test_the_actor_is_recorded_on_every_event_and_is_not_part_of_the_payload(
    store_url: str,
) -> None:
    from daybook import open_ledger
    from daybook.domain.accounts import Deposit, OpenAccount

    with open_ledger(store_url) as ledger:
        opened = ledger.execute(OpenAccount("ann", "EUR", actor="clerk-7"))
        assert opened.account_id is not None
        ledger.execute(Deposit(opened.account_id, 5, request_id="d-1", actor="clerk-7"))
        # The same request from another actor is a retry, not a new deposit.
        assert ledger.execute(Deposit(opened.account_id, 5, request_id="d-1")).replayed
        events = list(ledger.service.repository.event_store.get(opened.account_id))
        assert [event.meta.actor for event in events] == ["clerk-7", "clerk-7"]


def test_a_cancel_records_who_asked_and_its_trace_on_its_decision_too(store_url: str) -> None:
    """A saga's decision events (here ``Cancelled``) carry who decided, why and when: on top
    of the command's metadata, not instead of it. The actor (the token that sent the cancel)
    and the trace were on ``Finished`` but not on the decision."""
    from daybook import place_order
    from daybook.domain.sagas import CancelSaga

    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with open_ledger(store_url) as ledger:
        customer = ledger.open_account("ann", "EUR").account_id
        merchant = ledger.open_account("shop", "EUR").account_id
        assert customer is not None and merchant is not None
        ledger.deposit(customer, 1_000)
        ledger.receive_stock("KETTLE", 5)
        saga_id = place_order(ledger, "o-1", customer, merchant, [("KETTLE", 1, 100)]).saga_id
        assert saga_id is not None
        ledger.execute(
            CancelSaga(saga_id, "ops-alice", "customer asked", actor="mallory", traceparent=trace)
        )
        events = list(ledger.service.events.get(saga_id))[1:]
    assert [type(event).__name__ for event in events] == ["Cancelled", "Finished"]
    assert [(event.meta.actor, event.meta.traceparent) for event in events] == [
        ("mallory", trace),
        ("mallory", trace),
    ]
    assert events[0].meta.decision.by == "ops-alice"
