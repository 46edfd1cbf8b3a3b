"""SIGKILL ``daybook sagas reconcile --repair`` just after the gateway refunded a charge no
order explains, before the refund is recorded in the log; after a restart the charge is
refunded once and the log holds the refund, as it does for a run that was not killed."""

from __future__ import annotations

import json
import signal
import uuid

import pytest

from daybook import open_ledger
from daybook.domain.reconciliation import RemoteRecord
from daybook.infrastructure.gateway.fake import FakeGatewayServer, Knobs
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.processor import idempotency_key
from daybook.infrastructure.sagas.reconcile import reconcile_payments
from tests.integration.killed import done_or_killed, run_module


def run_reconciler(url: str, gateway: str, faults: str | None) -> int:
    setup = {"url": url, "gateway": gateway}
    result = run_module("tests.integration.reconcile_worker", [json.dumps(setup)], faults)
    return done_or_killed(result, faults)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("faults", [None, "reconcile.after_refund:1"], ids=["calm", "killed"])
def test_a_refund_made_by_a_killed_reconciliation_is_recorded_after_a_restart(
    pg_url: str, faults: str | None
) -> None:
    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger(pg_url) as ledger:
        http = HttpPaymentGateway(server.url)
        # A charge under a key of daybook's form whose order the ledger does not have.
        key = idempotency_key(uuid.uuid4(), "charge")
        http.charge(key, amount=700, currency="EUR", customer="c", reference="r")
        http.close()

        code = run_reconciler(pg_url, server.url, faults)
        if faults is not None:
            assert code == -signal.SIGKILL, "the crash point was not reached"
            run_reconciler(pg_url, server.url, None)

        assert server.gateway.refunds[key] == 1  # refunded once
        # Every finding and action is recorded in the log, once: here, the refund.
        record = ledger.read(RemoteRecord, key)
        assert record.has_recorded("charge_without_order", "refunded"), record.view()


@pytest.mark.parametrize("lookup", ["answers", "fails"])
def test_a_refund_whose_reply_was_lost_is_recorded_as_refunded(lookup: str) -> None:
    """The gateway refunds, and its reply is lost (a timeout: ``OutcomeUnknown``). The run
    recorded the charge flagged, "refund failed", and the next run, finding the charge
    refunded, skipped it: the log said for good that the refund failed. Now the run looks
    the charge up and records the refund; if the lookup fails too, the next run does."""
    from daybook.infrastructure.gateway import Charge, GatewayError, OutcomeUnknown, Refund

    class ReplyLost(HttpPaymentGateway):
        def refund(self, key: str) -> Refund:
            super().refund(key)
            raise OutcomeUnknown("POST /refunds: ReadTimeout: timed out")

        def lookup(self, key: str) -> Charge | None:
            if lookup == "fails":
                raise GatewayError("GET /charges/KEY: ReadTimeout: timed out")
            return super().lookup(key)

    with FakeGatewayServer(Knobs(seed=1)) as server, open_ledger("memory://") as ledger:
        key = idempotency_key(uuid.uuid4(), "charge")
        http = HttpPaymentGateway(server.url)
        http.charge(key, amount=700, currency="EUR", customer="c", reference="r")
        lost = ReplyLost(server.url)
        first = reconcile_payments(ledger, lost, repair=True)
        record = ledger.read(RemoteRecord, key)
        if lookup == "answers":
            assert [f.action for f in first.findings] == ["refunded"]
        else:
            assert [f.action for f in first.findings] == ["flagged"]
            assert not record.has_recorded("charge_without_order", "refunded")
            second = reconcile_payments(ledger, http, repair=True)
            assert [f.action for f in second.findings] == ["refunded"]
            assert "found refunded after a run set out to refund it" in second.findings[0].detail
        assert server.gateway.refunds[key] == 1
        assert ledger.read(RemoteRecord, key).has_recorded("charge_without_order", "refunded")
        assert reconcile_payments(ledger, http, repair=True).findings == []  # once
        lost.close()
        http.close()
