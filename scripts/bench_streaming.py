"""Streaming benchmark: the outbox relay and the faust workers beside the in-process runner.

    python scripts/bench_streaming.py [--events 50000] [--latency-commands 500]

Starts its own durable PostgreSQL and Tansu broker, writes a log of deposits and transfers,
then measures, in one run:

1. relay: events/s read from the log, published and acknowledged (``acks=all``);
2. faust workers: events/s applied to the read models by one worker, then by two and by
   four (a new consumer group each, timed once every worker of the group holds partitions
   and the group has committed a batch, so joining is left out), with the time they spent
   waiting for locks (sessions of their read-model database waiting on a lock, sampled
   every 5 ms); and the in-process runner
   rebuilding the same log into a database of its own.
   For scale, the workers' ``StreamApplier`` is also fed by a plain aiokafka group consumer
   in 5,000-message fetches (no faust): what batch delivery below faust's stream would give;
3. convergence latency p50/p99 from command commit to read-model row, under a steady load of
   deposits: for the workers, until the progress row of the event's partition (committed in
   the same transaction as the rows) reaches the event's position; for the in-process
   runner, until its ``account_balances`` position does. Polled every 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import psycopg
from aiokafka import AIOKafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daybook import Ledger, open_ledger, run_projections
from daybook.infrastructure.bootstrap import event_log_of, open_event_log
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.progress import PROGRESS_TABLE, read_status
from daybook.infrastructure.streaming.relay import Relay, RelayConfig
from daybook.infrastructure.streaming.worker import Message, StreamApplier
from daybook.infrastructure.urls import postgres_params
from daybook.projections import ALL
from scripts import services
from scripts.streams import Daybook, open_accounts, wait_until, write_money

PARTITIONS = 4
TOPIC = "bench"


def applied(url: str, group: str, topic: str) -> int:
    """Events the group's workers applied, over all partitions."""
    return sum(p.applied for p in read_status(url, group, topic))


def relay_rate(url: str, bootstrap: str, head: int) -> float:
    """Events/s for the whole log: read, published, acknowledged, cursor stored."""
    log = open_event_log(url)
    relay = Relay(RelayConfig(url, f"kafka://{bootstrap}", TOPIC, PARTITIONS, batch_size=5000), log)

    async def main() -> float:
        task = asyncio.create_task(relay.run())
        start = time.perf_counter()
        while relay.stats.published < head:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        relay.stop()
        await task
        return elapsed

    try:
        return head / asyncio.run(main())
    finally:
        log.close()


def workers(url: str, bootstrap: str, group: str, count: int, base: Path) -> list[Daybook]:
    return [
        Daybook(
            ["worker", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", TOPIC,
             "--partitions", str(PARTITIONS), "--group", group, "--batch-size", "5000", "-v"],
            base / f"{group}-{n}.log",
        ).start()
        for n in range(count)
    ]  # fmt: skip


def assigned(procs: list[Daybook]) -> bool:
    """Whether every worker holds partitions (faust prints its assignment, naming the topic,
    each time it gets one): the group has stopped rebalancing as workers join."""
    return all(f"| {TOPIC} " in proc.output for proc in procs)


