"""The README's embedding example runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_embedding_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    example = python_blocks()[0]
    assert 'open_ledger("memory://")' in example
    exec(compile(example, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "insufficient_funds - account" in out
    assert "has 2500 EUR available" in out
    assert "log position of the transfer: 5 head: 11" in out


def test_the_example_is_about_twenty_lines() -> None:
    assert len(python_blocks()[0].strip().splitlines()) <= 22


def test_the_read_model_example_runs_as_written(tmp_path: Path) -> None:
    (example,) = [
        b
        for b in python_blocks()
        if b.startswith("from daybook import open_ledger, run_projections\n")
    ]
    assert "run_projections" in example
    example = example.replace(".daybook/daybook.db", f"{tmp_path}/readme.db".lstrip("/"))
    example = example.replace("sqlite:///", "sqlite:////")
    namespace: dict[str, object] = {}
    exec(compile(example, str(README), "exec"), namespace)
    row = namespace["row"]
    assert row.balance == 500  # type: ignore[attr-defined]
    assert row.as_of_position >= namespace["receipt"].position  # type: ignore[attr-defined]
