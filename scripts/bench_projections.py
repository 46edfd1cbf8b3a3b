"""Projection benchmarks on PostgreSQL: rebuild rates against their anchors, the reconciler's
memory, and convergence latency. Everything in one run, on one log, one server:

1. Writes a log of ``--events`` events (deposits and transfers from the domain's aggregates,
   COPied in large chunks), unless the database already holds that many.
2. Like with like: daybook's bulk rebuild of one projection, account_balances (what
   ``daybook projections rebuild account_balances`` does), against eventsourcing's
   ``ProjectionRunner`` building the same table with the same handlers (one transaction per
   event, its tracking records) over the first ``--anchor-events`` events (at its rate a
   million would take many minutes); the anchor's table is checked against daybook's
   definition replayed to the same position.
3. A yardstick for the physical limit: PostgreSQL computing every account's balance from the
   events table in one SQL statement (the server decoding the JSON).
4. daybook's bulk rebuild of every projection in one pass, in this process; then the
   command an operator runs, ``daybook projections rebuild --all --jobs 2`` (the
   projections spread over two processes, each one pass over the log), timed from its start
   to its exit (the target: 100,000 log events/s on a 2-core machine that also runs
   PostgreSQL).
5. The reconciler on account_statement (the table that grows with the log): seconds and
   peak traced Python memory (tracemalloc).
6. Convergence latency: commands at a steady rate with the in-process runner following;
   the time from a command's commit to its position being visible in account_balances.

    python scripts/bench_projections.py                      # a private server, 1M events
    python scripts/bench_projections.py --url postgresql://... --events 1000000
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection as ESProjection
from eventsourcing.projection import ProjectionRunner as ESProjectionRunner
from eventsourcing.utils import get_topic
from psycopg.sql import SQL

from daybook import Ledger, projections, run_projections
from daybook.domain.accounts import Account, transfer
from daybook.infrastructure.bootstrap import event_log_of, open_ledger
from daybook.infrastructure.collector import collector_paused
from daybook.infrastructure.ledger.application import LedgerService
from daybook.infrastructure.readmodels.bulk import BulkRunner
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.urls import event_store_env
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES
from daybook.projections.model import LogEvent, Projection
from scripts import services


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
    recorder = cast(Any, ledger.service.recorder)  # PostgreSQL's recorder
    table, channel = recorder.events_table_name, recorder.channel_name
    first = written = ledger.head()
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {BENCH_MARK} (written_at timestamptz)")

    def insert(batch: list[Any]) -> None:
        with conn.transaction(), conn.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            cursor.execute(f"NOTIFY {channel}")
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


ANCHOR_TABLE = "anchor_account_balances"


class AnchorRows:
    """daybook's ``Rows`` over one eventsourcing transaction: every get and put is a statement
    on the anchor's copy of the account_balances table."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self.names = BALANCES.column_names

    def get(self, table: str, key: tuple[Any, ...]) -> dict[str, Any] | None:
        self.cursor.execute(
            f"SELECT {', '.join(self.names)} FROM {ANCHOR_TABLE} WHERE account_id = %s", key
        )
        row = self.cursor.fetchone()
        return None if row is None else dict(zip(self.names, row.values(), strict=True))

    def put(self, table: str, row: dict[str, Any]) -> None:
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in self.names if n != "account_id")
        self.cursor.execute(
            f"INSERT INTO {ANCHOR_TABLE} ({', '.join(self.names)}) VALUES"
            f" ({', '.join('%s' for _ in self.names)}) ON CONFLICT (account_id) DO UPDATE SET"
            f" {updates}",
            [row[n] for n in self.names],
        )

    def delete(self, table: str, key: tuple[Any, ...]) -> None:
        self.cursor.execute(f"DELETE FROM {ANCHOR_TABLE} WHERE account_id = %s", key)


