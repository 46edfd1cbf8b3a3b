"""Reconciliation against the payment gateway: its charges compared with saga outcomes.

- a successful, unrefunded charge whose saga did not complete (compensated, or no saga at
  all) is money taken for nothing: refunded with ``repair``, else flagged. Only a charge
  under a key in daybook's form (``idempotency_key``: a saga id, as daybook writes it, and
  the reconciled step) is daybook's: the gateway's account holds other systems' charges as
  well, and one under any other key is theirs, neither refunded nor reported;
- a completed order whose charge the gateway does not hold (or holds refunded or declined)
  is goods given for nothing: flagged for a person;
- a charge of a saga still running or compensating is left alone (the processor is at it);
- a charge listed in a state daybook does not know (another system's pending one, say), or
  that it cannot read, is flagged for a person.

Every finding, and what was done about it, is recorded in the log (``RecordReconciliation``:
who decided, why, when), once per finding and action. A finding the log cannot hold (a key
that is not text of at most 255 characters) is still reported, saying so: reconciliation
goes on to the other charges whatever one of them holds.

A refund and its record cannot be one transaction: the gateway is another system. So the
intent (action ``refunding``) is recorded before the gateway is asked, and a run that finds
a charge of daybook's refunded whose record has that intent without ``refunded`` (a run
killed between the refund and its record, or one whose refund's reply was lost) records the
refund then. A refund whose intent the log would not take is not made.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

from daybook.domain.errors import DomainError, IdempotencyConflict
from daybook.domain.events import LedgerAggregate
from daybook.domain.reconciliation import FindingRecorded, RecordReconciliation, RemoteRecord
from daybook.domain.sagas import Saga, SagaState
from daybook.domain.values import MAX_REQUEST_TEXT, as_text, inventory_id
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.gateway import (
    Charge,
    ChargeStatus,
    GatewayError,
    OutcomeUnknown,
    PaymentGateway,
)
from daybook.infrastructure.ledger.facade import Ledger
from daybook.infrastructure.sagas.processor import idempotency_key

A = TypeVar("A", bound=LedgerAggregate)

RECONCILER = "payment reconciler"

#: The action recorded before a refund is asked of the gateway (see the module's text).
REFUNDING = "refunding"

#: Charges asked of the gateway at a time.
PAGE = 1000

#: Money events: their signed effect on the account's balance.
_POSTINGS = {
    "Account.Deposited": 1,
    "Account.Withdrawn": -1,
    "Account.TransferredIn": 1,
    "Account.TransferredOut": -1,
}


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


def _saga_id_of(key: str, step: str) -> UUID | None:
    """The saga whose ``step`` a charge's key names, if the key is in daybook's form
    (exactly as ``idempotency_key`` writes it); None for any other key: another system's
    charge, however much it looks like one (a saga id alone, another step, capitals)."""
    head, _, _ = key.partition(":")
    try:
        saga_id = UUID(head)
    except ValueError:
        return None
    return saga_id if idempotency_key(saga_id, step) == key else None


def _found(ledger: Ledger, kind: type[A], key: object) -> A | None:
    """The ``kind`` aggregate with ``key``, or None if the ledger has none."""
    try:
        return ledger.read(kind, key)
    except DomainError:
        return None


def gateway_charges(gateway: PaymentGateway, page: int = PAGE) -> Iterator[Charge]:
    """Every charge the gateway holds, in key order, asked for ``page`` at a time. Ends on
    an empty page (a gateway may cap a page below ``page``), and raises ``GatewayError`` if
    keys do not come in strictly increasing order after the one asked for: a gateway that
    ignores ``after`` would otherwise be read again and again."""
    if page < 1:
        raise ValueError("page must be at least 1")
    after = ""
    while batch := gateway.charges(after, page):
        for charge in batch:
            if charge.key <= after:
                msg = (
                    f"the gateway listed charge {charge.key!r} after {after!r}: charges must "
                    "come in increasing key order (GET /charges?after=KEY&limit=N)"
                )
                raise GatewayError(msg)
            after = charge.key
            yield charge


def reconcile_payments(
    ledger: Ledger,
    gateway: PaymentGateway,
    *,
    completed: Iterable[UUID] = (),
    repair: bool = False,
    step: str = "charge",
    page: int = PAGE,
) -> Report:
    """Compare the gateway's charges with the sagas they belong to (and ``completed``
    sagas with the gateway); record every finding; refund with ``repair``.

    Memory holds a page of charges, whatever the gateway holds, and ``completed`` is
    consumed as it comes. Give it in ascending order of the ids' text (as
    ``daybook sagas reconcile`` reads them): it is merged with a second pass over
    the charges, which come in key order. An id out of that order is looked up on its own,
    so any order is correct; the sorted one costs no request per saga."""
    report = Report()
    for charge in gateway_charges(gateway, page):
        report.checked += 1
        if charge.status is ChargeStatus.OTHER:
            # Listed in a state this cannot judge (another system's pending charge, say):
            # a person looks; the run goes on.
            detail = f"listed in a state daybook does not know: {charge.detail}"
            _record(
                ledger, report, Finding(charge.key, "charge_in_unknown_state", "flagged", detail)
            )
            continue
        if charge.status is not ChargeStatus.SUCCEEDED:
            continue
        saga_id = _saga_id_of(charge.key, step)
        if saga_id is None:
            # Another system's: no order of daybook's explains it, and none should. Refunded,
            # it would be that system's customer's payment taken back; flagged, it would keep
            # the run unresolved (and recorded in the log) for as long as that system charges.
            continue
        if charge.refunded:
            _record_refunds_made(ledger, report, charge)
            continue
        saga = _found(ledger, Saga, saga_id)
        if saga is not None and saga.state is SagaState.COMPLETED:
            # An order's saga says what it charges (a saga of another kind may not).
            total, currency = saga.data.get("total"), saga.data.get("currency")
            if total is not None and not charge.is_for(total, str(currency)):
                detail = (
                    f"{charge.amount} {charge.currency} charged for a completed order of "
                    f"{total} {currency}"
                )
                _record(ledger, report, Finding(charge.key, "charge_mismatch", "flagged", detail))
            continue
        if saga is not None and saga.state in (
            SagaState.RUNNING,
            SagaState.COMPENSATING,
        ):
            continue
        kind = "charge_without_order" if saga is None else f"charge_of_{saga.state.value}_order"
        detail = f"{charge.amount} {charge.currency} charged, no completed order"
        _decide(ledger, report, gateway, charge, kind, detail, repair)
    charges = gateway_charges(gateway, page)
    current = next(charges, None)
    merged = ""  # the merge has gone past every key below this
    for saga_id in completed:
        key = idempotency_key(saga_id, step)
        if key < merged:
            found = gateway.lookup(key)
        else:
            merged = key
            while current is not None and current.key < key:
                current = next(charges, None)
            found = current if current is not None and current.key == key else None
        if found is not None and found.status is ChargeStatus.OTHER:
            continue  # listed unreadable: flagged above (charge_in_unknown_state), not unpaid
        if found is None or found.status is not ChargeStatus.SUCCEEDED or found.refunded:
            finding = Finding(key, "order_without_charge", "flagged", "completed, not paid")
            _record(ledger, report, finding)
    return report


def saga_postings(log: EventLog, sagas: Collection[UUID]) -> dict[UUID, Counter[str]]:
    """What every saga posted, from the log: net money per account id, and units shipped
    per inventory id (``"shipped:<id>"``), summed over the events tagged with the saga's id
    (the processor sends every command with it as correlation id)."""
    wanted = {str(saga_id): saga_id for saga_id in sagas}
    postings: dict[UUID, Counter[str]] = {saga_id: Counter() for saga_id in sagas}
    position = 0
    while batch := log.read(position, 10_000):
        position = batch[-1].position
        for event in batch:
            meta = event.data.get("meta") or {}
            saga_id = wanted.get(str(meta.get("correlation_id")))
            if saga_id is None:
                continue
            sign = _POSTINGS.get(event.type)
            if sign is not None:
                postings[saga_id][event.originator_id] += sign * int(event.data["amount"])
            elif event.type == "Inventory.ReservationCommitted":
                postings[saga_id][f"shipped:{event.originator_id}"] += int(event.data["shipped"])
    return postings


def check_saga_postings(ledger: Ledger, log: EventLog, sagas: Collection[UUID]) -> list[str]:
    """Problems with what finished order sagas posted: nothing unless the order completed,
    and then exactly its total from the customer to the merchant and its lines shipped."""
    problems = []
    for saga_id, posted in saga_postings(log, sagas).items():
        saga = ledger.read(Saga, saga_id)
        expected: Counter[str] = Counter()
        if saga.state is SagaState.COMPLETED:
            data = saga.data
            expected[str(data["customer"])] -= int(data["total"])
            expected[str(data["merchant"])] += int(data["total"])
            for line in data["lines"]:
                expected[f"shipped:{inventory_id(line['sku'])}"] += int(line["quantity"])
        elif not saga.state.finished:
            continue
        actual = Counter({k: v for k, v in posted.items() if v})
        if actual != Counter({k: v for k, v in expected.items() if v}):
            problems.append(f"saga {saga_id} ({saga.state.value}) posted {dict(actual)}")
    return problems


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
    refused = _log(ledger, Finding(charge.key, kind, REFUNDING, detail)) if repair else None
    if refused is not None:
        detail = f"{detail}; not refunded: the log refused to record the refund first"
    elif repair:
        try:
            if gateway.refund(charge.key).status == "refunded":
                action = "refunded"
            else:  # listed as succeeded, yet nothing to refund: a person must look
                detail = f"{detail}; not refunded: the gateway answered nothing to refund"
        except OutcomeUnknown as unknown:
            # Sent, perhaps made: looked up, as the saga processor looks a charge up.
            try:
                found = gateway.lookup(charge.key)
            except GatewayError as error:
                found = None
                unknown = OutcomeUnknown(f"{unknown}; its lookup failed: {error}")
            if found is not None and found.refunded:
                action = "refunded"
            else:
                detail = f"{detail}; refund failed: {unknown}"
        except GatewayError as error:
            detail = f"{detail}; refund failed: {error}"
    _record(ledger, report, Finding(charge.key, kind, action, detail))


def _record_refunds_made(ledger: Ledger, report: Report, charge: Charge) -> None:
    """Record the refund of a charge of daybook's, refunded at the gateway, that a run meant
    to make (its intent is recorded) and did not record: killed between the two, or told
    nothing by the gateway. Refunded by its saga's compensation, it has no record at all."""
    record = _found(ledger, RemoteRecord, charge.key)
    if record is None:
        return  # no record of this charge: nothing reconciliation did
    for kind, action in sorted(record.recorded):
        if action == REFUNDING and not record.has_recorded(kind, "refunded"):
            detail = (
                f"{charge.amount} {charge.currency} charged, no completed order; found "
                "refunded after a run set out to refund it (by that run, which stopped "
                "before recording it or was not told, or since by someone else)"
            )
            _record(ledger, report, Finding(charge.key, kind, "refunded", detail))


