"""A tiny run of the projection benchmark, so the script keeps working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_bench_projections_smoke(pg_url: str) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_projections.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--url",
            pg_url,
            "--events",
            "300",
            "--accounts",
            "20",
            "--anchor-events",
            "50",
            "--latency-commands",
            "5",
            "--batch-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "ratio" in result.stdout and "p99" in result.stdout
    assert "table equals daybook's: True" in result.stdout  # like with like
