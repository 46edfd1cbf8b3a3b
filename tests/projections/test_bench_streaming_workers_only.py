"""A tiny run of the streaming benchmark with ``--workers-only``: a run that succeeds leaves
nothing in the temporary directory, as a full run does (test_bench_smoke)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_bench_streaming_workers_only_leaves_nothing() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_streaming.py"
    result = subprocess.run(
        [sys.executable, str(script), "--events", "300", "--rounds", "1", "--workers", "1",
         "--workers-only"],
        capture_output=True,
        text=True,
        timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    named = re.search(r"^log: [\d,]+ events \((.+)\)$", result.stdout, re.MULTILINE)
    assert named is not None, result.stdout
    assert "1 worker(s):" in result.stdout, result.stdout
    assert not Path(named[1]).exists(), f"{named[1]} left behind"
