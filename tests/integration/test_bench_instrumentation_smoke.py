"""A tiny run of the instrumentation benchmark (SQLite only), so the script keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_instrumentation_smoke(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_instrumentation.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--transfers",
            "32",
            "--runs",
            "1",
            "--accounts",
            "4",
            "--no-postgres",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio ON/OFF" in result.stdout
    report = json.loads((tmp_path / "instrumentation.json").read_text())
    assert [r["name"] for r in report["results"]] == ["sqlite, threads", "sqlite, asyncio"]
    # ON runs made spans and counted commands: the comparison is not of two OFF runs
    assert report["spans_exported"] > 0 and report["commands_counted"] > 0