class LockWaits:
    """Samples, every ``interval`` seconds, how many sessions of a database wait for a lock
    (``pg_stat_activity``): the time workers spent waiting on each other, seen from outside
    (only the workers write to their read-model database)."""

    def __init__(self, url: str, interval: float = 0.005) -> None:
        self.url = url
        self.interval = interval
        self.samples = 0
        self.waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LockWaits:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        """Session-seconds spent waiting for locks (sampled)."""
        return self.waiting * self.interval

    def _sample(self) -> None:
        with psycopg.connect(postgres_params(self.url).conninfo(), autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
                self.samples += 1
                self.waiting += int(row[0]) if row else 0
                time.sleep(self.interval)


def worker_rate(
    admin_url: str, bootstrap: str, head: int, count: int, base: Path
) -> tuple[float, float, str, str]:
    """Events/s applied by ``count`` workers of a new group, and the seconds they spent
    waiting for locks; the group and the database its read models went to (a new one:
    workers read events from the topic only)."""
    group = f"bench-x{count}"
    url = services.create_database(admin_url, f"bench_x{count}")
    procs = workers(url, bootstrap, group, count, base)
    try:
        # Timed once every worker holds partitions: joining is not applying.
        wait_until(lambda: assigned(procs), "every worker to hold partitions", 120)
        wait_until(lambda: applied(url, group, TOPIC) > 0, "the first batch", 120)
        with LockWaits(url) as waits:
            start, first = time.perf_counter(), applied(url, group, TOPIC)
            wait_until(lambda: applied(url, group, TOPIC) >= head, "all events", 900)
            rate = (head - first) / (time.perf_counter() - start)
        return rate, waits.seconds, group, url
    finally:
        for proc in procs:
            proc.stop()


def batch_rate(admin_url: str, bootstrap: str, head: int) -> float:
    """Events/s when ``StreamApplier`` gets whole fetches from a plain aiokafka consumer."""
    url = services.create_database(admin_url, "bench_batches")
    applier = StreamApplier(url, ALL, group="bench-batches", topic=TOPIC, partitions=PARTITIONS,
                            writer="bench")  # fmt: skip

    async def main() -> float:
        consumer = AIOKafkaConsumer(
            TOPIC,
            bootstrap_servers=bootstrap,
            group_id="bench-batches",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=5000,
            fetch_max_wait_ms=50,
        )
        await consumer.start()
        try:
            done = first = 0
            start = 0.0
            while done < head:
                fetched = await consumer.getmany(timeout_ms=200, max_records=5000)
                messages = [
                    Message(tp.partition, m.offset, m.value)
                    for tp, ms in fetched.items()
                    for m in ms
                ]
                if not messages:
                    continue
                if not done:
                    start, first = time.perf_counter(), len(messages)
                await asyncio.to_thread(applier.apply, messages)
                await consumer.commit()
                done += len(messages)
            return (done - first) / (time.perf_counter() - start)
        finally:
            await consumer.stop()

    try:
        return asyncio.run(main())
    finally:
        applier.close()


def convergence(
    ledger: Ledger,
    accounts: list[UUID],
    visible: Callable[[], Callable[[int], int]],
    commands: int,
    rate: float,
) -> list[float]:
    """Seconds from each deposit's commit until ``visible()(partition)`` reaches its position.

    Deposits go out at ``rate`` per second whatever the lag (an open loop), round robin
    over ``accounts`` so that every partition gets some."""
    pending: list[tuple[int, int, float]] = []
    latencies: list[float] = []
    lock = threading.Lock()
    writing = threading.Event()
    writing.set()

    def watch() -> None:
        while writing.is_set() or pending:
            position_of = visible()
            now = time.perf_counter()
            with lock:
                still = [p for p in pending if position_of(p[1]) < p[0]]
                latencies.extend(now - p[2] for p in pending if position_of(p[1]) >= p[0])
                pending[:] = still
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    for n in range(commands):
        time.sleep(max(0.0, start + n / rate - time.perf_counter()))
        account = accounts[n % len(accounts)]
        receipt = ledger.deposit(account, 1)  # type: ignore[attr-defined]
        committed = time.perf_counter()
        partition = envelope.partition_for(envelope.partition_key(account), PARTITIONS)
        with lock:
            pending.append((receipt.position, partition, committed))
    writing.clear()
    watcher.join(120)
    if watcher.is_alive():
        raise RuntimeError(f"{len(pending)} deposits never became visible")
    return latencies


def stream_visible(url: str, group: str) -> Callable[[], Callable[[int], int]]:
    conn = psycopg.connect(postgres_params(url).conninfo(), autocommit=True)

    def positions() -> Callable[[int], int]:
        rows = conn.execute(
            f"SELECT partition, position FROM {PROGRESS_TABLE} WHERE group_id = %s AND topic = %s",
            (group, TOPIC),
        ).fetchall()
        found = dict(rows)
        return lambda partition: int(found.get(partition, 0))

    return positions


def runner_visible(url: str) -> Callable[[], Callable[[int], int]]:
    catalog = VersionCatalog(open_store(url))

    def positions() -> Callable[[int], int]:
        active = catalog.active_version("account_balances") or 1
        record = catalog.version("account_balances", active)
        position = record.position if record is not None else 0
        return lambda _partition: position

    return positions


def percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000
    return f"p50 {p50:6.1f} ms, p99 {p99:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--latency-commands", type=int, default=500)
    parser.add_argument("--latency-rate", type=float, default=100.0, help="deposits per second")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="daybook-bench-stream-"))
    pg = services.start_postgres(durable=True)
    kafka = services.start_kafka(base / "kafka")
    rows: list[tuple[str, str, str]] = []
    try:
        url = services.create_database(pg.url, "bench_stream")
        ledger = open_ledger(url)
        accounts = open_accounts(ledger, 1000)
        write_money(ledger, accounts, args.events)
        head = ledger.head()
        print(f"log: {head:,} events ({base})", flush=True)

        relay = relay_rate(url, kafka.bootstrap, head)
        print(f"relay {relay:,.0f} events/s", flush=True)
        one, one_waited, group, worker_url = worker_rate(pg.url, kafka.bootstrap, head, 1, base)
        print(f"1 worker {one:,.0f} events/s", flush=True)
        scaled = {}
        for count in (2, 4):
            rate, waited, _, _ = worker_rate(pg.url, kafka.bootstrap, head, count, base)
            scaled[count] = (rate, waited)
            print(f"{count} workers {rate:,.0f} events/s, {waited:.2f}s waiting", flush=True)
        batches = batch_rate(pg.url, kafka.bootstrap, head)
        print(f"applier fed whole fetches {batches:,.0f} events/s", flush=True)
        other = services.create_database(pg.url, "bench_runner")
        runner = ProjectionRunner(event_log_of(ledger), other, ALL, batch_size=5000)
        start = time.perf_counter()
        runner.run_until_caught_up()
        runner_rate = head / (time.perf_counter() - start)
        runner.stop()
        print(f"in-process runner {runner_rate:,.0f} events/s", flush=True)

        # Latency: the first group's worker resumes where it stopped, the relay follows the
        # log (LISTEN/NOTIFY), deposits go to 40 accounts (all partitions).
        live = [
            Daybook(
                ["relay", "--url", url, "--broker", f"kafka://{kafka.bootstrap}", "--topic",
                 TOPIC, "--partitions", str(PARTITIONS), "--poll-interval", "0.2"],
                base / "relay-live.log",
            ).start(),
            *workers(worker_url, kafka.bootstrap, group, 1, base),
        ]  # fmt: skip
        try:
            probe = ledger.deposit(accounts[0], 1)  # type: ignore[attr-defined]
            partition = envelope.partition_for(envelope.partition_key(accounts[0]), PARTITIONS)
            positions = stream_visible(worker_url, group)
            wait_until(lambda: positions()(partition) >= probe.position, "the live worker", 120)
            stream_latency = convergence(
                ledger, accounts[:40], positions, args.latency_commands, args.latency_rate
            )
        finally:
            for proc in live:
                proc.stop()
        with run_projections(ledger, other, poll_interval=0.2):
            runner_latency = convergence(
                ledger,
                accounts[:40],
                runner_visible(other),
                args.latency_commands,
                args.latency_rate,
            )
        ledger.close()
        rate = f"{args.latency_rate:.0f} deposits/s"
        rows = [
            ("relay: published + acknowledged", f"{relay:9,.0f} events/s", ""),
            ("1 worker: applied", f"{one:9,.0f} events/s", f"{runner_rate:9,.0f} events/s"),
            *(
                (f"{n} workers: applied (together)", f"{r:9,.0f} events/s ({r / one:.2f}x)", "")
                for n, (r, _) in scaled.items()
            ),
            (
                "workers waiting for locks (sampled)",
                ", ".join(
                    f"{n}: {w:.2f}s"
                    for n, w in ((1, one_waited), *((n, w) for n, (_, w) in scaled.items()))
                ),
                "",
            ),
            ("(applier fed whole fetches, no faust)", f"{batches:9,.0f} events/s", ""),
            (f"commit -> row, {rate}", percentiles(stream_latency), percentiles(runner_latency)),
        ]
    finally:
        kafka.stop()
        pg.stop()
    print()
    print(f"{'':38} {'relay + faust workers':26} {'in-process runner':26}")
    for what, stream, inprocess in rows:
        print(f"{what:38} {stream:26} {inprocess:26}")
    print(f"\n{head:,} events, {PARTITIONS} partitions, worker batches of up to 5,000 events")


if __name__ == "__main__":
    main()
