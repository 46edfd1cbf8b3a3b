"""A tiny run of PostgreSQL's CPU per commit, so the script keeps working."""

from __future__ import annotations

import pytest

from tests.integration.bench_smoke import run_bench

pytestmark = pytest.mark.postgres


def test_bench_append_smoke(pg_admin_url: str) -> None:
    out = run_bench(
        "bench_append.py",
        "--commits",
        "5",
        "--transfers-per-commit",
        "4",
        pg_admin_url=pg_admin_url,
    )
    lines = [line for line in out.splitlines() if "us per commit" in line]
    assert [line.split("  ")[0] for line in lines] == [
        "append function, one batch token",
        "append function, a request record per command",
        "plain INSERT of the same rows, one statement",
        "a durable commit of one small row",
    ], out
