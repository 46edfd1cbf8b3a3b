"""A writer process for the multi-process and crash tests.

    python -m tests.integration.writer SETUP_JSON

SETUP_JSON: {"url", "seed", "count", "threads", "accounts", "skus", "crash_before_commit"}.
Each thread sends random transfers and reservations (some deliberately over the limit) with
request ids ``{seed}-{thread}-{n}`` and prints one JSON line per outcome, flushed, *after* the
ledger returned it: a printed receipt is one the caller really received.

``crash_before_commit: N`` makes the process SIGKILL itself inside the N-th commit, after the
events and request records were sent to PostgreSQL and before COMMIT: the crash window.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
from typing import Any
from uuid import UUID

from domain.errors import DomainError
from infrastructure import open_ledger
from infrastructure.eventstore.postgres import PostgresRecorder

_print_lock = threading.Lock()


def emit(line: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def arm_crash(after_commits: int) -> None:
    """Kill this process inside the N-th commit: the batch's append has run on the server,
    inside the transaction, and COMMIT has not been sent."""
    original_append = PostgresRecorder._append_batch
    calls = 0

    def append_then_die(self: PostgresRecorder, curs: Any, stored: Any, requests: Any) -> None:
        nonlocal calls
        original_append(self, curs, stored, requests)  # events and records are on the server...
        calls += 1
        if calls >= after_commits:
            emit({"crashing": [p.record.request_id for p in requests]})
            os.kill(os.getpid(), signal.SIGKILL)  # ...and COMMIT never will be

    PostgresRecorder._append_batch = append_then_die  # type: ignore[method-assign]


def main() -> None:
    setup = json.loads(sys.argv[1])
    if setup.get("crash_before_commit"):
        arm_crash(setup["crash_before_commit"])
    ledger = open_ledger(setup["url"])
    accounts = [UUID(a) for a in setup["accounts"]]
    skus: list[str] = setup["skus"]

    def client(thread: int) -> None:
        rnd = random.Random(f"{setup['seed']}-{thread}")
        for n in range(setup["count"]):
            request_id = f"{setup['seed']}-{thread}-{n}"
            try:
                if rnd.random() < 0.6:
                    source, destination = rnd.sample(accounts, 2)
                    receipt = ledger.transfer(
                        source, destination, rnd.randint(1, 400), request_id=request_id
                    )
                else:
                    receipt = ledger.reserve_stock(
                        rnd.choice(skus), rnd.randint(1, 5), request_id=request_id
                    )
                emit(
                    {
                        "request_id": request_id,
                        "command": receipt.command,
                        "position": receipt.position,
                        "replayed": receipt.replayed,
                    }
                )
            except DomainError as error:
                emit({"request_id": request_id, "refused": error.code})

    threads = [threading.Thread(target=client, args=(t,)) for t in range(setup["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger.close()
    emit({"done": True})


if __name__ == "__main__":
    main()
