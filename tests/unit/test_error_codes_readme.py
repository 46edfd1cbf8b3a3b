"""Every stable error ``code`` daybook can give a user is in the README, with what it means.

``tests/unit/test_http_readme.py`` holds the README's HTTP table to the server's status map;
a code that map does not list (answered 422) was held to nothing, and nothing held the
README's table of codes to the codes raised. Here the codes are read from the source itself,
so a new refusal is counted whether or not anything imports it.
"""

from __future__ import annotations

import re
from pathlib import Path

from daybook.domain.linked import LINKED_COMMAND_FAILED
from daybook.infrastructure.http.problems import STATUS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LAYERS = ("domain", "projections", "infrastructure")

#: A class's code: ``code = "x"``, ``code: str = "x"``, ``code: ClassVar[str] = "x"``.
CLASS_CODE = re.compile(r'^\s+code(?:\s*:\s*[\w\[\]]+)?\s*=\s*"([a-z_]+)"\s*$', re.M)
#: An HTTP refusal made in place: ``Problem("x", ...)``.
PROBLEM_CODE = re.compile(r'\bProblem\(\s*"([a-z_]+)"')


def source_codes(pattern: re.Pattern[str]) -> dict[str, str]:
    """Each code ``pattern`` finds in daybook's source, with the file it is in."""
    found: dict[str, str] = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            for code in pattern.findall(path.read_text()):
                found.setdefault(code, str(path.relative_to(ROOT)))
    return found


def section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text, title
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> dict[str, str]:
    """The codes in the first cell of each table row of ``text``, with the row's meaning
    (its other cells, which must say something)."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        first, _, rest = line.strip().strip("|").partition("|")
        for code in re.findall(r"`([a-z_]+)`", first):
            rows[code] = rest.strip(" |")
    return rows


def test_every_code_of_a_refusal_class_is_in_the_readme_error_codes_with_a_meaning() -> None:
    documented = table_rows(section("Error codes"))
    codes = source_codes(CLASS_CODE) | {LINKED_COMMAND_FAILED: "domain/linked.py"}
    missing = {code: where for code, where in codes.items() if code not in documented}
    assert not missing, f"codes missing from the README's error code tables: {missing}"
    blank = sorted(code for code in codes if not documented[code])
    assert not blank, f"codes listed with no meaning: {blank}"


def test_every_http_code_is_in_the_readme() -> None:
    http = README.read_text().split("<!-- http -->", 1)[1].split("<!-- /http -->", 1)[0]
    documented = set(table_rows(section("Error codes"))) | set(
        re.findall(r"`([a-z_]+)`", http.split("| code | status |", 1)[1].split("\n\n", 1)[0])
    )
    codes = source_codes(PROBLEM_CODE) | dict.fromkeys(STATUS, "infrastructure/http")
    missing = {code: where for code, where in codes.items() if code not in documented}
    assert not missing, f"HTTP codes missing from the README: {missing}"


def test_the_source_scan_finds_codes() -> None:
    """The patterns still match how codes are written (a scan finding nothing passes)."""
    classes = source_codes(CLASS_CODE)
    assert {"insufficient_funds", "outcome_unknown", "stale_read", "foreign_store"} <= set(classes)
    assert {"malformed_json", "invalid_parameter"} <= set(source_codes(PROBLEM_CODE))
