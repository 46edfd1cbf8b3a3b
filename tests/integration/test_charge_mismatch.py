"""A charge the gateway made for another amount or currency than the order's (a partial
approval, as card networks give for prepaid cards): the order is not completed on it."""

from __future__ import annotations

from typing import Any

import pytest

from daybook import open_ledger, open_read_models
from daybook.domain.orders import PlaceOrder
from daybook.domain.sagas import SagaState
from daybook.infrastructure.gateway import Charge, ChargeStatus, Refund
from daybook.infrastructure.sagas.processor import SagaProcessor


class MismatchedGateway:
    """Charges succeed, but for what the gateway chose: half the amount (a partial
    approval, as card networks give for prepaid cards), or in another currency."""

    def __init__(self, amount: Any, currency: Any) -> None:
        self.amount, self.currency = amount, currency
        self.made: dict[str, Charge] = {}
        self.refunded: list[str] = []

    def charge(self, key: str, *, amount: int, currency: str, **_: Any) -> Charge:
        made = Charge(
            key,
            ChargeStatus.SUCCEEDED,
            self.amount(amount),
            self.currency(currency),
            charge_id="ch_1",
        )
        self.made[key] = made
        return made

    def lookup(self, key: str) -> Charge | None:
        return self.made.get(key)

    def refund(self, key: str) -> Refund:
        self.refunded.append(key)
        return Refund(key, "refunded", self.made[key].amount)

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        return sorted((c for k, c in self.made.items() if k > after), key=lambda c: c.key)


def _ordered(url: str, gateway: MismatchedGateway) -> tuple[Any, Any, Any, Any]:
    """A JPY order of 6,000 (two kettles) placed at ``url`` and driven to its end through
    ``gateway``: the ledger (open), the customer, the merchant and the saga."""
    ledger = open_ledger(url)
    try:
        return (ledger, *_placed_and_driven(ledger, url, gateway))
    except BaseException:
        ledger.close()
        raise


def _placed_and_driven(ledger: Any, url: str, gateway: MismatchedGateway) -> tuple[Any, Any, Any]:
    customer = ledger.open_account("customer", "JPY").account_id
    merchant = ledger.open_account("merchant", "JPY").account_id
    assert customer is not None and merchant is not None
    ledger.deposit(customer, 100_000)
    ledger.receive_stock("KETTLE", 10)
    receipt = ledger.execute(PlaceOrder("o-1", customer, merchant, [("KETTLE", 2, 3_000)]))
    with open_read_models(url) as views:
        processor = SagaProcessor(ledger, views, {"payments": gateway}, seed=1)
        try:
            saga = processor.drive(receipt.saga_id)
            for _ in range(10):
                if saga.state is not SagaState.RUNNING:
                    break
                saga = processor.drive(receipt.saga_id)
        finally:
            processor.stop()
    return customer, merchant, saga


@pytest.mark.parametrize(
    "gateway",
    [
        MismatchedGateway(lambda a: a // 2, lambda c: c),  # half the total charged
        MismatchedGateway(lambda a: a, lambda c: "USD"),  # the order is in JPY
    ],
    ids=["partial-amount", "other-currency"],
)
def test_an_order_is_not_completed_on_a_charge_of_another_amount_or_currency(
    tmp_path: Any, gateway: MismatchedGateway
) -> None:
    ledger, customer, merchant, saga = _ordered(f"sqlite:///{tmp_path}/shop.db", gateway)
    with ledger:
        (charge,) = gateway.made.values()
        # The gateway took charge.amount charge.currency; the ledger moved 6,000 JPY.
        assert saga.state is not SagaState.COMPLETED, (
            f"order completed: {ledger.account(merchant).balance} JPY moved to the merchant "
            f"for a charge of {charge.amount} {charge.currency}"
        )
        # Compensated: the charge refunded by its key, the hold voided, the stock back.
        assert saga.state is SagaState.COMPENSATED, saga.state
        assert gateway.refunded == [charge.key]
        assert ledger.account(merchant).balance == 0
        assert ledger.account(customer).available == 100_000
        assert ledger.inventory("KETTLE").available == 10


def test_reconciliation_flags_a_completed_order_charged_another_amount_or_currency(
    tmp_path: Any,
) -> None:
    """The reconciler's promise: a completed order without (its) charge is flagged. One
    completed before the processor compared what the gateway charged (or whose charge the
    gateway now reports otherwise) passed as clean."""
    from daybook.infrastructure.sagas.reconcile import reconcile_payments

    for n, (amount, currency) in enumerate([(3_000, "JPY"), (6_000, "USD")]):
        gateway = MismatchedGateway(lambda a: a, lambda c: c)  # charges what is asked
        ledger, _, merchant, saga = _ordered(f"sqlite:///{tmp_path}/shop{n}.db", gateway)
        with ledger:
            assert ledger.account(merchant).balance == 6_000  # completed
            (key,) = gateway.made
            gateway.made[key] = Charge(key, ChargeStatus.SUCCEEDED, amount, currency, "ch_1")
            report = reconcile_payments(ledger, gateway, completed=[saga.id])
            kinds = [(f.kind, f.action) for f in report.findings]
            assert ("charge_mismatch", "flagged") in kinds, (amount, currency, report.findings)


def test_a_charge_whose_currency_the_gateway_writes_in_lower_case_completes_the_order(
    tmp_path: Any,
) -> None:
    """Some gateways write ISO codes in lower case ("jpy"): the same currency, not a
    mismatch (else every order would be refunded, and every completed one flagged)."""
    from daybook.infrastructure.sagas.reconcile import reconcile_payments

    gateway = MismatchedGateway(lambda a: a, lambda c: c.lower())
    ledger, _, merchant, saga = _ordered(f"sqlite:///{tmp_path}/shop.db", gateway)
    with ledger:
        assert saga.state is SagaState.COMPLETED, saga.view().last_error
        assert ledger.account(merchant).balance == 6_000
        report = reconcile_payments(ledger, gateway, completed=[saga.id])
        assert [f.kind for f in report.findings] == [], report.findings
