"""The README's table of problem codes and HTTP statuses says what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from daybook.infrastructure.http.problems import STATUS, status_of

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_statuses() -> dict[str, int]:
    section = README.read_text().split("<!-- http -->", 1)[1].split("<!-- /http -->", 1)[0]
    table = section.split("| code | status |", 1)[1].split("\n\n", 1)[0]
    found: dict[str, int] = {}
    for row in table.strip().splitlines()[1:]:
        codes, status = row.strip("|").rsplit("|", 1)
        for code in re.findall(r"`([a-z_]+)`", codes):
            found[code] = int(status)
    return found


def test_every_code_the_server_maps_is_in_the_readme_with_its_status() -> None:
    documented = readme_statuses()
    assert documented == {code: status_of(code) for code in documented}
    assert set(STATUS) == set(documented)
