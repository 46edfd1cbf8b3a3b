"""An expiry sweeper process for the crash tests.

    python -m tests.integration.expiry_worker SETUP_JSON

SETUP_JSON: {"url", "holds": [hold ids], "sku", "reservations": [reservation ids],
"clock_offset": seconds}. The ledger and the sweeper run ``clock_offset`` seconds ahead of
the system clock (so the holds and reservations have expired). Runs the sweeper (with its own
runner of the ``open_holds`` read model) until every listed expiry is recorded, then prints
``{"done": true}``. With ``DAYBOOK_FAULTS`` set (see
daybook.infrastructure.streaming.faults) the process SIGKILLs itself at the named point.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

from daybook import Ledger, open_ledger, run_projections
from daybook.domain.inventory import Inventory
from daybook.infrastructure.expiry import ExpirySweeper
from daybook.infrastructure.lifecycle import ServiceState
from daybook.projections import OPEN_HOLDS_PROJECTION


def all_recorded(ledger: Ledger, holds: list[UUID], sku: str, reservations: list[str]) -> bool:
    if not all(ledger.hold_status(h).recorded for h in holds):
        return False
    # The aggregate's own reservations: its view leaves out those lapsed, recorded or not.
    return not set(reservations) & set(ledger.read(Inventory, sku).reservations)


def main() -> None:
    setup = json.loads(sys.argv[1])
    holds = [UUID(h) for h in setup["holds"]]
    offset = timedelta(seconds=float(setup["clock_offset"]))
    with (
        open_ledger(setup["url"], clock=lambda: datetime.now(UTC) + offset) as ledger,
        run_projections(ledger, projections=[OPEN_HOLDS_PROJECTION], poll_interval=0.01) as runner,
    ):
        sweeper = ExpirySweeper(ledger, runner.views, interval=0.01)
        sweeper.start()
        try:
            while not all_recorded(ledger, holds, setup["sku"], setup["reservations"]):
                # (Waiting while the read model's first version is built is no failure.)
                if sweeper.health().state is ServiceState.FAILED:
                    print(json.dumps({"failed": sweeper.health().error}), flush=True)
                    sys.exit(1)
                time.sleep(0.02)
        finally:
            sweeper.stop()
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
