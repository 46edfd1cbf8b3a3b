"""The dashboard shows amounts past 2**53 exactly (its JavaScript read them as doubles)."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, expect

from daybook.infrastructure.http.tokens import open_tokens
from scripts.serve_process import ServeProcess
from tests.integration.test_dashboard import SHOWS, browser, server

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
__all__ = ["browser", "server"]


def test_a_large_hold_is_shown_exactly(pg_url: str, server: ServeProcess, browser: Browser) -> None:
    """The API sends 9223372036854775807 exactly; the page shows what JSON.parse made of it."""
    from daybook import open_ledger

    _, secret = open_tokens(pg_url).create("big", ["read"])
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "JPY").account_id
        ledger.deposit(account, 2**63 - 1)
        hold_id = ledger.hold(account, 2**63 - 1, timeout=3_600).hold_id
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill(secret)
    page.get_by_role("button", name="Use").click()
    row = page.locator("#holds tbody tr", has_text=str(hold_id))
    expect(row.locator("td").nth(3)).to_have_text("JPY", timeout=SHOWS)
    expect(row.locator("td").nth(2)).to_have_text("9,223,372,036,854,775,807", timeout=2_000)
    page.close()


def test_a_large_balance_looked_up_is_shown_exactly(
    pg_url: str, server: ServeProcess, browser: Browser
) -> None:
    """The balance lookup prints the answer as JSON: a balance read exactly (a BigInt)
    must be printed as the number it is, not fail or turn into a string."""
    from daybook import open_ledger

    _, secret = open_tokens(pg_url).create("big-lookup", ["read"])
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("bob", "JPY").account_id
        at = ledger.deposit(account, 2**63 - 1).position
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill(secret)
    page.get_by_role("button", name="Use").click()
    expect(page.locator("#head")).to_have_text(f"{at:,}", timeout=SHOWS)
    page.get_by_role("textbox", name="Account id").fill(str(account))
    page.get_by_role("textbox", name="Account id").press("Enter")
    expect(page.locator("#lookup-result")).to_contain_text(
        '"balance": 9223372036854775807', timeout=SHOWS
    )
    page.close()
