"""A tiny run of the saga benchmark (daybook beside DBOS), so the script keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_bench_sagas_smoke(pg_admin_url: str, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_sagas.py"
    result = subprocess.run(
        [sys.executable, str(script), "--orders", "12", "--clients", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DAYBOOK_BENCH_DATABASE_URL": pg_admin_url},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "daybook / DBOS" in result.stdout
    assert (tmp_path / "sagas.json").exists()
