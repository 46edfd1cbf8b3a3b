"""Reconciling payments pages through the gateway's charges: memory holds a page, whatever
the gateway holds, and completed orders are merged with the charges in key order."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daybook import open_ledger
from daybook.domain.errors import DomainError
from daybook.domain.reconciliation import RecordReconciliation, RemoteRecord
from daybook.infrastructure.gateway import Charge, ChargeStatus, GatewayError, Refund
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.processor import idempotency_key
from daybook.infrastructure.sagas.reconcile import gateway_charges, reconcile_payments


def stray(number: int) -> str:
    """The key of a charge of daybook's form whose saga this ledger does not have."""
    return idempotency_key(uuid.UUID(int=number, version=4), "charge")


class Counting:
    """The HTTP gateway, counting what reconciliation asks of it."""

    def __init__(self, gateway: HttpPaymentGateway) -> None:
        self.gateway = gateway
        self.pages: list[int] = []
        self.lookups = 0

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        page = self.gateway.charges(after, limit)
        self.pages.append(len(page))
        return page

    def lookup(self, key: str) -> Charge | None:
        self.lookups += 1
        return self.gateway.lookup(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gateway, name)


def test_completed_orders_are_merged_with_the_charges_a_page_at_a_time() -> None:
    rnd = random.Random(7)
    completed = [uuid.UUID(int=rnd.getrandbits(128), version=4) for _ in range(25)]
    unpaid = set(completed[:5])  # completed, never charged
    declined = set(completed[5:7])  # completed, the charge declined
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        http = HttpPaymentGateway(server.url)
        for saga_id in completed:
            if saga_id in unpaid:
                continue
            server.gateway.knobs.decline_rate = 1.0 if saga_id in declined else 0.0
            key = idempotency_key(saga_id, "charge")
            http.charge(key, amount=100, currency="EUR", customer="c", reference="r")
        server.gateway.knobs.decline_rate = 0.0
        strays = [stray(rnd.getrandbits(128)) for _ in range(6)]
        for key in strays:  # charges no order explains, between and around the others
            http.charge(key, amount=100, currency="EUR", customer="c", reference="r")
        expected = {idempotency_key(s, "charge") for s in unpaid | declined}

        gateway = Counting(http)
        in_order = sorted(completed, key=str)
        report = reconcile_payments(ledger, gateway, completed=in_order, page=3)
        unexplained = [f.key for f in report.findings if f.kind == "charge_without_order"]
        flagged = {f.key for f in report.findings if f.kind == "order_without_charge"}
        assert flagged == expected
        # (The orders here have no saga in this ledger, so their charges are unexplained too.)
        assert set(strays) <= set(unexplained)
        assert report.checked == 25 - len(unpaid) + 6  # every charge, page by page
        assert max(gateway.pages) == 3 and len(gateway.pages) > 2 * 26 // 3
        assert gateway.lookups == 0  # merged, no request per order

        shuffled = Counting(http)
        report = reconcile_payments(ledger, shuffled, completed=completed, page=3)
        assert {f.key for f in report.findings if f.kind == "order_without_charge"} == expected
        assert shuffled.lookups > 0  # ids out of order are looked up on their own
        http.close()


class Listing:
    """A gateway's listing alone: pages capped at ``cap``, or ``after`` ignored."""

    def __init__(self, keys: list[str], cap: int, honours_after: bool = True) -> None:
        self.keys, self.cap, self.honours_after = sorted(keys), cap, honours_after

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        keys = [k for k in self.keys if k > after or not self.honours_after]
        return [Charge(k, ChargeStatus.DECLINED, 1, "EUR") for k in keys[: min(limit, self.cap)]]


def test_a_gateway_that_pages_short_is_read_to_the_end_and_one_that_ignores_after_is_refused() -> (
    None
):
    keys = [f"k-{n:02}" for n in range(10)]
    capped = Listing(keys, cap=3)
    assert [c.key for c in gateway_charges(capped, page=1000)] == keys  # type: ignore[arg-type]
    stuck = Listing(keys, cap=3, honours_after=False)
    with pytest.raises(GatewayError, match="increasing key order"):
        list(gateway_charges(stuck, page=3))  # type: ignore[arg-type]


def _findings_recorded(ledger: Any, key: str) -> int:
    return int(ledger.read(RemoteRecord, key).findings)


def _recorded(ledger: Any, key: str) -> list[tuple[str, str]]:
    """The (finding, action) pairs recorded for ``key``, in the order they were."""
    events = ledger.service.events.get(RemoteRecord.id_for(key))
    return [(e.finding, e.action) for e in events if isinstance(e, RemoteRecord.Decided)]


