"""Projection benchmarks on PostgreSQL: bulk rebuild rate and convergence latency.

1. Writes a log of ``--events`` events (deposits and transfers from the domain's aggregates,
   COPied in large chunks), unless the database already holds that many.
2. Rebuilds all four daybook projections from the log in one pass of the bulk runner
   (``BulkRunner``, what ``daybook projections rebuild`` uses); prints events/s.
3. Anchor, same run, same log: eventsourcing's ``ProjectionRunner`` keeping one balance table
   with one transaction per event, over the first ``--anchor-events`` events (at its rate a
   million events would take minutes); prints events/s and daybook's ratio to it.
4. Convergence latency: commands at a steady rate with the in-process runner following;
   the time from a command's commit to its position being visible in account_balances.

    python scripts/bench_projections.py                      # a private server, 1M events
    python scripts/bench_projections.py --url postgresql://... --events 1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection as ESProjection
from eventsourcing.projection import ProjectionRunner as ESProjectionRunner
from psycopg.sql import SQL

from daybook import Ledger, projections, run_projections
from daybook.domain.accounts import Account, transfer
from daybook.infrastructure.bootstrap import event_log_of, open_ledger
from daybook.infrastructure.eventstore.log import EVENTS_CHANNEL
from daybook.infrastructure.ledger.application import LedgerService
from daybook.infrastructure.readmodels.bulk import BulkRunner
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.cli import collector_paused
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.rebuild import ProgressBar
from daybook.infrastructure.urls import event_store_env


def write_log(url: str, ledger: Ledger, events: int, accounts: int, chunk: int = 50_000) -> float:
    """Append about ``events`` events; returns events/s of writing (not a daybook figure).

    The benchmark needs a big log quickly, not the command path (``bench_write`` measures
    that): the events come from the domain's own aggregates (every rule checked, every event
    a validated pydantic contract, mapped to stored events by the ledger's mapper) and are
    COPied into the events table ``chunk`` at a time, each chunk under the same table lock
    and NOTIFY as the recorder's inserts, so notification ids follow commit order. A
    background thread writes one chunk while the next is generated. No request records are
    written: projections never read them.
    """
    started = time.perf_counter()
    mapper = ledger.service.mapper
    table = ledger.service.recorder.events_table_name
    first = written = ledger.head()
    conn = psycopg.connect(url, autocommit=True)

    def insert(batch: list[Any]) -> None:
        with conn.transaction(), conn.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            cursor.execute(f"NOTIFY {EVENTS_CHANNEL}")
            with cursor.copy(
                f"COPY {table} (originator_id, originator_version, topic, state)"
                " FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["uuid", "int8", "text", "bytea"])
                for stored in batch:
                    copy.write_row(
                        (stored.originator_id, stored.originator_version, stored.topic,
                         stored.state)
                    )  # fmt: skip

    pending: list[Any] = []
    with ThreadPoolExecutor(1) as writer:
        inflight: Future[None] | None = None

        def flush() -> None:
            nonlocal written, inflight
            if not pending:
                return
            batch = [mapper.to_stored_event(e) for e in pending]
            if inflight is not None:
                inflight.result()
            inflight = writer.submit(insert, batch)
            written += len(pending)
            pending.clear()
            print(f"\rwriting the log: {written:,} events", end="", file=sys.stderr)

        ids = [uuid4() for _ in range(accounts)]
        books = {i: Account.open(i, f"o{n}", "EUR", 0) for n, i in enumerate(ids)}
        for account in books.values():
            pending.extend(account.collect_events())
        for account in books.values():
            account.deposit(1_000_000)
            pending.extend(account.collect_events())
        n = 0
        while written + len(pending) < events:
            n += 1
            a, b = books[ids[n % accounts]], books[ids[(n * 7 + 1) % accounts]]
            if n % 3 == 0 or a is b:
                a.deposit(n % 97 + 1)
                pending.extend(a.collect_events())
            else:
                transfer(a, b, n % 13 + 1, uuid4())
                pending.extend(a.collect_events())
                pending.extend(b.collect_events())
            if len(pending) >= chunk:
                flush()
        flush()
        if inflight is not None:
            inflight.result()
    conn.close()
    print(file=sys.stderr)
    return (written - first) / (time.perf_counter() - started)


class AnchorView(PostgresTrackingRecorder):
    """A balance table kept by eventsourcing's tracking recorder, one transaction per event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS anchor_balances"
                " (account_id text PRIMARY KEY, balance bigint NOT NULL)"
            )
        )

    def apply(self, account_id: UUID, delta: int, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(
                "INSERT INTO anchor_balances VALUES (%s, %s) ON CONFLICT (account_id)"
                " DO UPDATE SET balance = anchor_balances.balance + EXCLUDED.balance",
                (str(account_id), delta),
            )
            self._insert_tracking(cursor, tracking)


_SIGN = {Account.Deposited: 1, Account.Withdrawn: -1, Account.TransferredIn: 1,
         Account.TransferredOut: -1}  # fmt: skip


class AnchorProjection(ESProjection[AnchorView]):
    name = "anchor"

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        sign = _SIGN.get(type(domain_event), 0)
        amount = getattr(domain_event, "amount", 0)
        self.view.apply(domain_event.originator_id, sign * amount, tracking)


def anchor_rate(url: str, events: int) -> float:
    env = {**event_store_env(url), "ANCHOR_POSTGRES_POOL_SIZE": "2"}
    started = time.perf_counter()
    with ESProjectionRunner(
        application_class=LedgerService,
        projection_class=AnchorProjection,
        view_class=AnchorView,
        env=env,
    ) as runner:
        while True:
            done = runner.view.max_tracking_id(runner.app.name) or 0
            if done >= events:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        runner.stop()
    return done / elapsed


def convergence(url: str, commands: int, rate: float) -> tuple[float, float]:
    """p50 and p99 seconds from commit to visible in account_balances."""
    ledger = open_ledger(url)
    account = ledger.open_account("latency", "EUR").account_id
    latencies: list[float] = []
    with run_projections(ledger, url, poll_interval=0.2):
        store = open_store(url)
        catalog = VersionCatalog(store)
        for _ in range(commands):
            receipt = ledger.deposit(account, 1)
            committed = time.perf_counter()
            while True:
                record = catalog.version(
                    "account_balances", catalog.active_version("account_balances") or 1
                )
                if record is not None and record.position >= receipt.position:
                    break
            latencies.append(time.perf_counter() - committed)
            time.sleep(max(0.0, 1 / rate - latencies[-1]))
        store.close()
    ledger.close()
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: start a private server)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--anchor-events", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--latency-commands", type=int, default=500)
    parser.add_argument("--latency-rate", type=float, default=100.0)
    args = parser.parse_args()

    handle = None
    url = args.url
    if url is None:
        from scripts import services

        handle = services.start_postgres(durable=True)
        url = services.create_database(handle.url, "bench_projections")
    try:
        ledger = open_ledger(url)
        if ledger.head() < args.events:
            rate = write_log(url, ledger, args.events, args.accounts)
            print(f"log written at {rate:,.0f} events/s")
        head = ledger.head()
        store = open_store(url)
        catalog = VersionCatalog(store)
        catalog.ensure()
        for name, version in catalog.active_versions().items():
            store.execute("DELETE FROM daybook_read_models WHERE name = %s", (name,))
            catalog.drop_tables(name, version)
            store.execute("DELETE FROM daybook_projection_versions WHERE name = %s", (name,))
        store.close()

        # All four projections in one bulk pass over the log (what `daybook projections
        # rebuild` does per projection).
        bar = ProgressBar("rebuild all", 0)
        runner = BulkRunner(
            event_log_of(ledger), url, projections.ALL, batch_size=args.batch_size, on_progress=bar
        )
        started = time.perf_counter()
        with collector_paused():  # as `daybook projections rebuild` runs
            runner.run_until_caught_up()
        seconds = time.perf_counter() - started
        runner.stop()
        bar.close()
        daybook = head * len(projections.ALL) / seconds
        per_log = head / seconds
        ledger.close()

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS anchor_balances, notification_tracking")
        anchor = anchor_rate(url, min(args.anchor_events, head))
        p50, p99 = convergence(url, args.latency_commands, args.latency_rate)
        print(f"log: {head:,} events on PostgreSQL")
        print(
            f"daybook rebuild, all {len(projections.ALL)} projections: {seconds:.1f}s, "
            f"{per_log:,.0f} log events/s ({daybook:,.0f} event applications/s)"
        )
        print(f"eventsourcing ProjectionRunner, 1 table, 1 tx/event: {anchor:,.0f} events/s")
        print(f"ratio (daybook all projections / anchor one table): {per_log / anchor:.1f}x")
        print(
            f"convergence commit -> visible at {args.latency_rate:.0f} commands/s: "
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
        )
    finally:
        if handle is not None:
            handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
