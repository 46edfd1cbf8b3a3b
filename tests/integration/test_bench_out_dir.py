"""``--out DIR`` of a benchmark that does not exist yet: the results still land there, rather
than the run ending with a traceback after all its work (minutes, for a full run) is done."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.bench_smoke import run_bench


def test_bench_out_dir_is_made_with_its_parents(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "today"
    run_bench(
        "bench_instrumentation.py",
        *("--transfers", "16", "--runs", "1", "--accounts", "4", "--no-postgres", "--no-asyncio"),
        *("--out", str(out)),
    )
    report = json.loads((out / "instrumentation.json").read_text())
    assert [r["name"] for r in report["results"]] == ["sqlite, threads"]
