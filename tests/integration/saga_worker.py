"""A saga processor process for the crash tests.

    python -m tests.integration.saga_worker SETUP_JSON

SETUP_JSON: {"url", "gateway", "sagas": [saga ids], "clock_offset": seconds (optional)}.
With a clock offset, the ledger and the processor run that many seconds ahead of the system
clock (a restart after a deadline passed, without waiting for it). Runs the saga processor
(with its own runner of the ``sagas`` read model) until every listed saga has ended, then
prints ``{"done": true}``. With ``DAYBOOK_FAULTS`` set (see
daybook.infrastructure.streaming.faults) the process SIGKILLs itself at the named step
boundary.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

from daybook import open_ledger, run_projections
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.gateway.http import HttpPaymentGateway
from daybook.infrastructure.sagas.processor import Backoff, SagaProcessor
from daybook.projections import SAGA_LIST

ENDED = (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_ATTENTION)


def main() -> None:
    setup = json.loads(sys.argv[1])
    sagas = [UUID(s) for s in setup["sagas"]]
    offset = timedelta(seconds=float(setup.get("clock_offset", 0)))
    with (
        open_ledger(setup["url"], clock=lambda: datetime.now(UTC) + offset) as ledger,
        run_projections(ledger, projections=[SAGA_LIST], poll_interval=0.01) as runner,
    ):
        # The processor finds its work in the sagas read model: until its first version
        # serves, the processor waits, retrying, and its health says so (not ok). On a busy
        # machine that first build takes a while; it is not a failure of this process.
        runner.views.rows(SAGA_LIST, "sagas", limit=1, timeout=120)
        gateway = HttpPaymentGateway(setup["gateway"], timeout=2.0)
        processor = SagaProcessor(
            ledger,
            runner.views,
            {"payments": gateway},
            workers=4,
            poll=0.01,
            backoff=Backoff(initial=0.01, ceiling=0.1),
        )
        processor.start()
        try:
            while not all(ledger.read(Saga, s).state in ENDED for s in sagas):
                if not processor.health().ok:
                    print(json.dumps({"failed": processor.health().error}), flush=True)
                    sys.exit(1)
                time.sleep(0.02)
        finally:
            processor.stop()
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
