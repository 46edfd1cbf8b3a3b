"""Streaming benchmark: relay events/s, faust worker events/s (one and two workers), beside
the in-process runner on the same log. Starts its own PostgreSQL and Tansu broker.

    python scripts/bench_streaming.py [--events 50000]

Not measured yet: end-to-end latency p50/p99 under a steady load.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infrastructure import open_ledger  # noqa: E402
from infrastructure.readmodels.runner import ProjectionRunner  # noqa: E402
from infrastructure.relay import Relay, RelayConfig, read_cursor  # noqa: E402
from projections import ALL  # noqa: E402
from tests import services  # noqa: E402
from tests.streaming.streams import Daybook, open_accounts, wait_until, write_money  # noqa: E402
from tests.streaming.test_workers import applied  # noqa: E402

PARTITIONS = 4


def relay_rate(url: str, bootstrap: str, topic: str, head: int) -> float:
    relay = Relay(RelayConfig(url, f"kafka://{bootstrap}", topic, PARTITIONS, batch_size=5000))

    async def main() -> float:
        task = asyncio.create_task(relay.run())
        start = time.perf_counter()
        while relay.stats.published < head:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        relay.stop()
        await task
        return elapsed

    return head / asyncio.run(main())


def worker_rate(url: str, bootstrap: str, topic: str, head: int, workers: int, base: Path) -> float:
    group = f"bench-{workers}-{time.time_ns()}"
    procs = [
        Daybook(
            ["worker", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", topic,
             "--partitions", str(PARTITIONS), "--group", group, "--batch-size", "5000"],
            base / f"worker-{workers}-{n}.log",
        ).start()
        for n in range(workers)
    ]  # fmt: skip
    try:
        wait_until(lambda: applied(url, group, topic) > 0, "the first batch", 120)
        start, first = time.perf_counter(), applied(url, group, topic)
        wait_until(lambda: applied(url, group, topic) >= head, "all events", 600)
        return (head - first) / (time.perf_counter() - start)
    finally:
        for proc in procs:
            proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="daybook-bench-stream-"))
    pg = services.start_postgres(base / "pg", durable=True)
    kafka = services.start_kafka(base / "kafka")
    try:
        url = services.create_database(pg.url, "bench_stream")
        ledger = open_ledger(url)
        write_money(ledger, open_accounts(ledger, 1000), args.events)
        head = ledger.head()
        print(f"log: {head} events")
        print(f"relay:                 {relay_rate(url, kafka.bootstrap, 'bench', head):9.0f} events/s")
        assert (read_cursor(url, "bench") or None) is not None
        for workers in (1, 2):
            rate = worker_rate(url, kafka.bootstrap, "bench", head, workers, base)
            print(f"faust workers x{workers}:      {rate:9.0f} events/s (after the group joined)")
        other = services.create_database(pg.url, "bench_runner")
        runner = ProjectionRunner(ledger, other, ALL, batch_size=5000)
        start = time.perf_counter()
        runner.run_until_caught_up()
        print(f"in-process runner:     {head / (time.perf_counter() - start):9.0f} events/s")
        runner.stop()
        ledger.close()
    finally:
        kafka.stop()
        pg.stop()


if __name__ == "__main__":
    main()