def _record(ledger: Ledger, report: Report, finding: Finding) -> None:
    """Record ``finding`` in the log and add it to the report; one the log refuses is
    reported as not recorded."""
    refused = _log(ledger, finding)
    if refused is not None:
        detail = f"{finding.detail} (not recorded in the log: {refused})"
        finding = Finding(finding.key, finding.kind, finding.action, detail)
    report.findings.append(finding)


def _log(ledger: Ledger, finding: Finding) -> str | None:
    """Record ``finding`` in the log; why the log refused it, if it did. Recorded before
    under the same finding and action, with another detail (a refund that failed with
    another error) or by a run older than the request retention window, it is not recorded
    again (the remote record says so itself)."""
    try:
        ledger.execute(
            RecordReconciliation(
                finding.key,
                finding.kind,
                finding.action,
                as_text(finding.detail),
                decided_by=RECONCILER,
                request_id=_request_id(finding),
            )
        )
    except (IdempotencyConflict, FindingRecorded):
        pass  # recorded by an earlier run, with that run's detail
    except DomainError as refused:
        # Raised, it would end the run at this charge, run after run: said instead.
        return f"{refused.code}: {refused}"
    return None


def _request_id(finding: Finding) -> str:
    """One request id per finding and action. A key that would make it too long, or not
    printable, for a request id is named by its digest instead."""
    request_id = f"reconcile:{finding.key}:{finding.kind}:{finding.action}"
    if len(request_id) <= MAX_REQUEST_TEXT and request_id.isprintable():
        return request_id  # the form recorded by earlier versions: not recorded twice
    digest = hashlib.sha256(finding.key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"reconcile-sha256:{digest}:{finding.kind}:{finding.action}"