def test_a_reconciliation_decision_keeps_who_asked_and_the_trace() -> None:
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with open_ledger("memory://") as ledger:
        recorded = RecordReconciliation(
            "a-stray", "charge_without_order", "flagged", "no order", actor="ops", traceparent=trace
        )
        ledger.execute(recorded)
        (_, decided) = ledger.service.events.get(RemoteRecord.id_for("a-stray"))
    assert (decided.meta.actor, decided.meta.traceparent) == ("ops", trace)
    assert decided.meta.decision.by == "reconciler"


def test_a_finding_recorded_again_with_another_detail_does_not_end_the_run() -> None:
    """A flagged charge whose refund then fails (``--repair`` while refunds answer 503) is
    the same finding and action with another detail: the run went no further than that
    charge (``idempotency_conflict``), run after run, until the refund went through."""
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        http = HttpPaymentGateway(server.url)
        a_stray, b_stray = stray(1), stray(2)
        for key in (a_stray, b_stray):
            http.charge(key, amount=500, currency="EUR", customer="c", reference="r")
        first = reconcile_payments(ledger, http)
        assert [(f.key, f.action) for f in first.findings] == [
            (a_stray, "flagged"),
            (b_stray, "flagged"),
        ]
        server.gateway.knobs.refund_unavailable_rate = 1.0
        second = reconcile_payments(ledger, http, repair=True)
        assert [(f.key, f.action) for f in second.findings] == [
            (a_stray, "flagged"),
            (b_stray, "flagged"),
        ]
        assert all("refund failed" in f.detail for f in second.findings)
        server.gateway.knobs.refund_unavailable_rate = 0.0
        third = reconcile_payments(ledger, http, repair=True)
        assert {f.key for f in third.findings if f.action == "refunded"} == {a_stray, b_stray}
        # Once per finding and action: flagged, then the refund's intent (before each
        # attempt, recorded once), then refunded.
        assert _recorded(ledger, a_stray) == [
            ("charge_without_order", "flagged"),
            ("charge_without_order", "refunding"),
            ("charge_without_order", "refunded"),
        ]
        http.close()


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_a_finding_is_recorded_once_not_again_every_request_retention_window() -> None:
    """A charge no order explains, flagged by a daily run for a week: recorded once. The
    request id of its record is forgotten after the request retention window (3 days), so
    it alone recorded the finding again every few days, however long it stayed open."""
    clock = Clock()
    with (
        FakeGatewayServer(Knobs(seed=1)) as server,
        open_ledger("memory://", clock=clock) as ledger,
    ):
        http = HttpPaymentGateway(server.url)
        a_stray = stray(9)
        http.charge(a_stray, amount=100, currency="EUR", customer="c", reference="r")
        for _day in range(8):
            report = reconcile_payments(ledger, http)
            assert [(f.kind, f.action) for f in report.findings] == [
                ("charge_without_order", "flagged")
            ]
            clock.now += timedelta(days=1)
        assert _findings_recorded(ledger, a_stray) == 1
        reconcile_payments(ledger, http, repair=True)  # other actions: recorded, once
        clock.now += timedelta(days=4)
        reconcile_payments(ledger, http, repair=True)
        assert _findings_recorded(ledger, a_stray) == 3  # flagged, refunding, refunded
        http.close()


def test_what_a_remote_record_has_recorded_is_rebuilt_from_its_events() -> None:
    """The record's own events say which findings and actions it holds: a record written
    before it kept them in its state (its events replayed) refuses a repeat the same way."""
    with open_ledger("memory://") as ledger:
        for action in ("flagged", "refunded"):
            ledger.execute(RecordReconciliation("a-stray", "charge_without_order", action, "x"))
        events = list(ledger.service.events.get(RemoteRecord.id_for("a-stray")))
        head = ledger.head()
        again = RecordReconciliation("a-stray", "charge_without_order", "flagged", "other detail")
        with pytest.raises(DomainError) as refused:
            ledger.execute(again)
        assert refused.value.code == "finding_recorded"
        assert ledger.head() == head  # the same finding and action: nothing written
    replayed: Any = None
    for event in events:
        replayed = event.mutate(replayed)
    assert replayed.has_recorded("charge_without_order", "flagged")
    assert replayed.has_recorded("charge_without_order", "refunded")
    assert not replayed.has_recorded("order_without_charge", "flagged")
    assert replayed.findings == 2


