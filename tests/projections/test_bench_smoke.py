"""Tiny runs of the projection and streaming benchmarks, so the scripts keep working and
measure what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_bench_projections_smoke(pg_url: str) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_projections.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--url",
            pg_url,
            "--events",
            "300",
            "--accounts",
            "20",
            "--anchor-events",
            "50",
            "--latency-commands",
            "5",
            "--batch-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "ratio" in result.stdout and "p99" in result.stdout
    assert "table equals daybook's: True" in result.stdout  # like with like


@pytest.mark.slow
def test_bench_streaming_smoke() -> None:
    """The streaming benchmark (its own PostgreSQL and broker) on a log of one batch: the
    applier fed whole fetches applies it all, so its rate is not 0 (with the first fetch
    left out of it, it was); and the workers' lock waits while applying batches are
    reported apart from those on the version catalog (registering, switching), which come
    once per version (counted in, they made four workers seem to wait for each other).
    A run that succeeds leaves nothing in the temporary directory (the broker's data and
    the workers' logs stayed there after every run)."""
    result = run_streaming_bench("--workers", "1", "2")
    table = {line[:38].strip(): line[38:].strip() for line in result.stdout.splitlines()}
    fed = re.fullmatch(r"([\d,]+) events/s", table["(applier fed whole fetches, no faust)"])
    assert fed is not None and int(fed[1].replace(",", "")) > 0, result.stdout
    # Both kinds of wait are reported, each for 1 and 2 workers. (Whether batches wait
    # for each other is proven by test_lock_orders, which holds one open; a sample here
    # would only say whether one happened to be seen.)
    for row in ("lock waits applying batches (sampled)", "lock waits on the version catalog"):
        assert re.fullmatch(r"1: \d+\.\d\ds, 2: \d+\.\d\ds", table[row]), row


@pytest.mark.slow
def test_bench_streaming_workers_only_leaves_nothing() -> None:
    """``--workers-only`` returned before removing the temporary directory (the broker's
    data, the workers' logs), and left the ledger open."""
    result = run_streaming_bench("--workers", "1", "--workers-only")
    assert "1 worker(s):" in result.stdout, result.stdout


def run_streaming_bench(*options: str) -> subprocess.CompletedProcess[str]:
    """The streaming benchmark on a log of one batch; it succeeded, and left nothing in its
    temporary directory (the broker's data and the workers' logs stayed there after every
    run)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_streaming.py"
    result = subprocess.run(
        [sys.executable, str(script), "--events", "300", "--rounds", "1",
         "--latency-commands", "5", *options],
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    named = re.search(r"^log: [\d,]+ events \((.+)\)$", result.stdout, re.MULTILINE)
    assert named is not None, result.stdout
    assert not Path(named[1]).exists(), f"{named[1]} left behind"
    return result
