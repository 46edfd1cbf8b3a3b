"""Run a part of daybook in a process of its own, with named fault points armed
(``DAYBOOK_FAULTS``, see ``daybook.infrastructure.streaming.faults``), so a test can kill it
at the worst moment and look at what a restart makes of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_module(
    module: str, args: list[str], faults: str | None
) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` from the repository's root, with only ``faults`` armed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DAYBOOK_FAULTS", None)
    if faults:
        env["DAYBOOK_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def done_or_killed(result: subprocess.CompletedProcess[str], faults: str | None) -> int:
    """The exit code of a worker that prints ``"done": true`` when it finishes: it finished
    (always so without faults), or a fault point killed it."""
    said = f"stdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-3000:]}"
    if faults is None:
        assert result.returncode == 0 and '"done": true' in result.stdout, said
    assert result.returncode in (0, -signal.SIGKILL), f"{faults} exited {result.returncode}; {said}"
    return result.returncode
