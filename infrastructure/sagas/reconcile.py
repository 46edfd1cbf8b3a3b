"""Reconciliation against the payment gateway: its charges compared with saga outcomes.

- a successful, unrefunded charge whose saga did not complete (compensated, or no saga at
  all) is money taken for nothing: refunded with ``repair``, else flagged;
- a completed order whose charge the gateway does not hold (or holds refunded or declined)
  is goods given for nothing: flagged for a person;
- a charge of a saga still running or compensating is left alone (the processor is at it).

Every finding, and what was done about it, is recorded in the log (``RecordReconciliation``:
who decided, why, when), once per finding and action.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import UUID

from daybook.domain.errors import DomainError
from daybook.domain.reconciliation import RecordReconciliation
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.gateway import Charge, ChargeStatus, GatewayError, PaymentGateway
from daybook.infrastructure.ledger.facade import Ledger
from daybook.infrastructure.sagas.processor import idempotency_key

RECONCILER = "payment reconciler"


@dataclass(frozen=True)
class Finding:
    key: str
    kind: str
    action: str
    detail: str

    @property
    def resolved(self) -> bool:
        return self.action == "refunded"


@dataclass
class Report:
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def unresolved(self) -> list[Finding]:
        return [f for f in self.findings if not f.resolved]


def _saga_of(ledger: Ledger, key: str) -> Saga | None:
    saga_id, _, _ = key.partition(":")
    try:
        return ledger.read(Saga, UUID(saga_id))
    except (ValueError, DomainError):
        return None


def reconcile_payments(
    ledger: Ledger,
    gateway: PaymentGateway,
    *,
    completed: Iterable[UUID] = (),
    repair: bool = False,
    step: str = "charge",
) -> Report:
    """Compare the gateway's charges with the sagas they belong to (and ``completed``
    sagas with the gateway); record every finding; refund with ``repair``."""
    report = Report()
    charges = {charge.key: charge for charge in gateway.charges()}
    for charge in charges.values():
        report.checked += 1
        if charge.status is not ChargeStatus.SUCCEEDED or charge.refunded:
            continue
        saga = _saga_of(ledger, charge.key)
        if saga is not None and saga.state in (
            SagaState.COMPLETED,
            SagaState.RUNNING,
            SagaState.COMPENSATING,
        ):
            continue
        kind = "charge_without_order" if saga is None else f"charge_of_{saga.state.value}_order"
        detail = f"{charge.amount} {charge.currency} charged, no completed order"
        _decide(ledger, report, gateway, charge, kind, detail, repair)
    for saga_id in completed:
        key = idempotency_key(saga_id, step)
        found = charges.get(key)
        if found is None or found.status is not ChargeStatus.SUCCEEDED or found.refunded:
            finding = Finding(key, "order_without_charge", "flagged", "completed, not paid")
            _record(ledger, finding)
            report.findings.append(finding)
    return report


def _decide(
    ledger: Ledger,
    report: Report,
    gateway: PaymentGateway,
    charge: Charge,
    kind: str,
    detail: str,
    repair: bool,
) -> None:
    action = "flagged"
    if repair:
        try:
            gateway.refund(charge.key)
            action = "refunded"
        except GatewayError as error:
            detail = f"{detail}; refund failed: {error}"
    finding = Finding(charge.key, kind, action, detail)
    _record(ledger, finding)
    report.findings.append(finding)


def _record(ledger: Ledger, finding: Finding) -> None:
    ledger.execute(
        RecordReconciliation(
            finding.key,
            finding.kind,
            finding.action,
            " ".join(finding.detail.split())[:200],
            decided_by=RECONCILER,
            request_id=f"reconcile:{finding.key}:{finding.kind}:{finding.action}",
        )
    )
