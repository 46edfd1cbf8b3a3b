"""A tiny run of the HTTP benchmark, so the script keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_bench_http_smoke(pg_admin_url: str, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_http.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--transfers",
            "40",
            "--clients",
            "2",
            "--accounts",
            "5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "DAYBOOK_BENCH_DATABASE_URL": pg_admin_url},
    )
    assert result.returncode == 0, result.stderr
    assert "serve / anchor" in result.stdout and "p99" in result.stdout
    assert (tmp_path / "http.json").exists()
