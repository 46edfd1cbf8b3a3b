"""The dashboard in a real browser, where what it promises goes past what
test_dashboard.py drives: keyboard use of the replay button while the page polls, why a
projection stopped, the token never leaving the page in a URL, polling one request at a
time, a hold's currency, and amounts past 2**53 shown exactly (its JavaScript read them as
doubles). (One module: the server and the browser start once for all of them.)"""

from __future__ import annotations

from uuid import uuid4

import pytest
from playwright.sync_api import Browser, expect

from daybook.infrastructure.http.tokens import open_tokens
from daybook.projections import by_name
from scripts.serve_process import ServeProcess
from tests.integration.test_dashboard import SHOWS, browser, poisoned_deposit, server

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
__all__ = ["browser", "server"]


def test_a_stopped_projection_can_be_replayed_with_the_keyboard_and_says_why(
    pg_url: str, server: ServeProcess, browser: Browser
) -> None:
    _, secret = open_tokens(pg_url).create("keyboard", ["read", "admin"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill(secret)
    page.get_by_role("button", name="Use").click()
    poisoned_deposit(pg_url, str(uuid4()))
    version = by_name("account_balances").version
    button = page.get_by_role(
        "button", name=f"Replay the parked events of account_balances version {version}"
    )
    expect(button).to_be_visible(timeout=60_000)
    row = page.locator("#projections tbody tr[data-projection='account_balances']")
    expect(row.locator("td").nth(3)).to_have_text("stopped", timeout=SHOWS)
    # Why it stopped: /v1/dashboard sends it (the projection's error); the page shows it.
    expect(page.locator("#projections")).to_contain_text("unknown account", timeout=5_000)

    # Keyboard only: Tab from "Use" reaches the first replay button; the next polls
    # (every 2 s) must not take the focus away before Enter is pressed.
    page.get_by_role("button", name="Use").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Replay parked"
    page.wait_for_timeout(4_500)
    assert page.evaluate("document.activeElement.textContent") == "Replay parked", (
        "focus moved to " + page.evaluate("document.activeElement.tagName")
    )


def test_the_token_never_goes_into_a_url(server: ServeProcess, browser: Browser) -> None:
    """Before the page's script has run (a slow link: it is deferred) or when it did not
    load, Enter in the token field submits the form as HTML does: a GET of the page with
    the form's named fields in the query string, into the history and a proxy's log."""
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill("dbk_not-a-real-secret")
    page.get_by_role("textbox", name="Token").press("Enter")
    page.wait_for_load_state()
    assert "dbk_not-a-real-secret" not in page.url
    context.close()


#: In the page before its own script: /v1/dashboard answered slowly (``mode`` "slow": 5 s,
#: 200 with the server's answer) or refused (``mode`` "down": 503 with Retry-After: 10),
#: counting the requests sent and the most ever in flight at once.
_FAKE_SERVER = """
window.__polls = { sent: 0, inFlight: 0, most: 0 };
const realFetch = window.fetch.bind(window);
window.fetch = async (path, options) => {
  if (!String(path).includes("/v1/dashboard")) return realFetch(path, options);
  const polls = window.__polls;
  polls.sent += 1; polls.inFlight += 1; polls.most = Math.max(polls.most, polls.inFlight);
  try {
    if (window.__mode === "down") {
      return new Response(JSON.stringify({ code: "unavailable", detail: "the database is down" }),
        { status: 503, headers: { "Retry-After": "10", "Content-Type": "application/json" } });
    }
    await new Promise((done) => setTimeout(done, 5000));
    return await realFetch(path, options);
  } finally {
    polls.inFlight -= 1;
  }
};
"""


@pytest.mark.parametrize("mode", ["slow", "down"])
def test_the_page_polls_one_at_a_time_and_waits_as_the_server_asks(
    pg_url: str, server: ServeProcess, browser: Browser, mode: str
) -> None:
    """The page polled every 2 s whatever happened: answers slower than that piled up
    (each a read-model connection the server holds), and a server answering 503 with
    Retry-After was asked again every 2 s; the page showed its last figures as if current."""
    _, secret = open_tokens(pg_url).create(f"poll-{mode}", ["read"])
    context = browser.new_context()
    context.add_init_script(f"window.__mode = {mode!r};" + _FAKE_SERVER)
    page = context.new_page()
    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill(secret)
    page.get_by_role("button", name="Use").click()
    page.wait_for_timeout(8_000)
    polls = page.evaluate("window.__polls")
    assert polls["most"] == 1, f"polls in flight at once: {polls}"
    if mode == "down":
        # The first poll (the token's) and the page's own first: then Retry-After's 10 s.
        assert polls["sent"] <= 2, f"asked again before Retry-After: {polls}"
        expect(page.locator("#updated")).to_contain_text("not current")
    context.close()


def test_a_hold_expiring_soon_is_shown_with_its_currency(
    pg_url: str, server: ServeProcess, browser: Browser
) -> None:
    """Amounts are minor units of the hold's currency: 500 means nothing without it."""
    from daybook import open_ledger

    _, secret = open_tokens(pg_url).create("holds", ["read"])
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "JPY").account_id
        ledger.deposit(account, 9_000)
        hold_id = ledger.hold(account, 777, timeout=3_600).hold_id
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill(secret)
    page.get_by_role("button", name="Use").click()
    row = page.locator("#holds tbody tr", has_text=str(hold_id))
    expect(row).to_contain_text("777", timeout=SHOWS)
    expect(row.locator("td").nth(3)).to_have_text("JPY")
    page.close()


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
