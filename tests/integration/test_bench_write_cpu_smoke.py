"""A tiny run of the write path's CPU breakdown, so the script keeps working."""

from __future__ import annotations

import pytest

from tests.integration.bench_smoke import run_bench

pytestmark = pytest.mark.postgres


def test_bench_write_cpu_smoke(pg_admin_url: str) -> None:
    out = run_bench(
        "bench_write_cpu.py", "--transfers", "160", "--accounts", "20", pg_admin_url=pg_admin_url
    )
    lines = out.splitlines()
    for run in ("16 asyncio clients, PostgreSQL", "submission", "16 asyncio clients, memory"):
        assert any(line.startswith(run) and "transfers/s" in line for line in lines), run
    assert sum("ceilings: one interpreter" in line for line in lines) == 3
    # each run's commits carried its transfers, counted from their events
    assert sum("transfers per commit" in line for line in lines) == 3
