"""Bad arguments to the read-model queries get ``invalid_request`` (or ``invalid_sku``) with
a message naming the argument, before anything is read: no driver error, and no quiet
answer to a question nobody asked (a page of nothing, a statement without a limit)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from daybook import open_ledger, run_projections
from daybook.domain.errors import DomainError
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.urls import BadURL
from daybook.projections.accounts import ACCOUNT_BALANCES as BALANCES

TABLE = "account_balances"


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReadModels, str]]:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('reads'))}/daybook.db"
    with open_ledger(url) as ledger:
        account = str(ledger.open_account("ann", "EUR").account_id)
        receipt = ledger.deposit(account, 100)
        ledger.receive_stock("KETTLE", 5)
        with run_projections(ledger, url) as runner:
            runner.views.balance(account, min_position=receipt.position, timeout=30)
    with ReadModels(url) as read_models:
        yield read_models, account


BAD: list[tuple[str, Callable[[ReadModels, str], Any], str, str]] = [
    ("balance id", lambda v, a: v.balance("nope"), "invalid_request", "account_id"),
    ("balances id", lambda v, a: v.balances([a, "nope"]), "invalid_request", "account id"),
    ("balances text", lambda v, a: v.balances(a), "invalid_request", "account_ids"),
    ("balances number", lambda v, a: v.balances(5), "invalid_request", "account_ids"),
    ("page limit 0", lambda v, a: v.balance_page(limit=0), "invalid_request", "limit"),
    ("page limit text", lambda v, a: v.balance_page(limit="5"), "invalid_request", "limit"),
    ("page after", lambda v, a: v.balance_page(after="zz"), "invalid_request", "after"),
    ("statement id", lambda v, a: v.statement("nope"), "invalid_request", "account_id"),
    ("statement limit", lambda v, a: v.statement(a, limit=-1), "invalid_request", "limit"),
    ("before_seq", lambda v, a: v.statement(a, before_seq=0), "invalid_request", "before_seq"),
    ("days", lambda v, a: v.daily_activity(days=-3), "invalid_request", "days"),
    ("days text", lambda v, a: v.daily_activity(days="7"), "invalid_request", "days"),
    (
        "today",
        lambda v, a: v.daily_activity(today=datetime.now(UTC)),
        "invalid_request",
        "today",
    ),
    (
        "days before year 1",
        lambda v, a: v.daily_activity(today=date(1, 1, 3), days=5),
        "invalid_request",
        "days",
    ),
    ("sku", lambda v, a: v.stock("no spaces allowed"), "invalid_sku", "SKU"),
    ("min_position", lambda v, a: v.balance(a, min_position=-1), "invalid_request", "min_position"),
    ("timeout", lambda v, a: v.balance(a, timeout=float("nan")), "invalid_request", "timeout"),
    ("timeout text", lambda v, a: v.balances(timeout="2"), "invalid_request", "timeout"),
    # The generic queries, for read models without queries of their own:
    ("row table", lambda v, a: v.row(BALANCES, "balancez", (a,)), "invalid_request", "table"),
    ("rows table", lambda v, a: v.rows(BALANCES, "balancez"), "invalid_request", "table"),
    ("count table", lambda v, a: v.count(BALANCES, "balancez"), "invalid_request", "table"),
    ("count by", lambda v, a: v.count(BALANCES, TABLE, by="ownr"), "invalid_request", "by"),
    ("row key text", lambda v, a: v.row(BALANCES, TABLE, a), "invalid_request", "key"),
    ("row key empty", lambda v, a: v.row(BALANCES, TABLE, ()), "invalid_request", "key"),
    ("row key long", lambda v, a: v.row(BALANCES, TABLE, (a, a)), "invalid_request", "key"),
]


@pytest.mark.parametrize(("query", "code", "named"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_argument_is_refused_with_a_code_and_its_name(
    views: tuple[ReadModels, str], query: Callable[[ReadModels, str], Any], code: str, named: str
) -> None:
    read_models, account = views
    with pytest.raises(DomainError) as refused:
        query(read_models, account)
    assert refused.value.code == code
    assert named in str(refused.value)


def test_the_generic_queries_answer_good_arguments(views: tuple[ReadModels, str]) -> None:
    read_models, account = views
    found = read_models.row(BALANCES, TABLE, (account,)).value
    assert found is not None and found["balance"] == 100
    assert read_models.count(BALANCES, TABLE, by="currency").value == {"EUR": 1}


def test_ids_in_any_form_find_the_same_row(views: tuple[ReadModels, str]) -> None:
    read_models, account = views
    upper = read_models.balance(account.upper())
    assert upper is not None and upper.balance == 100
    page = read_models.balances([account.upper()])
    assert [str(b.account_id) for b in page.balances] == [account] and page.missing == ()
    assert [e.amount for e in read_models.statement(account.upper()).entries] == [100]


def test_a_read_model_path_in_a_missing_folder_is_refused_not_created(tmp_path: Path) -> None:
    read_models = ReadModels(f"sqlite:///{tmp_path}/typo/daybook.db")
    with pytest.raises(BadURL, match="does not exist"):
        read_models.balance("0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b", timeout=0)
    read_models.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", [5, None, ["sqlite:///x.db"]], ids=repr)
def test_a_read_model_url_that_is_not_text_is_refused(url: object) -> None:
    read_models = ReadModels(url)  # type: ignore[arg-type]  # what a careless caller passes
    with pytest.raises(BadURL, match="a store URL is text"):
        read_models.balance("0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b", timeout=0)
    read_models.close()
