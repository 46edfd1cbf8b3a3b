"""Bad input at the API, on every backend: the right code, and the log does not move.

Each case is tried twice against one prepared ledger: without a request id (then nothing at
all may be written: no event, no request record) and with a fresh request id (then a refusal by
a business rule is recorded, so a retry is refused the same way, while a malformed request is
not recorded at all). In both cases ``head()`` and every account and SKU stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from daybook import Ledger, open_ledger
from daybook.domain.errors import DomainError
from daybook.domain.values import MAX_AMOUNT, inventory_id

SKU = "SKU-1"
NOT_A_UUID: Any = "not-a-uuid"


@dataclass(frozen=True)
class World:
    eur: UUID  # balance 1_000, no overdraft
    eur2: UUID  # balance 0, overdraft 100
    usd: UUID  # balance 50
    closed: UUID  # EUR, closed at zero


def prepare(ledger: Ledger) -> World:
    eur = ledger.open_account("alice", "EUR").account_id
    eur2 = ledger.open_account("bob", "EUR", overdraft_limit=100).account_id
    usd = ledger.open_account("carol", "USD").account_id
    closed = ledger.open_account("dave", "EUR").account_id
    ledger.deposit(eur, 1_000)
    ledger.deposit(usd, 50)
    ledger.close_account(closed)
    ledger.receive_stock(SKU, 10)
    ledger.reserve_stock(SKU, 2, reservation_id="held")
    ledger.reserve_stock(SKU, 1, reservation_id="shipped")
    ledger.commit_reservation(SKU, "shipped")
    ledger.reserve_stock(SKU, 1, reservation_id="returned")
    ledger.release_reservation(SKU, "returned")
    return World(eur, eur2, usd, closed)


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


Call = Callable[[Ledger, World, dict[str, Any]], object]


@dataclass(frozen=True)
class Case:
    label: str
    code: str
    call: Call
    #: Refused by a business rule (recorded under a request id), not by a value check.
    business: bool = False


def case(label: str, code: str, call: Call, *, business: bool = False) -> Case:
    return Case(label, code, call, business)


BAD_AMOUNTS: list[object] = [
    0,
    -1,
    -1_000,
    MAX_AMOUNT + 1,
    2**64,
    10**30,
    1.0,
    10.5,
    float("nan"),
    float("inf"),
    True,
    False,
    "100",
    None,
    Decimal("100"),
    [100],
]


def amount_cases() -> list[Case]:
    cases: list[Case] = []
    for bad in BAD_AMOUNTS:
        b: Any = bad
        cases += [
            case(
                f"deposit {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.deposit(w.eur, b, **k),
            ),
            case(
                f"withdraw {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.withdraw(w.eur, b, **k),
            ),
            case(
                f"transfer {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.transfer(w.eur, w.eur2, b, **k),
            ),
            case(
                f"receive {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.receive_stock(SKU, b, **k),
            ),
            case(
                f"reserve {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.reserve_stock(SKU, b, **k),
            ),
        ]
        if bad is not None:  # no quantity means "ship it all"
            cases.append(
                case(
                    f"commit {bad!r}",
                    "invalid_amount",
                    lambda lg, w, k, b=b: lg.commit_reservation(SKU, "held", b, **k),
                )
            )
    for bad in [0, MAX_AMOUNT + 1, -(2**63), 2**64, 1.0, -1.0, True, "-1", None, Decimal(-1)]:
        b = bad
        cases.append(
            case(
                f"adjust {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.adjust_stock(SKU, b, "count", **k),
            )
        )
    for bad in [-1, MAX_AMOUNT + 1, 1.0, True, "0", None, Decimal(0)]:
        b = bad
        cases.append(
            case(
                f"overdraft limit {bad!r}",
                "invalid_amount",
                lambda lg, w, k, b=b: lg.open_account("eve", "EUR", b, **k).account_id,
            )
        )
    cases.append(
        case(
            "commit more than held",
            "invalid_amount",
            lambda lg, w, k: lg.commit_reservation(SKU, "held", 3, **k),
            business=True,
        )
    )
    return cases


def currency_and_text_cases() -> list[Case]:
    cases = [
        case(
            f"currency {bad!r}",
            "invalid_currency",
            lambda lg, w, k, b=bad: lg.open_account("eve", b, **k).account_id,
        )
        for bad in ["eur", "EURO", "EU", "", "XXX", " EUR", "€", 978, None]
    ]
    cases += [
        case(
            f"owner {bad!r}",
            "invalid_request",
            lambda lg, w, k, b=bad: lg.open_account(b, "EUR", **k).account_id,
        )
        for bad in [
            "",
            "   ",
            "a\nb",
            "x" * 201,
            None,
            5,
            "ann\ud800",
            "\udfff",
            "a\x7fb",
            "a\x85b",
        ]
    ]
    cases += [
        case(
            f"reason {bad!r}",
            "invalid_request",
            lambda lg, w, k, b=bad: lg.adjust_stock(SKU, 1, b, **k),
        )
        for bad in ["", " ", "a\x00", None, "count\udfff"]
    ]
    return cases


def account_cases() -> list[Case]:
    nobody = UUID(int=12345)
    return [
        case(
            "deposit to unknown",
            "account_not_found",
            lambda lg, w, k: lg.deposit(nobody, 1, **k),
            business=True,
        ),
        case(
            "withdraw from unknown",
            "account_not_found",
            lambda lg, w, k: lg.withdraw(nobody, 1, **k),
            business=True,
        ),
        case(
            "transfer from unknown",
            "account_not_found",
            lambda lg, w, k: lg.transfer(nobody, w.eur, 1, **k),
            business=True,
        ),
        case(
            "transfer to unknown",
            "account_not_found",
            lambda lg, w, k: lg.transfer(w.eur, nobody, 1, **k),
            business=True,
        ),
        case(
            "close unknown",
            "account_not_found",
            lambda lg, w, k: lg.close_account(nobody, **k),
            business=True,
        ),
        case(
            "deposit to a SKU's id",
            "account_not_found",
            lambda lg, w, k: lg.deposit(inventory_id(SKU), 1, **k),
            business=True,
        ),
        case(
            "transfer to a SKU's id",
            "account_not_found",
            lambda lg, w, k: lg.transfer(w.eur, inventory_id(SKU), 1, **k),
            business=True,
        ),
        case(
            "open an account id in use",
            "account_exists",
            lambda lg, w, k: lg.open_account("eve", "USD", account_id=w.eur, **k),
            business=True,
        ),
        case(
            "open an account with a SKU's id",
            "account_exists",
            lambda lg, w, k: lg.open_account("eve", "EUR", account_id=inventory_id(SKU), **k),
            business=True,
        ),
        case(
            "open a closed account's id",
            "account_exists",
            lambda lg, w, k: lg.open_account("eve", "EUR", account_id=w.closed, **k),
            business=True,
        ),
        case(
            "malformed account id",
            "invalid_request",
            lambda lg, w, k: lg.deposit(NOT_A_UUID, 1, **k),
        ),
        case(
            "malformed destination",
            "invalid_request",
            lambda lg, w, k: lg.transfer(w.eur, NOT_A_UUID, 1, **k),
        ),
        case(
            "deposit to closed",
            "account_closed",
            lambda lg, w, k: lg.deposit(w.closed, 1, **k),
            business=True,
        ),
        case(
            "withdraw from closed",
            "account_closed",
            lambda lg, w, k: lg.withdraw(w.closed, 1, **k),
            business=True,
        ),
        case(
            "transfer from closed",
            "account_closed",
            lambda lg, w, k: lg.transfer(w.closed, w.eur, 1, **k),
            business=True,
        ),
        case(
            "transfer to closed",
            "account_closed",
            lambda lg, w, k: lg.transfer(w.eur, w.closed, 1, **k),
            business=True,
        ),
        case(
            "close closed",
            "account_closed",
            lambda lg, w, k: lg.close_account(w.closed, **k),
            business=True,
        ),
        case(
            "currency mismatch",
            "currency_mismatch",
            lambda lg, w, k: lg.transfer(w.eur, w.usd, 1, **k),
            business=True,
        ),
        case(
            "currency mismatch back",
            "currency_mismatch",
            lambda lg, w, k: lg.transfer(w.usd, w.eur, 1, **k),
            business=True,
        ),
        case(
            "same account",
            "same_account",
            lambda lg, w, k: lg.transfer(w.eur, w.eur, 1, **k),
            business=True,
        ),
        case(
            "withdraw too much",
            "insufficient_funds",
            lambda lg, w, k: lg.withdraw(w.eur, 1_001, **k),
            business=True,
        ),
        case(
            "withdraw past overdraft",
            "insufficient_funds",
            lambda lg, w, k: lg.withdraw(w.eur2, 101, **k),
            business=True,
        ),
        case(
            "transfer too much",
            "insufficient_funds",
            lambda lg, w, k: lg.transfer(w.eur, w.eur2, 1_001, **k),
            business=True,
        ),
        case(
            "transfer past overdraft",
            "insufficient_funds",
            lambda lg, w, k: lg.transfer(w.eur2, w.eur, 101, **k),
            business=True,
        ),
        case(
            "close with money",
            "account_not_empty",
            lambda lg, w, k: lg.close_account(w.eur, **k),
            business=True,
        ),
        case(
            "balance overflow",
            "balance_overflow",
            lambda lg, w, k: lg.deposit(w.eur, MAX_AMOUNT, **k),
            business=True,
        ),
    ]


def stock_cases() -> list[Case]:
    cases = [
        case(f"sku {bad!r}", "invalid_sku", lambda lg, w, k, b=bad: lg.receive_stock(b, 1, **k))
        for bad in ["", "bad sku", "x" * 65, "sku#1", "ü", None, 7]
    ]
    cases += [
        case(
            "reserve unknown sku",
            "sku_not_found",
            lambda lg, w, k: lg.reserve_stock("NOPE", 1, **k),
            business=True,
        ),
        case(
            "adjust unknown sku",
            "sku_not_found",
            lambda lg, w, k: lg.adjust_stock("NOPE", 1, "count", **k),
            business=True,
        ),
        case(
            "commit unknown sku",
            "sku_not_found",
            lambda lg, w, k: lg.commit_reservation("NOPE", "held", **k),
            business=True,
        ),
        case(
            "release unknown sku",
            "sku_not_found",
            lambda lg, w, k: lg.release_reservation("NOPE", "held", **k),
            business=True,
        ),
        case(
            "reserve sku with bad chars",
            "invalid_sku",
            lambda lg, w, k: lg.reserve_stock("a b", 1, **k),
        ),
        case(
            "out of stock",
            "out_of_stock",
            lambda lg, w, k: lg.reserve_stock(SKU, 8, **k),
            business=True,
        ),
        case(
            "adjust below reserved",
            "stock_below_reserved",
            lambda lg, w, k: lg.adjust_stock(SKU, -8, "count", **k),
            business=True,
        ),
        case(
            "adjust below zero",
            "stock_below_reserved",
            lambda lg, w, k: lg.adjust_stock(SKU, -100, "count", **k),
            business=True,
        ),
        case(
            "receive overflow",
            "stock_overflow",
            lambda lg, w, k: lg.receive_stock(SKU, MAX_AMOUNT, **k),
            business=True,
        ),
        case(
            "adjust overflow",
            "stock_overflow",
            lambda lg, w, k: lg.adjust_stock(SKU, MAX_AMOUNT, "count", **k),
            business=True,
        ),
        case(
            "commit unknown reservation",
            "reservation_not_found",
            lambda lg, w, k: lg.commit_reservation(SKU, "nope", **k),
            business=True,
        ),
        case(
            "release unknown reservation",
            "reservation_not_found",
            lambda lg, w, k: lg.release_reservation(SKU, "nope", **k),
            business=True,
        ),
        case(
            "commit shipped",
            "reservation_resolved",
            lambda lg, w, k: lg.commit_reservation(SKU, "shipped", **k),
            business=True,
        ),
        case(
            "release shipped",
            "reservation_resolved",
            lambda lg, w, k: lg.release_reservation(SKU, "shipped", **k),
            business=True,
        ),
        case(
            "commit returned",
            "reservation_resolved",
            lambda lg, w, k: lg.commit_reservation(SKU, "returned", 1, **k),
            business=True,
        ),
        case(
            "release returned",
            "reservation_resolved",
            lambda lg, w, k: lg.release_reservation(SKU, "returned", **k),
            business=True,
        ),
        case(
            "reserve under a held id",
            "reservation_exists",
            lambda lg, w, k: lg.reserve_stock(SKU, 1, reservation_id="held", **k),
            business=True,
        ),
        case(
            "reserve under a resolved id",
            "reservation_exists",
            lambda lg, w, k: lg.reserve_stock(SKU, 1, reservation_id="shipped", **k),
            business=True,
        ),
    ]
    cases += [
        case(
            f"reservation id {bad!r}",
            "invalid_request",
            lambda lg, w, k, b=bad: lg.reserve_stock(SKU, 1, reservation_id=b, **k),
        )
        for bad in ["", "x" * 101, "a\nb"]
    ]
    cases += [
        case(
            f"commit reservation id {bad!r}",
            "invalid_request",
            lambda lg, w, k, b=bad: lg.commit_reservation(SKU, b, **k),
        )
        for bad in ["", None, 5]
    ]
    return cases


def snapshot(ledger: Ledger, world: World) -> object:
    accounts = [ledger.account(a) for a in (world.eur, world.eur2, world.usd, world.closed)]
    return accounts, ledger.inventory(SKU)


class Spy:
    """Counts writes to the store (events and request records go through one insert)."""

    def __init__(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes = 0
        insert = ledger.service.recorder.insert_events

        def counting_insert(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            return insert(*args, **kwargs)

        monkeypatch.setattr(ledger.service.recorder, "insert_events", counting_insert)


def check_cases(ledger: Ledger, monkeypatch: pytest.MonkeyPatch, cases: list[Case]) -> None:
    world = prepare(ledger)
    head = ledger.head()
    state = snapshot(ledger, world)
    spy = Spy(ledger, monkeypatch)
    problems: list[str] = []

    def attempt(item: Case, kwargs: dict[str, Any]) -> DomainError | None:
        try:
            item.call(ledger, world, kwargs)
        except DomainError as error:
            if error.code != item.code:
                problems.append(f"{item.label} {kwargs}: code {error.code!r}, not {item.code!r}")
            return error
        except Exception as error:  # every refusal must be a DomainError
            problems.append(f"{item.label} {kwargs}: raised {error!r}, not a DomainError")
            return None
        problems.append(f"{item.label} {kwargs}: was accepted")
        return None

    for number, item in enumerate(cases):
        # Without a request id: nothing may be written at all, no record either.
        spy.writes = 0
        attempt(item, {})
        if spy.writes:
            problems.append(f"{item.label}: wrote to the store although nothing was accepted")

        # With a request id: recorded only when a business rule refused it.
        request_id = f"bad-{number}"
        error = attempt(item, {"request_id": request_id})
        recorded = ledger.service.recorder.select_requests([request_id])
        if item.business:
            outcome = recorded.get(request_id)
            if outcome is None or outcome.outcome.get("error", {}).get("code") != item.code:
                problems.append(f"{item.label}: refusal not recorded under {request_id}")
            else:
                retried = attempt(item, {"request_id": request_id})
                if error and retried and str(retried) != str(error):
                    problems.append(f"{item.label}: retry refused differently: {retried}")
        elif recorded:
            problems.append(f"{item.label}: a malformed request was recorded")

        if ledger.head() != head:
            problems.append(f"{item.label}: head moved from {head} to {ledger.head()}")
            head = ledger.head()
    if snapshot(ledger, world) != state:
        problems.append("accounts or stock changed")
    assert not problems, "\n".join(problems)
    # The spy does see writes: an accepted command is one insert.
    spy.writes = 0
    ledger.deposit(world.eur2, 1)
    assert spy.writes == 1
    assert ledger.head() == head + 1


def test_invalid_amounts_are_refused(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    check_cases(ledger, monkeypatch, amount_cases())


def test_invalid_currencies_and_text_are_refused(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_cases(ledger, monkeypatch, currency_and_text_cases())


def test_account_rules_refuse(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    check_cases(ledger, monkeypatch, account_cases())


def test_stock_rules_refuse(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    check_cases(ledger, monkeypatch, stock_cases())


BAD_IDS: list[object] = ["", "x" * 201, "a\nb", "tab\there", "r-\ud800", 5, b"r-1", UUID(int=1)]


@pytest.mark.parametrize("field", ["request_id", "correlation_id", "causation_id"])
def test_bad_request_ids_are_refused(ledger: Ledger, field: str) -> None:
    world = prepare(ledger)
    head = ledger.head()
    for bad in BAD_IDS:
        calls: list[Callable[[], object]] = [
            lambda b=bad: ledger.deposit(world.eur, 1, **{field: b}),
            lambda b=bad: ledger.transfer(world.eur, world.eur2, 1, **{field: b}),
            lambda b=bad: ledger.open_account("eve", "EUR", **{field: b}).account_id,
            lambda b=bad: ledger.receive_stock(SKU, 1, **{field: b}),
            lambda b=bad: ledger.reserve_stock(SKU, 1, **{field: b}),
        ]
        for call in calls:
            with pytest.raises(DomainError) as caught:
                call()
            assert caught.value.code == "invalid_request", (field, bad)
            assert field in str(caught.value)
        assert ledger.head() == head
    assert ledger.service.recorder.select_requests(["", "x" * 201, "a\nb", "tab\there"]) == {}


def test_refusal_messages_carry_the_numbers(ledger: Ledger) -> None:
    world = prepare(ledger)
    with pytest.raises(DomainError) as caught:
        ledger.withdraw(world.eur, 1_234)
    assert "1000" in str(caught.value) and "1234" in str(caught.value)
    with pytest.raises(DomainError) as caught:
        ledger.reserve_stock(SKU, 99)
    assert "7 available" in str(caught.value) and "99" in str(caught.value)
    with pytest.raises(DomainError) as caught:
        ledger.deposit(world.eur, -5)
    assert "-5" in str(caught.value)
