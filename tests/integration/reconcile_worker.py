"""A payment reconciliation process for the crash tests (``daybook sagas reconcile
--repair``'s work: ``reconcile_payments`` with ``repair=True``).

    python -m tests.integration.reconcile_worker SETUP_JSON

SETUP_JSON: {"url", "gateway"}. Reconciles the gateway's charges against the ledger's sagas,
refunding what no completed order explains, then prints the findings and ``{"done": true}``.
With ``DAYBOOK_FAULTS=reconcile.after_refund:N`` the process SIGKILLs itself just after
the gateway answered its N-th refund, before anything about it is recorded in the log (the
fault point is the gateway port's here: reconciliation has none of its own).
"""

from __future__ import annotations

import json
import sys

from daybook import open_ledger
from daybook.infrastructure.gateway import Refund
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.reconcile import reconcile_payments
from daybook.infrastructure.streaming.faults import crash_point


class KilledAfterRefund(HttpPaymentGateway):
    def refund(self, key: str) -> Refund:
        refund = super().refund(key)
        crash_point("reconcile.after_refund")
        return refund


def main() -> None:
    setup = json.loads(sys.argv[1])
    gateway = KilledAfterRefund(setup["gateway"], timeout=2.0)
    with open_ledger(setup["url"]) as ledger:
        report = reconcile_payments(ledger, gateway, repair=True)
    gateway.close()
    findings = [[f.key, f.kind, f.action] for f in report.findings]
    print(json.dumps({"findings": findings}), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
