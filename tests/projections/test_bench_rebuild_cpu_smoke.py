"""``bench_rebuild_cpu.py --url`` on a database that holds no log (a wrong URL, or
bench_projections not run there yet): a one-line error, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_bench_rebuild_cpu_on_an_empty_log_says_so(pg_url: str) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_rebuild_cpu.py"
    result = subprocess.run(
        [sys.executable, str(script), "--url", pg_url, "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode != 0
    assert "no log" in result.stderr, result.stderr
