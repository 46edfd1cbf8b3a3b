"""A tiny run of the instrumentation benchmark (SQLite only), so the script keeps working."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.bench_smoke import run_bench


def test_bench_instrumentation_smoke(tmp_path: Path) -> None:
    out = run_bench(
        "bench_instrumentation.py",
        *("--transfers", "32", "--runs", "1", "--accounts", "4", "--no-postgres"),
        *("--out", str(tmp_path)),
    )
    assert "ratio ON/OFF" in out
    report = json.loads((tmp_path / "instrumentation.json").read_text())
    assert [r["name"] for r in report["results"]] == ["sqlite, threads", "sqlite, asyncio"]
    # ON runs made spans and counted commands: the comparison is not of two OFF runs
    assert report["spans_exported"] > 0 and report["commands_counted"] > 0
