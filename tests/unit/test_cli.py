"""The command line: clear one-line errors for user mistakes, and the demo behind `make run`."""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
from pathlib import Path

import pytest

from daybook.infrastructure.cli import main, seconds
from daybook.infrastructure.settings import BadSettings, Settings
from daybook.infrastructure.urls import BadURL, postgres_params


def test_an_unsupported_url_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", "mysql://somewhere/db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daybook: unsupported store URL 'mysql://somewhere/db'")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "url", ["postgresql://u@h:notaport/x", "postgresql://u@h:99999/x", "postgresql://u@h/x?port=a"]
)
def test_a_bad_port_is_one_clear_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["balance", "00000000-0000-0000-0000-000000000001", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daybook: store URL") and "port must be a number" in err, err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["stock", "SKU-1", "--url", "postgresql://app:S3cretPW@db.example:99999/ledger"], "port"),
        (["stock", "SKU-1", "--url", "postgresql://app:S3cretPW@db.example:0/ledger"], "port"),
        (["serve", "--url", "postgresql://app:S3cretPW@db.example:5432"], "names no database"),
        (["demo", "--url", "postgresq://app:S3cretPW@db.example/ledger"], "unsupported"),
        (["projections", "status", "--url", "mysql://app:S3cretPW@db.example/x"], "unsupported"),
    ],
)
def test_a_refused_url_never_shows_its_password(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and "app:***@db.example" in err, err
    assert "S3cretPW" not in err and "Traceback" not in err


def test_the_broker_and_gateway_checks_never_show_a_password() -> None:
    from daybook.infrastructure import preflight

    for check, url in (
        (preflight.check_gateway, "http://user:S3cretPW@127.0.0.1:1/"),
        (preflight.check_broker, "kafka://user:S3cretPW@127.0.0.1:1"),
    ):
        with pytest.raises(preflight.Unusable) as refused:
            check(url)
        assert "S3cretPW" not in str(refused.value) and "127.0.0.1" in str(refused.value)


@pytest.mark.parametrize("password", ["it's", "back\\slash", "both ' and \\ and spaces"])
def test_any_password_reaches_libpq_as_it_was_written(password: str) -> None:
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    url = f"postgresql://app:{quote(password, safe='')}@db.example:5432/ledger"
    assert conninfo_to_dict(postgres_params(url).conninfo())["password"] == password


def test_help_explains_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "Store URLs" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: daybook" in capsys.readouterr().out


def test_the_demo_runs_and_conserves_money(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    args = ["demo", "--url", url, "--clients", "3", "--commands", "40", "--orders", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Orders: 8 through the order saga" in out
    assert "money conserved and nothing left held: yes" in out
    assert "no charge made twice" in out
    assert "Money conserved (transfers move it, only withdrawals remove it): yes" in out
    assert "Every balance within its overdraft limit: yes" in out
    assert "Refused, by error code" in out


def test_the_demo_runs_on_the_embedded_default_whatever_daybook_url_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator exports $DAYBOOK_URL for the other commands; `make run` must not write
    made-up accounts, deposits and stock into that ledger. It says so, in one line."""
    from daybook import open_ledger
    from daybook.infrastructure.urls import DEFAULT_URL

    real = f"sqlite:///{tmp_path}/real.db"
    with open_ledger(real) as ledger:
        ledger.open_account("ann", "EUR")
        head = ledger.head()
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    with contextlib.closing(sqlite3.connect(tmp_path / "real.db")) as db:
        before = db.execute(tables).fetchall()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("DAYBOOK_URL", real)
    monkeypatch.setenv("DAYBOOK_READMODELS_URL", real)
    assert main(["demo", "--clients", "1", "--commands", "5", "--orders", "1"]) == 0
    out, err = capsys.readouterr()
    with open_ledger(real) as ledger:
        assert ledger.head() == head, "the demo wrote into the ledger $DAYBOOK_URL names"
    with contextlib.closing(sqlite3.connect(tmp_path / "real.db")) as db:
        assert db.execute(tables).fetchall() == before, "the demo's read models went there"
    assert err.splitlines() == [
        "daybook demo: ignoring $DAYBOOK_URL and $DAYBOOK_READMODELS_URL; running on "
        f"{DEFAULT_URL} (give --url to choose)"
    ]
    assert out.startswith(f"daybook demo on {DEFAULT_URL} ")
    with open_ledger(f"sqlite:///{work}/.daybook/daybook.db") as ledger:
        assert ledger.head() > 0

    monkeypatch.delenv("DAYBOOK_READMODELS_URL")
    demo = f"sqlite:///{tmp_path}/demo.db"  # --url is the demo's ledger, said nothing about
    assert main(["demo", "--url", demo, "--clients", "1", "--commands", "5", "--orders", "0"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"daybook demo on {demo} ")
    with open_ledger(real) as ledger:
        assert ledger.head() == head


def test_an_unknown_log_format_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("DAYBOOK_LOG_FORMAT", "xml")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert main(["sagas", "run", "--url", url, "--gateway", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daybook: unknown log format 'xml'"), err


def test_the_relay_request_timeout_comes_from_the_option_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daybook.infrastructure.cli import build_parser, settings_of
    from daybook.infrastructure.settings import DEFAULT_RELAY_REQUEST_TIMEOUT

    def timeout(*options: str) -> float:
        args = build_parser().parse_args(["relay", "--url", "postgresql://u@h/x", *options])
        return settings_of(args).relay_request_timeout

    monkeypatch.delenv("DAYBOOK_RELAY_REQUEST_TIMEOUT", raising=False)
    assert timeout() == DEFAULT_RELAY_REQUEST_TIMEOUT
    monkeypatch.setenv("DAYBOOK_RELAY_REQUEST_TIMEOUT", "2.5")
    assert timeout() == 2.5
    assert timeout("--request-timeout", "1") == 1.0


def test_seconds_past_what_any_wait_can_take_are_refused() -> None:
    """A poll interval of 1e10 s failed the runner at its first idle wait (past what a
    thread can wait): every option in seconds stops at 30 days."""
    assert seconds("2592000") == 2592000
    with pytest.raises(argparse.ArgumentTypeError, match="at most 2592000 seconds"):
        seconds("10000000000")


def test_a_relay_request_timeout_of_zero_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["relay", "--url", "postgresql://u@h/x", "--request-timeout", "0"])
    assert "must be more than 0 seconds" in capsys.readouterr().err


def test_a_relay_request_timeout_too_short_for_any_broker_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A typo like 0.0001 would count a healthy broker as down on every batch, and the
    relay would wait for it for ever: refused, naming the option, and the setting too."""
    with pytest.raises(SystemExit):
        main(["relay", "--url", "postgresql://u@h/x", "--request-timeout", "0.0001"])
    assert "--request-timeout: must be at least 0.1 seconds" in capsys.readouterr().err
    with pytest.raises(BadSettings, match=r"\$DAYBOOK_RELAY_REQUEST_TIMEOUT\): .* 0.1"):
        Settings.load({"DAYBOOK_RELAY_REQUEST_TIMEOUT": "0.0001"})


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        # Past what PostgreSQL's timestamps hold: every command with a request id failed.
        ("DAYBOOK_REQUEST_RETENTION", "P999999999D", "at most 36500 days"),
        ("DAYBOOK_REQUEST_RETENTION", "1e13", "at most 36500 days"),
        # Past what a thread can wait: the purge service failed after its first pass.
        ("DAYBOOK_REQUEST_PURGE_INTERVAL", "P999999D", "at most 30 days"),
        ("DAYBOOK_REQUEST_PURGE_INTERVAL", "1e10", "at most 30 days"),
    ],
)
def test_a_request_window_or_purge_interval_no_part_can_keep_is_refused_up_front(
    variable: str, value: str, said: str
) -> None:
    with pytest.raises(BadSettings, match=rf"\${variable}\): must be {said}"):
        Settings.load({variable: value})


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("?bogus=1", 'invalid connection option "bogus"'),
        (
            "?tcp_user_timeout=soon",
            "?tcp_user_timeout= takes a whole number from 0 to 2147483647, got 'soon'",
        ),
        ("?sslmode=require&sslmode=disable", "?sslmode= is given 2 times"),
        ("?user=other", "give user in the URL itself"),
        ("?sslmode=verify-ful", "?sslmode= takes one of disable, allow, prefer, require"),
        ("?sslmode=", "?sslmode= is given no value"),
        ("?connect_timeout=0", "?connect_timeout= takes 2 seconds or more"),
        ("?connect_timeout=00", "?connect_timeout= takes 2 seconds or more"),
        ("?password=S3cretPW", "give password in the URL itself"),
        ("?sslpassword=S3cretPW&bogus=1", 'invalid connection option "bogus"'),
    ],
)
def test_a_bad_libpq_setting_in_a_url_is_one_clear_line(
    query: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://app:S3cretPW@db.example:5432/ledger{query}"
    assert main(["stock", "SKU-1", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daybook: store URL") and said in err, err
    assert "S3cretPW" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("?connect_timeout=99999999999", "?connect_timeout= takes a whole number from 2 to"),
        ("?connect_timeout=2147483648", "?connect_timeout= takes a whole number from 2 to"),
        ("?keepalives_idle=99999999999", "?keepalives_idle= takes a whole number from 0 to"),
        ("?keepalives_interval=2147483648", "?keepalives_interval= takes a whole number from 0"),
        ("?keepalives_count=4294967297", "?keepalives_count= takes a whole number from 0 to"),
        ("?keepalives=2147483648", "?keepalives= takes a whole number from 0 to"),
        ("?tcp_user_timeout=2147483648", "?tcp_user_timeout= takes a whole number from 0 to"),
        ("?tcp_user_timeout=-1", "?tcp_user_timeout= takes a whole number from 0 to"),
        ("?keepalives_idle=-5", "?keepalives_idle= takes a whole number from 0 to"),
    ],
)
def test_a_libpq_number_out_of_its_range_is_refused_with_the_url(query: str, said: str) -> None:
    """libpq reads these settings as C ints and refuses the rest only when it connects (or
    Python's own wait overflows first): refused with the URL, naming the setting and range."""
    url = f"postgresql://app:S3cretPW@db.example:5432/ledger{query}"
    with pytest.raises(BadURL) as refused:
        postgres_params(url)
    message = str(refused.value)
    assert said in message and "2147483647" in message, message
    assert "S3cretPW" not in message


@pytest.mark.parametrize("query", ["?connect_timeout=2147483647", "?tcp_user_timeout=0"])
def test_a_libpq_number_at_the_ends_of_its_range_is_taken(query: str) -> None:
    url = f"postgresql://app@db.example/ledger{query}"
    name, _, value = query[1:].partition("=")
    assert dict(postgres_params(url).options)[name] == value


def test_libpq_settings_in_a_url_reach_libpq_over_the_tcp_defaults() -> None:
    from psycopg.conninfo import conninfo_to_dict

    url = "postgresql://app@db.example/ledger?sslmode=verify-full&tcp_user_timeout=5000"
    given = conninfo_to_dict(postgres_params(url).conninfo())
    assert given["sslmode"] == "verify-full" and given["tcp_user_timeout"] == "5000"
    assert (given["keepalives"], given["keepalives_idle"]) == ("1", "10")


def test_a_url_may_give_hostaddr_beside_its_host_name() -> None:
    from psycopg.conninfo import conninfo_to_dict

    url = "postgresql://app@db.example/ledger?hostaddr=192.0.2.7&sslmode=verify-full"
    given = conninfo_to_dict(postgres_params(url).conninfo())
    assert (given["host"], given["hostaddr"]) == ("db.example", "192.0.2.7")


def test_a_worker_may_be_told_not_to_wait_to_fill_a_batch() -> None:
    from daybook.infrastructure.cli import build_parser

    def batch_wait(value: str) -> float:
        args = build_parser().parse_args(["worker", "--batch-wait", value])
        return float(args.batch_wait)

    assert batch_wait("0") == 0.0 and batch_wait("0.25") == 0.25
    with pytest.raises(SystemExit):
        batch_wait("-1")


@pytest.mark.parametrize("given", ["-1", "-0.5"])
def test_a_negative_token_rate_is_told_what_the_option_takes(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token's own --rate must be above 0: a refusal of -1 that says "0 or more" sends
    the operator to --rate 0, which is refused in turn."""
    with pytest.raises(SystemExit) as exit:
        main(["tokens", "create", "x", "--scope", "read", "--rate", given])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--rate: must be above 0 requests per second" in err, err
