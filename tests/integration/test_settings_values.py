"""Settings, variables and flags: malformed values refused at once, in one line, with a code."""

from __future__ import annotations

from pathlib import Path

import pytest

from daybook import open_ledger
from daybook.infrastructure import preflight
from daybook.infrastructure.cli import main
from daybook.infrastructure.preflight import Unusable
from daybook.infrastructure.settings import BadSettings, Settings


@pytest.mark.parametrize("command", ["run", "reconcile"])
@pytest.mark.parametrize("gateway", ["http://127.0.0.1:abc", "http://[::1"])
def test_a_gateway_url_that_cannot_be_parsed_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, gateway: str
) -> None:
    """A typo in --gateway ($DAYBOOK_GATEWAY_URL) ended `daybook sagas run|reconcile` with
    httpx's or urllib's traceback."""
    import logging

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    open_ledger(url).close()
    handlers = list(logging.root.handlers)  # `sagas run` sets up the process's logging
    try:
        code = main(
            [
                "sagas",
                command,
                "--url",
                url,
                "--gateway",
                gateway,
                *(["--startup-wait", "0"] if command == "run" else []),
            ]
        )
    finally:
        logging.root.handlers[:] = handlers
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    # (A URL that cannot be split is shown as its scheme only: it may hold a password.)
    assert err.startswith("daybook: the payment gateway URL '"), err
    assert "write http://host:port" in err


@pytest.mark.parametrize(
    ("check", "url"),
    [
        (preflight.check_gateway, "http://127.0.0.1:99999"),
        (preflight.check_broker, "kafka://127.0.0.1:99999"),
        (preflight.check_broker, "kafka://[::1"),
    ],
)
def test_a_url_no_server_can_ever_answer_is_refused_at_once_not_waited_for(
    check: object, url: str
) -> None:
    """A port past 65535 (a typo: 90920 for 9092) read as "connection refused", an outage
    that may pass: every service waited for it at start, by default for ever. A malformed
    URL "ends it at once, whatever the setting" (README)."""
    with pytest.raises(Unusable) as refused:
        check(url)  # type: ignore[operator]
    assert not refused.value.transient, refused.value


def test_the_demo_ignores_the_readmodels_variable_as_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "$DAYBOOK_URL and $DAYBOOK_READMODELS_URL are ignored" by the demo. One
    holding a URL of another kind of store stopped it."""
    monkeypatch.setenv("DAYBOOK_READMODELS_URL", "mysql://views@db/views")
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    code = main(["demo", "--url", url, "--clients", "1", "--commands", "2", "--orders", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "ignoring $DAYBOOK_READMODELS_URL" in err


def test_settings_made_in_python_are_refused_with_their_code() -> None:
    """README's error table: `bad_settings` for a setting daybook cannot use (`Settings`).
    ``Settings(...)``, as the tests and the README's embedding examples build it, raised
    pydantic's ValidationError: no ``code``, not a ``daybook.BadURL``."""
    with pytest.raises(BadSettings) as refused:
        Settings(cache_size=-1)
    assert refused.value.code == "bad_settings"
    assert "cache_size (or $DAYBOOK_CACHE_SIZE)" in str(refused.value)


def test_a_purge_interval_too_short_to_keep_does_not_turn_the_purge_off() -> None:
    """0 turns the purge service off; a positive interval under a microsecond was rounded
    to 0 and turned it off too, in silence: the request table then grows for good."""
    with pytest.raises(BadSettings, match="shorter than any duration daybook can keep"):
        Settings.load(env={"DAYBOOK_REQUEST_PURGE_INTERVAL": "1e-9"})


@pytest.mark.parametrize("broker", ["kafka://[::1", "kafka://127.0.0.1:99999"])
def test_a_malformed_broker_url_ends_a_worker_at_once_in_one_line(
    capsys: pytest.CaptureFixture[str], pg_url: str, broker: str
) -> None:
    """`daybook worker --broker 'kafka://[::1'` ended in urllib's traceback; with a port past
    65535 it said "connection refused" and, without --startup-wait, waited for ever. With a
    startup wait of a minute, refused at once (a malformed URL: no wait cures it)."""
    code = main(["worker", "--url", pg_url, "--broker", broker, "--startup-wait", "60"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "write kafka://host:port" in err, err
    assert "waiting" not in err and "gave up" not in err, err


def test_a_value_given_beside_settings_is_checked_as_the_settings_are(tmp_path: Path) -> None:
    """``open_ledger(url, settings=..., group_commit=...)`` put the value in place unchecked
    (pydantic's ``model_copy`` validates nothing): ``"maybe"``, which ``Settings`` refuses,
    turned group commit on, and ``"no"`` did too (a string is true), where
    ``$DAYBOOK_GROUP_COMMIT=no`` turns it off."""
    settings = Settings(url=f"sqlite:///{tmp_path / 'ledger.db'}")
    with pytest.raises(BadSettings) as refused:
        open_ledger(settings=settings, group_commit="maybe")  # type: ignore[arg-type]
    assert refused.value.code == "bad_settings", refused.value
    assert "group_commit" in str(refused.value)
    with open_ledger(settings=settings, group_commit="no") as ledger:  # type: ignore[arg-type]
        assert ledger.settings.group_commit is False


@pytest.mark.parametrize("interval", [1e-9, "PT0.0000001S"])
def test_a_purge_interval_rounding_to_0_is_refused_in_every_form(
    interval: object,
) -> None:
    """Not only decimal text: a float given in Python
    (``open_ledger(settings=Settings(request_purge_interval=1e-9))``) or ISO 8601 text in
    $DAYBOOK_REQUEST_PURGE_INTERVAL still rounded to 0 and turned the purge off in silence."""
    with pytest.raises(BadSettings, match="shorter than any duration daybook can keep"):
        Settings(request_purge_interval=interval)
    with pytest.raises(BadSettings, match="shorter than any duration daybook can keep"):
        Settings.load(env={"DAYBOOK_REQUEST_PURGE_INTERVAL": str(interval)})
