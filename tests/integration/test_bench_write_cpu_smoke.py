"""A tiny run of the write path's CPU breakdown, so the script keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_bench_write_cpu_smoke(pg_admin_url: str) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_write_cpu.py"
    result = subprocess.run(
        [sys.executable, str(script), "--transfers", "160", "--accounts", "20"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DAYBOOK_BENCH_DATABASE_URL": pg_admin_url},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for run in ("16 asyncio clients, PostgreSQL", "submission", "16 asyncio clients, memory"):
        assert any(line.startswith(run) and "transfers/s" in line for line in lines), run
    assert sum("ceilings: one interpreter" in line for line in lines) == 3
