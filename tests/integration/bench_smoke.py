"""Tiny runs of the benchmark scripts, so they keep working (``test_bench_*_smoke.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_bench(
    script: str, *args: str, pg_admin_url: str | None = None, tmpdir: Path | None = None
) -> str:
    """Run ``scripts/<script>`` with ``args`` (its databases on the test server, when given;
    its temporary files in ``tmpdir``, when given) and return its output, once it has
    exited 0."""
    env = dict(os.environ)
    if pg_admin_url is not None:
        env["DAYBOOK_BENCH_DATABASE_URL"] = pg_admin_url
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
