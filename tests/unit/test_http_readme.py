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


def test_every_refusal_a_command_can_give_has_its_own_status() -> None:
    # Every command is served over HTTP, so every code the domain defines can reach a client:
    # a missing one fell back to 422 ("your request is unprocessable"), which told a client
    # that a hold it named was malformed when it did not exist (404), or that a request it
    # may retry was wrong when the ledger's state refused it (409).
    import daybook.domain  # noqa: F401  (defines every domain refusal)
    from daybook.domain.errors import DomainError

    domain = {
        code
        for code, error in DomainError._by_code.items()
        # Not a stand-in made for a code a recorded refusal named (a service's own code,
        # which another test may have replayed in this process).
        if error.__module__.startswith("daybook.domain.") and not getattr(error, "_stand_in", False)
    }
    assert domain - set(STATUS) == set()
