"""Daybook processes for streaming tests and benchmarks: event writers, `daybook relay` and
`daybook worker` subprocesses, topic readers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from daybook import Ledger
from daybook.domain.accounts import Deposit, OpenAccount, Transfer
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.progress import Step, classify
from scripts import services

ROOT = Path(__file__).resolve().parents[2]
#: Upper bound for any single wait in these tests (they finish far sooner when healthy).
WAIT = 90.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_accounts(ledger: Ledger, count: int, currency: str = "EUR") -> list[uuid.UUID]:
    outcomes = ledger.service.execute([OpenAccount(f"owner-{i}", currency) for i in range(count)])
    return [services.opened(o) for o in outcomes]


def write_money(ledger: Ledger, accounts: list[uuid.UUID], events: int, seed: int = 1) -> None:
    """About ``events`` events: deposits and transfers among ``accounts``, 200 per commit."""
    rng = random.Random(seed)
    written = 0
    while written < events:
        batch: list[Deposit | Transfer] = []
        while len(batch) < 200 and written < events:
            a, b = rng.sample(accounts, 2)
            if rng.random() < 0.7:
                batch.append(Deposit(a, rng.randint(1, 1000)))
                written += 1
            else:
                batch.append(Transfer(a, b, 1))
                written += 2
        ledger.service.execute(batch)


@dataclass
class Daybook:
    """A ``daybook`` subprocess (relay or worker) with its output in a log file."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    #: The command line module: the streaming commands, or every command.
    module: str = "daybook.infrastructure.streaming.cli"

    #: Processes started and not yet reaped (``kill_leftovers`` ends them).
    running: ClassVar[list[Daybook]] = []

    @classmethod
    def kill_leftovers(cls) -> list[str]:
        """SIGKILL every process still running (a test that failed before stopping its
        own); returns their command lines."""
        killed = []
        for daybook in cls.running:
            if daybook.proc is not None and daybook.proc.poll() is None:
                daybook.kill()
                killed.append(" ".join(daybook.args[:1]))
        cls.running.clear()
        return killed

    def start(self) -> Daybook:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
        )
        log.close()
        Daybook.running.append(self)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after 30 s); the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def wait(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


async def _read_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    done: Callable[[dict[int, list[envelope.Envelope]]], bool],
    timeout: float,
) -> dict[int, list[envelope.Envelope]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: dict[int, list[envelope.Envelope]] = {p: [] for p in range(partitions)}
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        for p in range(partitions):
            # Explicitly: after a restart Tansu answers the "earliest offset" lookup wrongly.
            consumer.seek(TopicPartition(topic, p), 0)
        deadline = time.monotonic() + timeout
        while not done(seen):
            if time.monotonic() > deadline:
                applied, duplicates, gaps = follow_chain(seen)
                counts = {p: len(m) for p, m in seen.items()}
                raise AssertionError(
                    f"timed out reading {topic}: messages per partition {counts}, "
                    f"{len(applied)} applied, {duplicates} duplicates, {gaps} past a gap"
                )
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for tp, messages in batch.items():
                seen[tp.partition].extend(envelope.decode(m.value) for m in messages)
    finally:
        await consumer.stop()
    return seen


def read_topic(
    bootstrap: str, topic: str, partitions: int, until_positions: int, timeout: float = WAIT
) -> dict[int, list[envelope.Envelope]]:
    """Every envelope on ``topic`` per partition, once consuming by the chain rule has
    applied positions 1..``until_positions``."""
    return asyncio.run(
        _read_topic(
            bootstrap,
            topic,
            partitions,
            lambda seen: len(follow_chain(seen)[0]) >= until_positions,
            timeout,
        )
    )


def assert_in_log_order(seen: dict[int, list[envelope.Envelope]]) -> None:
    """Each partition, read as a worker follows its chain, delivers its events in log order:
    every message is the next one, or a repeat of one already delivered (same position, same
    aggregate version); nothing arrives past a gap; each aggregate's versions rise."""
    for partition, messages in seen.items():
        taken: dict[int, tuple[object, int]] = {}
        last = 0
        for message in messages:
            if message.is_mark:
                continue
            what = (message.aggregate_id, message.aggregate_version)
            step = classify(last, message.position, message.prev)
            if step is Step.APPLY:
                taken[message.position] = what
                last = message.position
            elif step is Step.DUPLICATE:
                if taken.get(message.position) != what:
                    raise AssertionError(
                        f"partition {partition}: position {message.position} arrived after "
                        f"{last} and is no repeat of one delivered: out of order"
                    )
            else:
                raise AssertionError(
                    f"partition {partition}: position {message.position} (prev {message.prev}) "
                    f"arrived when {last} was the last delivered: out of order or lost"
                )
        versions: dict[object, int] = {}
        for position in sorted(taken):
            aggregate, version = taken[position]
            if version <= versions.get(aggregate, 0):
                raise AssertionError(f"partition {partition}: {aggregate} went back to {version}")
            versions[aggregate] = version


def follow_chain(
    seen: dict[int, list[envelope.Envelope]],
) -> tuple[list[int], int, int]:
    """Consume like a worker: (positions applied, duplicates skipped, gap messages held back)."""
    applied: list[int] = []
    duplicates = gaps = 0
    for messages in seen.values():
        last = 0
        for message in messages:
            if message.is_mark:
                continue
            step = classify(last, message.position, message.prev)
            if step is Step.APPLY:
                applied.append(message.position)
                last = message.position
            elif step is Step.DUPLICATE:
                duplicates += 1
            else:
                gaps += 1
    return applied, duplicates, gaps
