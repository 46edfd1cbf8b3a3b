"""Every script's ``--help`` says what it does: its docstring's first paragraph, whole (a
description cut at the end of its first line stops mid-sentence)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
WITH_HELP = sorted(
    path for path in SCRIPTS.glob("*.py") if "argparse.ArgumentParser(" in path.read_text()
)


def words(text: str) -> str:
    return " ".join(text.split())


def test_there_are_scripts_to_check() -> None:
    assert {p.name for p in WITH_HELP} >= {"bench_write.py", "bench_http.py", "soak_write.py"}


@pytest.mark.parametrize("script", WITH_HELP, ids=lambda p: p.name)
def test_help_gives_the_whole_first_paragraph(script: Path) -> None:
    docstring = ast.get_docstring(ast.parse(script.read_text()))
    assert docstring, f"{script.name} has no docstring"
    first = words(docstring.split("\n\n")[0])
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "10000"},  # no wrapping (argparse breaks at hyphens)
    )
    assert result.returncode == 0, result.stderr
    assert first in words(result.stdout), result.stdout
