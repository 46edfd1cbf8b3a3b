"""A tiny run of the HTTP benchmark, so the script keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.bench_smoke import run_bench

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_bench_http_smoke(pg_admin_url: str, tmp_path: Path) -> None:
    """A run that succeeds leaves nothing in the temporary directory (its servers' logs
    stayed there after every run)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = run_bench(
        "bench_http.py",
        *("--transfers", "40", "--clients", "2", "--accounts", "5", "--out", str(tmp_path)),
        pg_admin_url=pg_admin_url,
        tmpdir=scratch,
    )
    assert "serve / anchor" in out and "p99" in out
    assert (tmp_path / "http.json").exists()
    assert list(scratch.glob("daybook-bench-*")) == []
