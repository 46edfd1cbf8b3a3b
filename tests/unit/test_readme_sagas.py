"""The README's holds, linked commands and order workflow examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def section_code() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Holds, linked commands and sagas") : text.index("## Extending")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_holds_and_linked_commands(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(section_code()[0], str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "2 ['linked_command_failed', 'linked_command_failed', 'insufficient_funds']",
        "expired 200",
    ]


def test_the_order_workflow(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(section_code()[1], str(README), "exec"), {})
    *orders, totals = capsys.readouterr().out.splitlines()
    states = [line.split()[0] for line in orders]
    assert set(states) <= {"completed", "compensated"} and len(states) == 4
    completed = states.count("completed")
    assert completed and totals == f"{4_500 * completed} {5 - completed}"
    assert all("payment_declined" in line for line in orders if line.startswith("compensated"))
