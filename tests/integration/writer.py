"""A writer process for the multi-process and crash tests.

    python -m tests.integration.writer SETUP_JSON

SETUP_JSON: {"url", "seed", "count", "threads", "accounts", "skus", "crash_before_commit"}.
Each thread sends random transfers and reservations (some deliberately over the limit) with
request ids ``{seed}-{thread}-{n}`` and prints one JSON line per outcome, flushed, *after* the
ledger returned it: a printed receipt is one the caller really received.

``crash_before_commit: N`` makes the process SIGKILL itself inside the first group commit
(more than one request) from the N-th commit on, just before its statement is sent.
``announce_commits: true`` prints each batch's commands before it is sent (the test then
kills the process while the statement waits on the server).
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

from daybook import open_ledger
from daybook.domain.errors import DomainError
from daybook.infrastructure.eventstore.postgres import PostgresRecorder
from daybook.infrastructure.ledger.application import LedgerService, PreparedBatch

_print_lock = threading.Lock()


def emit(line: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(line, default=str) + "\n")
        sys.stdout.flush()


def arm_crash(after_commits: int) -> None:
    """Kill this process inside a group commit, at the last moment it controls: the batch
    is applied and handed to the committing thread, its statement built, nothing sent.

    The first group commit from the N-th commit on, not the N-th itself: whether a given
    commit carries one request or several is up to the scheduler, and the test is about a
    commit that carries several."""
    original_append = PostgresRecorder._append_batch
    calls = 0

    def die_before_sending(
        self: PostgresRecorder, curs: Any, stored: Any, requests: Any, *more: Any
    ) -> None:
        nonlocal calls
        calls += 1
        if calls >= after_commits and len(requests) > 1:
            emit({"crashing": [p.record.request_id for p in requests]})
            os.kill(os.getpid(), signal.SIGKILL)
        original_append(self, curs, stored, requests, *more)

    PostgresRecorder._append_batch = die_before_sending  # type: ignore[method-assign]


def announce_commits() -> None:
    """Print each batch's commands (request id, command, payload) before it is sent, so a
    test can retry exactly the requests of a commit whose answer it never saw."""
    original_commit = LedgerService.commit

    def announcing_commit(self: LedgerService, prepared: PreparedBatch, **options: Any) -> Any:
        sending = [
            {"request_id": c.request_id, "command": c.name, "payload": c.payload()}
            for c in prepared.commands
        ]
        emit({"sending": sending})
        return original_commit(self, prepared, **options)

    LedgerService.commit = announcing_commit  # type: ignore[method-assign]


def main() -> None:
    setup = json.loads(sys.argv[1])
    if setup.get("crash_before_commit"):
        arm_crash(setup["crash_before_commit"])
    if setup.get("announce_commits"):
        announce_commits()
    ledger = open_ledger(setup["url"])
    accounts = [UUID(a) for a in setup["accounts"]]
    skus: list[str] = setup["skus"]

    def client(thread: int) -> None:
        rnd = random.Random(f"{setup['seed']}-{thread}")
        for n in range(setup["count"]):
            request_id = f"{setup['seed']}-{thread}-{n}"
            try:
                if n == 0:
                    # Over the limit whatever the others did: more than all money there is.
                    source, destination = rnd.sample(accounts, 2)
                    receipt = ledger.transfer(source, destination, 2**62, request_id=request_id)
                elif rnd.random() < 0.6:
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
