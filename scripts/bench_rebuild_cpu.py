"""Where a bulk rebuild's CPU goes: the rebuilding process and the PostgreSQL server, per log
event. On a machine whose cores the two share, the rate can never exceed the cores divided by
their sum; this script measures both, on a log that is already there. Each run first drops
every read model in that database (tables and catalog), then rebuilds them all: give it a
benchmark's database, never one a service uses.

    python scripts/bench_rebuild_cpu.py --url postgresql://... [--runs 3]

The log is the one ``bench_projections.py`` writes (give it the same ``--url``). The server must
run on this machine: its CPU is read from ``/proc`` (the postmaster and its processes).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from daybook import projections
from daybook.infrastructure.bootstrap import event_log_of, open_ledger
from daybook.infrastructure.collector import collector_paused
from daybook.infrastructure.readmodels.bulk import BulkRunner
from scripts.bench_projections import NotABenchDatabase, reset


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def server_cpu(postmaster: int) -> float:
    """CPU seconds of the server so far: the postmaster, its live processes, and the ones it
    has reaped (the postmaster's children's times)."""
    fields = _stat(postmaster)
    ticks = sum(int(x) for x in fields[11:15])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            child = _stat(int(entry))
        except OSError:
            continue
        if int(child[1]) == postmaster:
            ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_of(url: str) -> int:
    """The server's postmaster: the parent of this connection's backend, read while the
    connection (and so the backend) still lives."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(_stat(int(row[0]))[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="PostgreSQL URL holding the log")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100_000)
    args = parser.parse_args()
    postmaster = postmaster_of(args.url)
    ledger = open_ledger(args.url)
    head = ledger.head()
    if head == 0:
        ledger.close()
        parser.exit(2, f"{parser.prog}: no log at {args.url}: run bench_projections.py --url "
                       "with it first\n")  # fmt: skip
    print(f"log: {head:,} events; bulk rebuild of every projection ({len(projections.ALL)})")
    for _ in range(args.runs):
        try:
            reset(args.url)
        except NotABenchDatabase as refused:
            ledger.close()
            parser.exit(2, f"{parser.prog}: {refused}\n")
        runner = BulkRunner(
            event_log_of(ledger), args.url, projections.ALL, batch_size=args.batch_size
        )
        server = server_cpu(postmaster)
        own = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        with collector_paused():
            runner.run_until_caught_up()
        seconds = time.perf_counter() - started
        done = resource.getrusage(resource.RUSAGE_SELF)
        server = server_cpu(postmaster) - server
        runner.stop()
        process = done.ru_utime - own.ru_utime + done.ru_stime - own.ru_stime
        total = (process + server) / head
        print(
            f"{head / seconds:9,.0f} log events/s; CPU per event: process"
            f" {process / head * 1e6:.1f} us, PostgreSQL {server / head * 1e6:.1f} us;"
            f" at most {os.cpu_count() or 1:d} cores / {total * 1e6:.1f} us ="
            f" {(os.cpu_count() or 1) / total:,.0f} events/s on an idle machine",
            flush=True,
        )
    ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
