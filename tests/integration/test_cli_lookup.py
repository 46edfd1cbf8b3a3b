"""``daybook balance``, ``stock`` and ``statement``: a quick look at the read models that says
which log position it reflects."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from daybook import open_ledger, run_projections
from daybook.infrastructure.cli import EXIT_NOT_YET, main
from daybook.infrastructure.readmodels.queries import ReadModels


@pytest.fixture
def ledger_url(tmp_path: Path) -> tuple[str, str, int]:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger, run_projections(ledger) as runner:
        account = ledger.open_account("ann", "EUR").account_id
        assert account is not None
        for amount in (100, 250, 75):
            ledger.deposit(account, amount)
        ledger.receive_stock("SKU-1", 12)
        receipt = ledger.reserve_stock("SKU-1", 5)
        runner.views.stock("SKU-1", min_position=receipt.position, timeout=10)
        runner.views.statement(account, min_position=receipt.position, timeout=10)
    return url, str(account), receipt.position


def test_balance(ledger_url: tuple[str, str, int], capsys: pytest.CaptureFixture[str]) -> None:
    url, account, position = ledger_url
    assert main(["balance", account, "--url", url, "--min-position", str(position)]) == 0
    out = capsys.readouterr().out
    assert "balance 425  available 425" in out
    assert f"as of log position {position} (0 events behind the head)" in out
    assert main(["balance", account, "--url", url, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["balance"] == 425 and answer["as_of_position"] == position


def test_stock_and_statement(
    ledger_url: tuple[str, str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    url, account, _ = ledger_url
    assert main(["stock", "SKU-1", "--url", url]) == 0
    assert "SKU-1: on hand 12  reserved 5  available 7" in capsys.readouterr().out
    assert main(["statement", account, "--url", url, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "balance            425" in out and "balance            350" in out
    assert "older entries: --before 3" in out
    assert main(["statement", account, "--url", url, "--before", "3"]) == 0
    out = capsys.readouterr().out
    assert "balance            100" in out
    assert "older entries" not in out  # the first deposit is the account's oldest entry
    assert main(["statement", account, "--url", url]) == 0
    assert "older entries" not in capsys.readouterr().out


def test_what_the_read_model_has_not_seen(
    ledger_url: tuple[str, str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _, position = ledger_url
    assert main(["balance", str(uuid.uuid4()), "--url", url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("daybook: no account") and f"as of log position {position}" in err
    assert main(["stock", "SKU-NONE", "--url", url]) == 1
    assert "no stock of SKU-NONE" in capsys.readouterr().err
    unknown = str(uuid.uuid4())
    assert main(["statement", unknown, "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.strip().startswith(f"daybook: no account {unknown} in the read model as of log")
    wanted = [
        "balance",
        str(uuid.uuid4()),
        "--url",
        url,
        "--min-position",
        "999",
        "--timeout",
        "0.1",
    ]
    # Not a mistake: the read model has not got there yet. Scripts retry on 75 (EX_TEMPFAIL).
    assert main(wanted) == EXIT_NOT_YET
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reached log position" in err and "not 999" in err


def test_before_any_read_model_was_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
    assert main(["balance", str(account), "--url", url]) == 1
    assert "has not been built here yet: run `daybook project`" in capsys.readouterr().err


def test_a_statement_of_an_account_with_no_entries_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An account opened and not yet used is known: its statement is empty, not an error."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger, run_projections(ledger) as runner:
        receipt = ledger.open_account("ann", "EUR")
        runner.views.balance(receipt.account_id, min_position=receipt.position, timeout=10)
        statement = runner.views.statement(receipt.account_id, min_position=receipt.position)
        assert statement is not None and statement.entries == ()
        assert runner.views.statement(uuid.uuid4()) is None  # as balance() says of it
    assert main(["statement", str(receipt.account_id), "--url", url]) == 0
    assert f"no statement entries for {receipt.account_id}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "projection"),
    [
        ("balance", "account_balances"),
        ("statement", "account_statement"),
        ("stock", "inventory_levels"),
    ],
)
def test_not_found_names_the_position_it_was_read_at_not_a_later_one(
    ledger_url: tuple[str, str, int],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    projection: str,
) -> None:
    """The account (or SKU) is written, and projected, just after the read that did not find
    it: "not found" named a position read afterwards, which includes it."""
    url, _, _ = ledger_url
    key = "SKU-LATE" if command == "stock" else str(uuid.uuid4())
    written: list[int] = []
    original = ReadModels._read_at

    def read_at(self: ReadModels, name: str, read: Any, *args: Any, **kwargs: Any) -> Any:
        found = original(self, name, read, *args, **kwargs)
        if name == projection and found[0] is None and not written:
            with open_ledger(url) as ledger, run_projections(ledger, start=False) as runner:
                if command == "stock":
                    receipt = ledger.receive_stock(key, 1)
                else:
                    receipt = ledger.open_account("zoe", "EUR", account_id=key)
                runner.run_until_caught_up()
            written.append(receipt.position)
        return found

    monkeypatch.setattr(ReadModels, "_read_at", read_at)
    assert main([command, key, "--url", url]) == 1
    named = re.search(r"as of log position (\d+)", capsys.readouterr().err)
    assert written and named is not None and int(named[1]) < written[0], (named, written)


def test_a_sku_that_starts_with_a_dash_is_looked_up_after_two_dashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-KETTLE`` is a SKU the ledger takes, but ``daybook stock -KETTLE`` takes it for an
    option: it said only that the SKU was missing. It says how to give it now, and that
    way works."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger, run_projections(ledger) as runner:
        receipt = ledger.receive_stock("-KETTLE", 5)
        runner.views.stock("-KETTLE", min_position=receipt.position, timeout=10)
    with pytest.raises(SystemExit) as exit_:
        main(["stock", "-KETTLE", "--url", url])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "-KETTLE was taken for an option" in err and "daybook stock [options] -- -KETTLE" in err
    assert main(["stock", "--url", url, "--", "-KETTLE"]) == 0
    assert "-KETTLE" in capsys.readouterr().out


def test_an_abbreviated_option_gets_no_hint_about_values_starting_with_a_dash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse takes ``--ur`` for ``--url``: the SKU is simply missing, and the error says
    only that (it said ``--ur`` was taken for an option, to give after '--')."""
    for argv in (["stock", "--ur", "sqlite:///x.db"], ["stock", "--ur=sqlite:///x.db"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert "required: sku" in err and "taken for an option" not in err, err
