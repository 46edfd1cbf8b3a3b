"""Passwords written unencoded (or in a libpq connection string) never reach a refusal."""

from __future__ import annotations

import pytest

from daybook.infrastructure.cli import main
from daybook.infrastructure.urls import redacted

UUID = "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize(
    "url",
    [
        # Generated passwords hold '/', '+', '#', '?': written unencoded, urlsplit ends the
        # netloc at the first of '/', '?', '#', so it sees no password; redacted() showed
        # the whole URL, password and all, in the one-line refusal.
        "postgresql://ledger:S3cr/etPW@db.example:5432/ledger",
        "postgresql://ledger:S3cr#etPW@db.example:5432/ledger",
        "postgresql://ledger:S3cr?etPW@db.example:5432/ledger",
    ],
)
def test_a_refused_url_with_an_unencoded_password_never_shows_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["balance", UUID, "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daybook: "), err
    assert "etPW" not in err, err


def test_a_libpq_connection_string_given_as_the_url_never_shows_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["balance", UUID, "--url", "host=db.example password=S3cretPW dbname=x"]) == 2
    err = capsys.readouterr().err
    assert "unsupported store URL" in err and "S3cretPW" not in err, err


def test_a_password_starting_with_digits_then_a_slash_is_not_shown_as_port_and_database(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ledger:4455/etPW@...`` unencoded: urlsplit reads host ``ledger``, port 4455 and
    database ``etPW@db.example/ledger``; the refusal named that as the store's place, the
    whole password in it (and the log's URL pattern, expecting ``user:``, missed it too)."""
    url = "postgresql://ledger:4455/etPW@db.invalid/ledger"
    assert main(["balance", UUID, "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daybook: "), err
    assert "etPW" not in err and "4455" not in err, err


@pytest.mark.parametrize(
    "url", ["kafka://app:98/etPW@127.0.0.1:1", "kafka://app:S3cr/etPW@127.0.0.1:1"]
)
def test_a_broker_url_with_a_password_never_shows_any_of_it(url: str) -> None:
    """``kafka://app:98/etPW@...``: the check split it at the wrong ':' and said
    ``no Kafka broker answers (app:98: unknown host)``, the password's start in it."""
    from daybook.infrastructure import preflight

    with pytest.raises(preflight.Unusable) as refused:
        preflight.check_broker(url)
    said = str(refused.value)
    assert "etPW" not in said and "98" not in said and "S3cr" not in said, said


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://u@db.example:5432/ledger?password=abc@defghi", "defghi"),
        ("postgresql://u@db.example:5432/ledger?sslpassword=k3y@rest&sslmode=require", "rest"),
        ("postgresql://h/ledger?sslpassword=k3y@rest&sslmode=require", "k3y"),
        ("postgresql://ledger:12?etPW@db.example/ledger", "etPW"),
    ],
)
def test_an_at_in_a_query_password_shows_no_part_of_it(url: str, secret: str) -> None:
    """The unencoded-password rule took an '@' inside a query's password for the end of a
    user and password, and showed the password's tail as the host."""
    assert secret not in redacted(url)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://app:2024?x=1@db.example/ledger", "2024?x=1"),
        ("postgresql://u:9?Q=@h/db", "9?Q="),
        ("postgresql://u:p@ss/word@host/db", "ss/word"),
        ("postgresql://h/db?password=abc#def", "def"),
        ("postgresql://u:p/q@h/db?application_name=me@laptop", "p/q"),
    ],
)
def test_no_part_of_a_password_written_unencoded_shows(url: str, secret: str) -> None:
    """'@', '?', '#' or digits then '?' in a password written unencoded: which part is a
    secret cannot be told, so nothing past the scheme is shown (a query's '#' hides the
    fragment it starts). The rule before showed whole passwords of this form."""
    assert secret not in redacted(url)


def test_an_at_in_a_query_value_is_not_shown_as_a_host() -> None:
    """``application_name=me@laptop`` was shown as ``postgresql://[:***@laptop``, naming a
    host that is not the one connected to; it is hidden whole, as a password might be."""
    said = redacted("postgresql://[::1]:5432/ledger?application_name=me@laptop")
    assert "laptop" not in said or "[::1]:5432" in said


def test_a_sqlite_path_with_an_at_is_shown_as_it_is() -> None:
    assert redacted("sqlite:////home/me@corp/ledger.db") == "sqlite:////home/me@corp/ledger.db"


def test_a_query_password_with_an_unencoded_ampersand_shows_no_tail() -> None:
    said = redacted("postgresql://h/db?password=abc&defg&sslmode=require")
    assert "defg" not in said and "sslmode=require" in said, said
