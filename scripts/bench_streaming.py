"""Streaming benchmark: the outbox relay and the faust workers beside the in-process runner.

    python scripts/bench_streaming.py [--events 50000] [--latency-commands 500]
    python scripts/bench_streaming.py --workers-only --rounds 3 --events 60000

Starts its own durable PostgreSQL and Tansu broker, writes a log of deposits and transfers,
then measures, in one run:

1. relay: events/s read from the log, published and acknowledged (``acks=all``);
2. faust workers: events/s applied to the read models by one worker, then by two and by
   four (a new consumer group each), in the steady state: every worker of the group waits
   at its first batch (a pause point, ``infrastructure/streaming/faults.py``) until all of
   them hold partitions and have a batch in hand, so joining the group and rebalancing are
   left out; then all go at once and the clock runs until every event is applied. With the
   time they spent waiting for locks while applying batches (sessions of their read-model
   database waiting on a lock, sampled every 5 ms), and apart from it the time they waited
   on the version catalog, which happens once per version: registering it (the
   schema-change guard, taken on each worker's first batch, after the common start) and
   switching reads to it when the build reaches the head (its catalog row locked while the
   batches in flight finish); the partitions each worker had
   and the events per partition, and the CPU each process used meanwhile (each worker,
   PostgreSQL, the broker, and the whole machine, other work included, from ``/proc``).
   ``--rounds N`` repeats the groups N times on the same log (``--workers 1 2 4``, the
   default, the sizes of the groups). Then the
   in-process runner rebuilds the same log into a database of its own.
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
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from daybook.infrastructure.readmodels.store import DDL_LOCK
from daybook.infrastructure.streaming import envelope, faults
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


def workers(
    url: str, bootstrap: str, group: str, count: int, base: Path, gate: bool = False
) -> list[Daybook]:
    """``count`` workers of ``group``; with ``gate``, each stops before applying its first
    batch until ``open_gate`` (a pause point of ``infrastructure.streaming.faults``, in a
    directory per worker)."""
    procs = []
    for n in range(count):
        env = {}
        if gate:
            directory = base / f"{group}-{n}.gate"
            directory.mkdir()
            env = {"DAYBOOK_FAULTS": "worker.batch:1:pause", "DAYBOOK_FAULTS_DIR": str(directory)}
        procs.append(
            Daybook(
                ["worker", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", TOPIC,
                 "--partitions", str(PARTITIONS), "--group", group, "--batch-size", "5000",
                 "-v"],
                base / f"{group}-{n}.log",
                env=env,
            ).start()
        )  # fmt: skip
    return procs


def assignment(output: str) -> list[int]:
    """The partitions of the topic a worker held last (each assignment is logged as
    ``Setting newly assigned partitions {TopicPartition(topic='bench', partition=0), ...}
    for group ...``)."""
    assigned = output.split("Setting newly assigned partitions")[1:]
    last = assigned[-1].partition(" for group ")[0] if assigned else ""
    held = re.findall(rf"TopicPartition\(topic={re.escape(repr(TOPIC))}, partition=(\d+)\)", last)
    return sorted(int(partition) for partition in held)


def gates(base: Path, group: str, count: int) -> list[Path]:
    return [faults.paused_file("worker.batch", base / f"{group}-{n}.gate") for n in range(count)]


class LockWaits:
    """Samples, every ``interval`` seconds, the sessions of a database that wait for a lock
    (``pg_locks``): the time workers spent waiting on each other, seen from outside (only
    the workers write to their read-model database). Waits on the version catalog are
    counted apart, as they come once per version: for the schema-change guard
    (``ReadStore.ddl_guard``), which a worker takes when it registers its projections'
    versions on its first batch (the workers of a group starting together register one
    after another), and those of the switch to serving: it builds the version's keys (an
    index build locks its table against writes) and locks the version's catalog row while
    the batches in flight finish, and the next batches wait for it. Every other wait is one
    between batches."""

    def __init__(self, url: str, interval: float = 0.005) -> None:
        self.url = url
        self.interval = interval
        self.samples = 0
        self.waiting = 0
        self.registering = 0
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
        """Session-seconds spent waiting for locks while applying batches (sampled)."""
        return self.waiting * self.interval

    @property
    def registering_seconds(self) -> float:
        """Session-seconds spent waiting on the version catalog (sampled)."""
        return self.registering * self.interval

    def _sample(self) -> None:
        # One view (``pg_locks``: a consistent snapshot) says both that a session waits and
        # for what; ``pg_stat_activity`` only says which database the session is on. A
        # ``bigint`` advisory key is split into ``classid`` (high half) and ``objid``.
        query = (
            "SELECT count(*) FILTER (WHERE NOT guard), count(*) FILTER (WHERE guard) FROM ("
            " SELECT (l.locktype = 'advisory' AND l.objsubid = 1"
            " AND l.classid::bigint = %s AND l.objid::bigint = %s)"
            " OR a.query ~* %s OR EXISTS (SELECT 1 FROM pg_stat_activity b"
            " WHERE b.pid = ANY(pg_blocking_pids(l.pid)) AND b.query ~* %s) AS guard"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE NOT l.granted AND a.datname = current_database()) AS waits"
        )
        # A wait on the catalog: the waiting statement (a blocked session's query is the
        # one it waits in) reads a version's row, which only a catalog change (the switch)
        # locks; or builds a key; or waits for a key's build. A blocker's query says only
        # what it runs now, not what took the lock, except for a key's build: that session
        # runs nothing else.
        catalog = r"daybook_projection_versions|^\s*(create|drop|alter)\s"
        key = (DDL_LOCK >> 32, DDL_LOCK & 0xFFFFFFFF, catalog, r"^\s*(create|drop|alter)\s")
        with psycopg.connect(postgres_params(self.url).conninfo(), autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(query, key).fetchone()
                self.samples += 1
                if row:
                    self.waiting += int(row[0])
                    self.registering += int(row[1])
                time.sleep(self.interval)


class CpuTimes:
    """CPU seconds used so far, from ``/proc`` (Linux): by a process and its threads, by a
    server and its children (PostgreSQL's backends), and by the whole machine."""

    TICK = os.sysconf("SC_CLK_TCK")

    @classmethod
    def of(cls, pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / cls.TICK  # utime, stime

    @classmethod
    def tree(cls, root: int) -> dict[int, float]:
        """``root`` and its children (one level: PostgreSQL's backends and workers)."""
        found = {root: cls.of(root)}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == root:
                found[int(entry.name)] = cls.of(int(entry.name))
        return found

    @staticmethod
    def machine() -> tuple[float, float]:
        """(busy, total) CPU seconds of the machine since boot, over all cores."""
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle, iowait
        return (sum(ticks) - idle) / CpuTimes.TICK, sum(ticks) / CpuTimes.TICK


@dataclass
class Sample:
    """Everything measured at one moment of a worker run."""

    at: float
    workers: list[float]
    postgres: dict[int, float]
    broker: float
    machine: tuple[float, float]


@dataclass
class WorkerRun:
    count: int
    rate: float
    #: Session-seconds the workers waited for locks while applying batches, and while
    #: on the version catalog (registering, switching), sampled: ``LockWaits``.
    waited: float
    registering: float
    group: str
    url: str
    #: Cores used in the timed window: each worker, PostgreSQL, the broker, the machine
    #: (everything on it, other work included), and the machine's cores.
    worker_cores: list[float]
    postgres_cores: float
    broker_cores: float
    machine_cores: float
    cores: float
    #: The partitions each worker applied.
    partitions: list[list[int]]

    def cpu(self) -> str:
        mine = " + ".join(f"{c:.2f}" for c in self.worker_cores)
        return (
            f"workers {mine}, postgres {self.postgres_cores:.2f}, broker "
            f"{self.broker_cores:.2f}; machine {self.machine_cores:.2f} of {self.cores:.0f} "
            f"cores busy (other work {self.others:.2f}); "
            f"{self.rate / max(sum(self.worker_cores), 1e-9):,.0f} events per worker core-second"
        )

    @property
    def others(self) -> float:
        ours = sum(self.worker_cores) + self.postgres_cores + self.broker_cores
        return max(0.0, self.machine_cores - ours)


def worker_rate(
    admin_url: str,
    bootstrap: str,
    head: int,
    count: int,
    base: Path,
    round: int,
    servers: tuple[int, int],
) -> WorkerRun:
    """``count`` workers of a new group (writing to a new database: workers read events from
    the topic only), timed in the steady state: each worker waits at its first batch until
    every worker of the group holds partitions and has a batch in hand (so joining and
    rebalancing are left out: a rebalance would take the batch away from a waiting worker);
    then all go at once, and the clock runs until every event is applied. ``servers`` are
    the pids of PostgreSQL and the broker."""
    group = f"bench-x{count}-r{round}"
    url = services.create_database(admin_url, f"bench_x{count}_r{round}")
    procs = workers(url, bootstrap, group, count, base, gate=True)
    postgres_pid, broker_pid = servers

    def sample() -> Sample:
        return Sample(
            time.perf_counter(),
            [CpuTimes.of(proc.proc.pid) for proc in procs if proc.proc is not None],
            CpuTimes.tree(postgres_pid),
            CpuTimes.of(broker_pid),
            CpuTimes.machine(),
        )

    try:
        waiting = gates(base, group, count)
        wait_until(lambda: all(g.exists() for g in waiting), "every worker's first batch", 300)
        with LockWaits(url) as waits:
            start = sample()
            for g in waiting:
                g.unlink()
            wait_until(lambda: applied(url, group, TOPIC) >= head, "all events", 900)
            end = sample()
        partitions = [assignment(proc.output) for proc in procs]
    finally:
        for proc in procs:
            proc.stop()
    seconds = end.at - start.at
    machine = (end.machine[0] - start.machine[0], end.machine[1] - start.machine[1])
    cores = os.cpu_count() or 1
    postgres = sum(t - start.postgres.get(pid, 0.0) for pid, t in end.postgres.items())
    return WorkerRun(
        count=count,
        rate=head / seconds,
        waited=waits.seconds,
        registering=waits.registering_seconds,
        group=group,
        url=url,
        worker_cores=[(e - b) / seconds for b, e in zip(start.workers, end.workers, strict=True)],
        postgres_cores=postgres / seconds,
        broker_cores=(end.broker - start.broker) / seconds,
        machine_cores=machine[0] / machine[1] * cores if machine[1] else 0.0,
        cores=cores,
        partitions=partitions,
    )


def partition_totals(url: str) -> dict[int, int]:
    """Events per partition of the topic, computed from the log as the relay does."""
    totals = dict.fromkeys(range(PARTITIONS), 0)
    with psycopg.connect(postgres_params(url).conninfo(), autocommit=True) as conn:
        for (originator,) in conn.execute("SELECT originator_id FROM daybook_events"):
            key = envelope.partition_key(originator)
            totals[envelope.partition_for(key, PARTITIONS)] += 1
    return totals


def batch_rate(admin_url: str, bootstrap: str, head: int) -> float:
    """Events/s when ``StreamApplier`` gets whole fetches from a plain aiokafka consumer:
    every event applied, timed from the first fetch in hand (joining the group left out, as
    for the workers) until the last is applied. The relay's marks are messages too, but no
    events: only what the applier applied counts."""
    url = services.create_database(admin_url, "bench_batches")
    applier = StreamApplier(url, ALL, group="bench-batches", topic=TOPIC, partitions=PARTITIONS,
                            writer="bench")  # fmt: skip
    applier.connect()  # as a worker does at start, before its first batch

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
            done = 0
            start: float | None = None
            while done < head:
                fetched = await consumer.getmany(timeout_ms=200, max_records=5000)
                messages = [
                    Message(tp.partition, m.offset, m.value)
                    for tp, ms in fetched.items()
                    for m in ms
                ]
                if not messages:
                    continue
                if start is None:
                    start = time.perf_counter()
                result = await asyncio.to_thread(applier.apply, messages)
                await consumer.commit()
                done += result.applied
            assert start is not None, "the loop ends only after a fetch"
            return done / (time.perf_counter() - start)
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
        receipt = ledger.deposit(account, 1)
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
        found: dict[int, int] = dict(rows)
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
    parser.add_argument(
        "--rounds", type=int, default=1, help="run each group of workers this many times"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        metavar="N",
        help="the sizes of the worker groups to measure, 1 among them (default: 1 2 4)",
    )
    parser.add_argument(
        "--workers-only",
        action="store_true",
        help="only the relay and the workers (no plain-aiokafka applier, runner or latency)",
    )
    args = parser.parse_args()
    if 1 not in args.workers or min(args.workers) < 1:
        parser.error("--workers: give 1 (the others are compared to it) and counts above 0")
    base = Path(tempfile.mkdtemp(prefix="daybook-bench-stream-"))
    pg = services.start_postgres(durable=True, own=True)
    kafka = services.start_kafka(base / "kafka")
    rows: list[tuple[str, str, str]] = []
    succeeded = False
    try:
        url = services.create_database(pg.url, "bench_stream")
        ledger = open_ledger(url)
        accounts = open_accounts(ledger, 1000)
        write_money(ledger, accounts, args.events)
        head = ledger.head()
        print(f"log: {head:,} events ({base})", flush=True)

        relay = relay_rate(url, kafka.bootstrap, head)
        print(f"relay {relay:,.0f} events/s", flush=True)
        totals = partition_totals(url)
        print("events per partition: " + ", ".join(f"{totals[p]:,}" for p in sorted(totals)))
        assert pg.pid is not None and kafka.pid is not None, "the benchmark starts its own"
        runs: dict[int, list[WorkerRun]] = {n: [] for n in sorted(set(args.workers))}
        for round_number in range(1, args.rounds + 1):
            for count in runs:
                run = worker_rate(
                    pg.url, kafka.bootstrap, head, count, base, round_number, (pg.pid, kafka.pid)
                )
                runs[count].append(run)
                print(
                    f"round {round_number}: {count} worker(s) {run.rate:,.0f} events/s "
                    f"({run.rate / runs[1][-1].rate:.2f}x); waiting for locks "
                    f"{run.waited:.2f}s applying batches, {run.registering:.2f}s registering "
                    f"and switching versions (catalog); partitions {run.partitions}; "
                    f"CPU (cores): {run.cpu()}",
                    flush=True,
                )
        group, worker_url = runs[1][0].group, runs[1][0].url
        one = statistics.median(run.rate for run in runs[1])
        if args.workers_only:
            print()
            for count, done in runs.items():
                rates = ", ".join(f"{run.rate:,.0f}" for run in done)
                ratios = ", ".join(f"{run.rate / first.rate:.2f}x" for run, first in
                                   zip(done, runs[1], strict=True))  # fmt: skip
                print(f"{count} worker(s): {rates} events/s ({ratios} one worker, same round)")
            ledger.close()
            succeeded = True
            return
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
            probe = ledger.deposit(accounts[0], 1)
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
                (
                    f"{n} workers: applied (together)",
                    f"{statistics.median(r.rate for r in runs[n]):9,.0f} events/s "
                    f"({statistics.median(r.rate for r in runs[n]) / one:.2f}x)",
                    "",
                )
                for n in runs
                if n != 1
            ),
            (
                "lock waits applying batches (sampled)",
                ", ".join(f"{n}: {max(r.waited for r in done):.2f}s" for n, done in runs.items()),
                "",
            ),
            (
                "lock waits on the version catalog",
                ", ".join(
                    f"{n}: {max(r.registering for r in done):.2f}s" for n, done in runs.items()
                ),
                "",
            ),
            ("(applier fed whole fetches, no faust)", f"{batches:9,.0f} events/s", ""),
            (f"commit -> row, {rate}", percentiles(stream_latency), percentiles(runner_latency)),
        ]
        succeeded = True
    except BaseException:
        print(f"the broker's data and the workers' logs are in {base}", file=sys.stderr)
        raise
    finally:
        kafka.stop()
        pg.stop()
        # Kept after a run that failed (they say why), removed after one that succeeded
        # (--workers-only included: it returns from the try).
        if succeeded:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"{'':38} {'relay + faust workers':26} {'in-process runner':26}")
    for what, stream, inprocess in rows:
        print(f"{what:38} {stream:26} {inprocess:26}")
    print(f"\n{head:,} events, {PARTITIONS} partitions, worker batches of up to 5,000 events")


if __name__ == "__main__":
    main()
