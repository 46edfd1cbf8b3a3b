"""A tiny run of the saga benchmark (daybook beside DBOS), so the script keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.bench_smoke import run_bench

pytestmark = pytest.mark.postgres


def test_bench_sagas_smoke(pg_admin_url: str, tmp_path: Path) -> None:
    out = run_bench(
        "bench_sagas.py",
        *("--orders", "12", "--clients", "3", "--out", str(tmp_path)),
        pg_admin_url=pg_admin_url,
    )
    assert "daybook / DBOS" in out
    assert (tmp_path / "sagas.json").exists()