def test_a_foreign_charge_with_a_long_key_is_recorded_and_the_run_goes_on() -> None:
    """Other systems' charges sit in the same gateway account, with keys of up to 255
    characters, and one listed in a state daybook does not know is flagged: a key that made
    the request id too long ended the run at that charge (and, before only daybook's keys
    were refunded, after ``--repair`` had refunded it: a refund the log never heard of)."""
    long_key = "other-system/" + "k" * 157
    longest = "other-system/" + "x" * 242  # 255 characters
    too_long = "other-system/" + "z" * 290
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        http = HttpPaymentGateway(server.url)
        for key in (long_key, longest, too_long, "zzz-after"):
            server.gateway.charges[key] = {
                "key": key,
                "amount": 500,
                "currency": "EUR",
                "status": "pending",
            }
        report = reconcile_payments(ledger, http, repair=True)
        flagged = {f.key: f for f in report.findings if f.action == "flagged"}
        assert set(flagged) == {long_key, longest, too_long, "zzz-after"}
        for key in (long_key, longest, "zzz-after"):
            assert _findings_recorded(ledger, key) == 1, key
            assert "not recorded" not in flagged[key].detail
        assert "not recorded in the log: invalid_request" in flagged[too_long].detail
        again = reconcile_payments(ledger, http, repair=True)
        assert {f.key for f in again.findings} == set(flagged)  # still pending: flagged
        for key in (long_key, longest, "zzz-after"):
            assert _findings_recorded(ledger, key) == 1, key  # not recorded twice
        assert server.gateway.refunds == {}
        http.close()


def test_a_charge_listed_in_a_state_daybook_does_not_know_is_flagged() -> None:
    """Another system's charge in the same gateway account, in a state of its own (pending)
    or unreadable (no amount): it made the whole page unreadable, and the run ended there,
    run after run, never reaching the charges after it."""
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        http = HttpPaymentGateway(server.url)
        c_stray = stray(3)
        http.charge(c_stray, amount=500, currency="EUR", customer="c", reference="r")
        server.gateway.charges["a-other-system"] = {
            "key": "a-other-system",
            "amount": 700,
            "currency": "EUR",
            "status": "pending",
        }
        server.gateway.charges["b-other-system"] = {"key": "b-other-system", "status": "ok"}
        report = reconcile_payments(ledger, http, repair=True)
        http.close()
        found = {f.key: (f.kind, f.action) for f in report.findings}
        assert found == {
            "a-other-system": ("charge_in_unknown_state", "flagged"),
            "b-other-system": ("charge_in_unknown_state", "flagged"),
            c_stray: ("charge_without_order", "refunded"),
        }
        pending = next(f for f in report.findings if f.key == "a-other-system")
        assert "pending" in pending.detail
        assert _findings_recorded(ledger, "a-other-system") == 1


def test_a_charge_under_a_key_not_in_daybooks_form_is_not_refunded_nor_flagged() -> None:
    """The gateway account holds other systems' charges: a succeeded one under a key that
    names no saga's charge step ("webshop-invoice-2031") was taken for a charge no order
    explains, and ``--repair`` refunded another system's customer payment. Only a key in
    daybook's form is daybook's: one whose saga this ledger lacks is still refunded."""
    ours = idempotency_key(uuid.UUID(int=7, version=4), "charge")
    others = [
        "webshop-invoice-2031",
        str(uuid.UUID(int=8, version=4)),  # a saga id alone, no step
        f"{uuid.UUID(int=9, version=4)}:invoice",  # another step than the one reconciled
        f"{str(uuid.UUID(int=10, version=4)).upper()}:charge",  # not as daybook spells it
    ]
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        http = HttpPaymentGateway(server.url)
        for key in (ours, *others):
            http.charge(key, amount=4_990, currency="EUR", customer="c", reference="r")
        report = reconcile_payments(ledger, http, repair=True)
        http.close()
    assert [(f.key, f.kind, f.action) for f in report.findings] == [
        (ours, "charge_without_order", "refunded")
    ]
    assert {key: server.gateway.refunds[key] for key in others} == dict.fromkeys(others, 0)
    assert report.checked == 5


class RefusingRefunds(Counting):
    """A gateway listing a succeeded charge whose refund it answers with "nothing to
    refund" (the charge disputed and reversed meanwhile, or the gateway in error)."""

    def refund(self, key: str) -> Refund:
        self.gateway.refund(key)  # asked, as the run asks; the answer is replaced
        return Refund(key, "nothing_to_refund", 0)


def test_a_refund_the_gateway_answers_with_nothing_to_refund_is_not_recorded_as_refunded() -> None:
    """``--repair`` recorded "refunded" whatever the refund's answer: told there was nothing
    to refund under the key, it told the operator (and the log) that the customer had their
    money back. It flags the charge with the gateway's answer instead."""
    key = stray(11)
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        http = HttpPaymentGateway(server.url)
        http.charge(key, amount=500, currency="EUR", customer="c", reference="r")
        report = reconcile_payments(ledger, RefusingRefunds(http), repair=True)
        http.close()
        ((finding,),) = [[f for f in report.findings if f.key == key]]
        assert (finding.kind, finding.action) == ("charge_without_order", "flagged")
        assert "nothing to refund" in finding.detail
        assert ("charge_without_order", "refunded") not in _recorded(ledger, key)
