"""A tiny run of PostgreSQL's CPU per commit, so the script keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_bench_append_smoke(pg_admin_url: str) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_append.py"
    result = subprocess.run(
        [sys.executable, str(script), "--commits", "5", "--transfers-per-commit", "4"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DAYBOOK_BENCH_DATABASE_URL": pg_admin_url},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "us per commit" in line]
    labels = [line.split("  ")[0] for line in lines]
    assert labels == [
        "append function, one batch token",
        "append function, a request record per command",
        "plain INSERT of the same rows, one statement",
        "a durable commit of one small row",
    ], result.stdout