class AnchorView(PostgresTrackingRecorder):
    """The account_balances table kept by eventsourcing's tracking recorder, one transaction
    per event, with daybook's own handlers: the same table, the same rules."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        columns = ", ".join(
            f"{c.name} {'BIGINT' if c.type == 'bigint' else 'TEXT'}" for c in BALANCES.columns
        )
        self.sql_create_statements.append(
            SQL(
                f"CREATE TABLE IF NOT EXISTS {ANCHOR_TABLE} ({columns}, PRIMARY KEY (account_id))"
            ).format()
        )

    def apply(self, event: LogEvent, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as cursor:
            ACCOUNT_BALANCES.apply(event, AnchorRows(cursor))
            self._insert_tracking(cursor, tracking)


class AnchorProjection(ESProjection[AnchorView]):
    name = "anchor"

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        state = domain_event.model_dump(mode="json")
        event = LogEvent.from_state(tracking.notification_id, get_topic(type(domain_event)), state)
        self.view.apply(event._replace(originator_id=str(domain_event.originator_id)), tracking)


def anchor_rate(url: str, events: int) -> tuple[float, int]:
    """Events/s of eventsourcing's ``ProjectionRunner`` building account_balances over the
    first ``events`` events, and how many it did."""
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
        table = f"{runner.view.datastore.schema}.{runner.view.tracking_table_name}"
        runner.stop()
    # It may have gone on a little after the count above: the table reflects its last
    # tracking record, read once everything has stopped.
    with psycopg.connect(url) as conn:
        found = conn.execute(f"SELECT max(notification_id) FROM {table}").fetchone()
    return done / elapsed, int(found[0]) if found and found[0] else done


def anchor_matches(url: str, ledger: Ledger, upto: int) -> bool:
    """The anchor's table equals daybook's definition replayed up to ``upto``."""
    log = event_log_of(ledger)
    events: list[LogEvent] = []
    after = 0
    while after < upto:
        batch = log.read(after, 10_000)
        if not batch:
            break
        events.extend(e for e in batch if e.position <= upto)
        after = batch[-1].position
    expected = projections.replay(ACCOUNT_BALANCES, events).tables[BALANCES.name]
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT {', '.join(BALANCES.column_names)} FROM {ANCHOR_TABLE}")
        stored = {row[0]: dict(zip(BALANCES.column_names, row, strict=True)) for row in rows}
    return stored == {key[0]: row for key, row in expected.items()}


def yardstick(url: str) -> float:
    """Events/s of PostgreSQL computing every account's balance from the events table in one
    statement (JSON decoded by the server): the physical limit of reading the log here."""
    signs = {
        get_topic(Account.Deposited): 1, get_topic(Account.Withdrawn): -1,
        get_topic(Account.TransferredIn): 1, get_topic(Account.TransferredOut): -1,
    }  # fmt: skip
    cases = " ".join(f"WHEN '{topic}' THEN {sign}" for topic, sign in signs.items())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS yardstick_balances")
        started = time.perf_counter()
        conn.execute(
            "CREATE TABLE yardstick_balances AS SELECT originator_id,"
            f" sum(CASE topic {cases} ELSE 0 END"
            " * COALESCE((convert_from(state, 'UTF8')::jsonb ->> 'amount')::bigint, 0)) AS balance"
            " FROM daybook_events GROUP BY originator_id"
        )
        seconds = time.perf_counter() - started
        found = conn.execute("SELECT max(notification_id) FROM daybook_events").fetchone()
        count = found[0] if found else 0
        conn.execute("DROP TABLE yardstick_balances")
    return int(count or 0) / seconds


def rebuild_rate(url: str, ledger: Ledger, defs: Sequence[Projection], batch_size: int) -> float:
    """Log events/s of one bulk pass building ``defs`` from scratch."""
    reset(url)
    runner = BulkRunner(event_log_of(ledger), url, defs, batch_size=batch_size)
    started = time.perf_counter()
    with collector_paused():  # as `daybook projections rebuild` runs
        runner.run_until_caught_up()
    seconds = time.perf_counter() - started
    runner.stop()
    return ledger.head() / seconds


def rebuild_command_rate(url: str, ledger: Ledger, jobs: int, batch_size: int) -> float:
    """Log events/s of ``daybook projections rebuild --all --jobs JOBS`` building every
    projection from scratch: the command as an operator runs it, from its start (the
    processes it starts, the weights it counts) to its exit."""
    reset(url)
    command = [
        sys.executable, "-m", "daybook.infrastructure.cli", "projections", "rebuild", "--all",
        "--jobs", str(jobs), "--batch-size", str(batch_size), "--no-progress", "--url", url,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the rebuild command failed ({done.returncode}): {done.stderr}")
    return ledger.head() / seconds


#: The table ``write_log`` leaves in a benchmark's database: ``reset`` drops every read
#: model of the database it is given, and refuses one without it (a service's, given by a
#: wrong URL).
BENCH_MARK = "daybook_bench_log"


class NotABenchDatabase(Exception):
    """``reset`` was given a database whose log the benchmark did not write."""


def written_by_the_benchmark(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (BENCH_MARK,)).fetchone()
    return row is not None and row[0] is not None


def reset(url: str) -> None:
    """Forget every projection version (tables dropped): the next build starts from zero."""
    if not written_by_the_benchmark(url):
        raise NotABenchDatabase(
            f"{url.rsplit('@', 1)[-1]} holds a log that bench_projections.py did not write: "
            "a run drops every read model of the database it is given, so it takes only a "
            "benchmark's (run bench_projections.py --url URL on an empty database first)"
        )
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        for record in catalog.versions():
            catalog.drop_tables(record.name, record.version)
        store.execute("DELETE FROM daybook_read_models")
        store.execute("DELETE FROM daybook_projection_versions")
    finally:
        store.close()


def reconcile_peak(url: str, ledger: Ledger) -> tuple[float, int]:
    """Seconds and peak traced memory (bytes) of reconciling account_statement, the table that
    grows with the log (one row per money event)."""
    tracemalloc.start()
    try:
        report = reconcile(event_log_of(ledger), url, projections.ACCOUNT_STATEMENT)
        assert report.clean, [d.describe() for d in report.drifts[:5]]
        return report.seconds, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def convergence(url: str, commands: int, rate: float) -> tuple[float, float]:
    """p50 and p99 seconds from commit to visible in account_balances."""
    ledger = open_ledger(url)
    account = services.opened(ledger.open_account("latency", "EUR"))
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
        handle = services.start_postgres(durable=True, own=True)
        url = services.create_database(handle.url, "bench_projections")
    try:
        ledger = open_ledger(url)
        if ledger.head() and not written_by_the_benchmark(url):
            ledger.close()
            parser.exit(
                2,
                f"{parser.prog}: {url.rsplit('@', 1)[-1]} holds a log this benchmark did not "
                "write: it would add its events to that log and drop every read model there; "
                "give it an empty database\n",
            )
        if ledger.head() < args.events:
            rate = write_log(url, ledger, args.events, args.accounts)
            print(f"log written at {rate:,.0f} events/s (setup)", flush=True)
        head = ledger.head()

        one = rebuild_rate(url, ledger, [ACCOUNT_BALANCES], args.batch_size)
        print(f"daybook rebuild of account_balances: {one:,.0f} log events/s", flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            # The anchor starts from zero on a reused database too (its tracking table is
            # named after the projection): else it resumes and reports events it never did.
            conn.execute(f"DROP TABLE IF EXISTS {ANCHOR_TABLE}, {AnchorProjection.name}_tracking")
        anchor, anchored = anchor_rate(url, min(args.anchor_events, head))
        same = anchor_matches(url, ledger, anchored)
        print(f"eventsourcing ProjectionRunner, account_balances: {anchor:,.0f} events/s"
              f" (table equals daybook's: {same})", flush=True)  # fmt: skip
        yard = yardstick(url)
        print(f"PostgreSQL, balances in one statement: {yard:,.0f} events/s", flush=True)
        four = rebuild_rate(url, ledger, projections.ALL, args.batch_size)
        print(f"daybook rebuild, every projection: {four:,.0f} log events/s", flush=True)
        two = rebuild_command_rate(url, ledger, 2, args.batch_size)
        print(f"daybook projections rebuild --all --jobs 2: {two:,.0f} log events/s", flush=True)
        seconds, peak = reconcile_peak(url, ledger)
        print(f"reconcile account_statement: {seconds:.1f}s, peak {peak / 2**20:.1f} MiB traced",
              flush=True)  # fmt: skip
        ledger.close()
        p50, p99 = convergence(url, args.latency_commands, args.latency_rate)
    finally:
        if handle is not None:
            handle.stop()
    print()
    print(f"log: {head:,} events on PostgreSQL (durable), same run, same log")
    rows = [
        ("daybook rebuild, account_balances (bulk)", f"{one:,.0f} events/s"),
        ("eventsourcing ProjectionRunner, account_balances", f"{anchor:,.0f} events/s"
         f" (first {anchored:,} events)"),
        ("  ratio daybook / eventsourcing, same table", f"{one / anchor:.1f}x"),
        ("PostgreSQL yardstick, balances in one statement", f"{yard:,.0f} events/s"),
        ("  daybook / yardstick", f"{one / yard:.2f}"),
        ("daybook rebuild, every projection, one process", f"{four:,.0f} log events/s"),
        ("  the command, --all --jobs 2 (target 100,000)", f"{two:,.0f} log events/s"),
        ("reconcile account_statement, peak traced memory", f"{peak / 2**20:.1f} MiB"
         f" ({seconds:.1f}s)"),
        (f"commit -> visible at {args.latency_rate:.0f} commands/s",
         f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"),
    ]  # fmt: skip
    for what, figure in rows:
        print(f"{what:52} {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
