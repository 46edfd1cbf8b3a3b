"""What a caller sends cannot forge or restyle lines of the console log a person reads."""

from __future__ import annotations

import logging

import pytest

from daybook.infrastructure.observability.logs import ConsoleFormatter, one_line
from tests.http.conftest import Api

FORGED = "2030-01-01 00:00:00,000 ERROR daybook.http forged: token dbk_leaked revoked"


@pytest.mark.parametrize("path", [f"/v1/stock/A%0A{FORGED}", "/nowhere%1B[2J%1B[31mred"])
def test_a_path_a_caller_sends_cannot_split_or_colour_the_console_access_log(
    sqlite_api: Api, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """The console log (``--log-format console``, the default) is read by a person: a line a
    caller writes into it must stay one line, without control characters a terminal acts on
    (the domain refuses them in text for that reason)."""
    api = sqlite_api
    caplog.handler.setFormatter(ConsoleFormatter())  # as ``daybook serve`` writes its log
    caplog.set_level(logging.INFO, logger="daybook.http")
    caplog.clear()
    reply = api.run(api.client.get(path, headers=api.auth("tester")))
    assert reply.status_code in (404, 422), reply.text
    access = [r for r in caplog.records if r.name == "daybook.http.access"]
    assert access, caplog.text
    text = caplog.text
    assert not any(line.startswith("2030-01-01") for line in text.splitlines()), text
    assert "\x1b" not in text, repr(text)


def test_a_console_line_keeps_the_tabs_and_newlines_daybook_writes() -> None:
    """A message of daybook's own may quote a traceback: its newlines and tabs stay."""
    import logging as stdlib_logging

    record = stdlib_logging.LogRecord(
        "daybook.x", stdlib_logging.ERROR, __file__, 1, "parked:\n\tat %s", ("H\x1b[2J",), None
    )
    line = ConsoleFormatter().format(record)
    assert "parked:\n\tat H\\x1b[2J" in line, repr(line)


def test_one_line_escapes_what_would_break_or_restyle_a_console_line() -> None:
    assert one_line("a\nb\r\x1b[2J\u2028c\td") == "a\\nb\\r\\x1b[2J\\u2028c\\td"
    assert one_line("/v1/accounts/é€") == "/v1/accounts/é€"
    assert one_line("ann\u202elee\u2066") == "ann\\u202elee\\u2066"
