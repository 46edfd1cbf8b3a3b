"""A tiny run of the only-read check's benchmark, so the script keeps working, and what it
promises holds: every hold toward a merchant another process keeps crediting is accepted."""

from __future__ import annotations

import pytest

from tests.integration.bench_smoke import run_bench

pytestmark = pytest.mark.postgres


def test_bench_only_read_smoke(pg_admin_url: str) -> None:
    out = run_bench(
        "bench_only_read.py", "--holds", "5", "--threads", "4", pg_admin_url=pg_admin_url
    )
    lines = [line for line in out.splitlines() if "holds/s" in line]
    assert len(lines) == 2, out
    for line in lines:
        assert "outcomes {'accepted': 20}" in line, line
