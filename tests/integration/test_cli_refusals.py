"""The command line: a role that may only read, refusals named by their stable code, and
one exit status for a read model not built, whatever the command."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from daybook import open_ledger, run_projections
from daybook.infrastructure.cli import main
from tests.integration.test_cli_errors import one_line


@contextlib.contextmanager
def role_that_may_only_read(pg_url: str, pg_admin_url: str) -> Iterator[str]:
    """``pg_url`` as a new role given only ``SELECT`` on the tables there now (and no right
    to create any), dropped afterwards."""
    role = f"viewer_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'v'").format(sql.Identifier(role)))
        db.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
            sql.Identifier(role)))  # fmt: skip
        db.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(sql.Identifier(role)))
    parts = urlsplit(pg_url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}:v@{parts.hostname}:{parts.port}"))
    finally:
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_admin_url, autocommit=True) as db:
            db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def select_only_url(
    pg_url: str, pg_admin_url: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[str]:
    """``pg_url`` with a ledger, built read models and a token in it, as a role given only
    ``SELECT`` on its tables (as the README's dashboards and monitoring are)."""
    with open_ledger(pg_url) as ledger, run_projections(ledger) as runner:
        receipt = ledger.open_account("ann", "EUR")
        runner.views.balance(receipt.account_id, min_position=receipt.position, timeout=30)
    assert main(["tokens", "create", "ops", "--scope", "admin", "--url", pg_url]) == 0
    capsys.readouterr()
    with role_that_may_only_read(pg_url, pg_admin_url) as url:
        yield url


def test_tokens_list_reads_as_a_role_that_may_only_read(
    capsys: pytest.CaptureFixture[str], select_only_url: str
) -> None:
    """Listing tokens is a read; reads need no right to write (README, read models)."""
    assert main(["tokens", "list", "--url", select_only_url]) == 0
    assert "ops" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["tokens", "revoke", "ops"],
        ["projections", "resume", "account_balances"],
        ["reconcile", "account_balances"],
        ["requests", "purge"],
    ],
)
def test_a_role_without_the_right_to_write_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], select_only_url: str, argv: list[str]
) -> None:
    line = one_line(capsys, [*argv, "--url", select_only_url])
    assert "permission denied" in line
    assert "did not answer" not in line  # it answered: it refused this role


def test_tokens_list_on_a_database_without_tokens_as_a_role_that_may_only_read(
    capsys: pytest.CaptureFixture[str], pg_url: str, pg_admin_url: str
) -> None:
    """No token table yet, and a role that may not make it: no tokens, not a traceback."""
    open_ledger(pg_url).close()
    with role_that_may_only_read(pg_url, pg_admin_url) as url:
        assert main(["tokens", "list", "--url", url]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("no tokens") and err == "", (out, err)


def test_a_role_that_may_not_read_is_told_so_not_that_its_writes_were_refused(
    capsys: pytest.CaptureFixture[str], select_only_url: str, pg_url: str
) -> None:
    """`daybook tokens list` only reads: a role without SELECT on the token table was told
    "the database refused this command's writes"."""
    user = urlsplit(select_only_url).username
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(sql.SQL("REVOKE SELECT ON daybook_tokens FROM {}").format(sql.Identifier(user)))
    line = one_line(capsys, ["tokens", "list", "--url", select_only_url])
    assert "permission denied" in line and "refused this command's writes" not in line, line


@pytest.fixture
def built_ledger(tmp_path: Path) -> str:
    """A SQLite ledger with every read model built by the runner."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger, run_projections(ledger) as runner:
        receipt = ledger.open_account("ann", "EUR")
        runner.views.balance(receipt.account_id, min_position=receipt.position, timeout=30)
    return url


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["projections", "rebuild", "account_balances", "--no-progress"], "rebuild_refused"),
        (["projections", "resume", "account_balances"], "illegal_transition"),
        (["projections", "handover", "account_balances", "--to", "stream:g"], "handover_refused"),
    ],
)
def test_a_refusal_at_the_command_line_names_its_stable_code(
    capsys: pytest.CaptureFixture[str], built_ledger: str, argv: list[str], code: str
) -> None:
    """The README's codes (rebuild_refused, illegal_transition, handover_refused) are what a
    script can tell refusals apart by, as `daybook: refused (reconcile_failed): ...` and
    every DomainError (`daybook: refused (saga_not_found): ...`) already say theirs."""
    line = one_line(capsys, [*argv, "--url", built_ledger], code=1)
    assert f"refused ({code})" in line


def test_a_read_model_not_built_exits_alike_in_every_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The same situation, no read model built yet, one exit status: `daybook balance`
    says 1 (and `reconcile NAME` 1), `daybook sagas list` said 2 (a bad option, or a store
    that cannot be used, in the README's words)."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
    balance = main(["balance", str(account), "--url", url])
    assert "has not been built" in capsys.readouterr().err
    sagas = main(["sagas", "list", "--url", url])
    assert "has not been built" in capsys.readouterr().err
    assert (balance, sagas) == (1, 1)


def test_a_read_model_never_built_is_not_not_yet_with_min_position(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Nothing builds the read model: 75 ("not yet", which scripts retry) would have a
    script retry for ever, told the read model "is still being built"."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        receipt = ledger.open_account("ann", "EUR")
    argv = ["balance", str(receipt.account_id), "--url", url]
    wait = ["--min-position", str(receipt.position), "--timeout", "0.2"]
    line = one_line(capsys, [*argv, *wait], code=1)
    assert "still being built" not in line


def test_a_read_model_whose_first_build_is_under_way_is_not_yet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Its first version registered, not serving yet: 75, "not yet", as the README says
    (the build goes on, and a script's retry will be answered)."""
    from daybook import projections
    from daybook.infrastructure.readmodels.catalog import VersionCatalog
    from daybook.infrastructure.readmodels.location import open_store

    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        receipt = ledger.open_account("ann", "EUR")
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        catalog.register(projections.ACCOUNT_BALANCES)
    finally:
        store.close()
    argv = ["balance", str(receipt.account_id), "--url", url]
    wait = ["--min-position", str(receipt.position), "--timeout", "0.2"]
    assert main([*argv, *wait]) == 75
    assert "is still being built" in capsys.readouterr().err
