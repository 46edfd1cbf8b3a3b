"""The dashboard in a real browser (Debian's Chromium, headless, driven by Playwright) against
a real ``daybook serve``: it loads without console errors, a transfer made through the API
appears and lag returns to zero, the owner and last reconcile of each projection and the rows
a reconcile repaired are shown, a parked event is replayed from its button, a stuck saga
is listed. Screenshots of each state go to bench-results/screenshots/ (not in git); with
DAYBOOK_UPDATE_SCREENSHOT=1 the README's picture is taken from the last one."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from daybook import open_ledger
from daybook.domain.accounts import Account
from daybook.domain.orders import PlaceOrder
from daybook.domain.sagas import CancelSaga, RetryLater, RunLocalStep
from daybook.infrastructure.cli import main
from daybook.infrastructure.http.tokens import open_tokens
from daybook.infrastructure.readmodels.location import open_store
from daybook.projections import by_name
from daybook.projections.accounts import BALANCES, STATEMENT_HEADS
from daybook.projections.activity import CURRENCIES
from scripts.serve_process import ROOT, ServeProcess

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SHOTS = ROOT / "bench-results" / "screenshots"
README_SHOT = ROOT / "infrastructure" / "http" / "dashboard" / "screenshot.png"
#: How long the page may take to show what the server already knows (it polls every 2 s).
SHOWS = 30_000


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed: make test installs it (apt-get install chromium)"
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def server(pg_url: str, tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(pg_url, tmp_path / "serve.log").start()
    yield process
    process.stop()


def shot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def poisoned_deposit(url: str, account_id: str) -> None:
    """A deposit for an account the read models have never seen (as a restored backup or a
    bug could leave): account_balances cannot apply it, retries it, then parks it."""
    with open_ledger(url) as ledger:
        event = Account.Deposited(
            originator_id=account_id,
            originator_version=2,
            timestamp=datetime.now(UTC),
            amount=5,
        )
        ledger.service.recorder.insert_events([ledger.service.mapper.to_stored_event(event)])


def tamper(url: str, account_id: str) -> None:
    """Change an account's balance row behind the runner's back (drift to reconcile)."""
    store = open_store(url)
    try:
        with store.transaction():
            row = store.fetch(BALANCES, 1, (account_id,))
            assert row is not None
            store.upsert(BALANCES, 1, [{**row, "owner": "tampered"}])
    finally:
        store.close()


def restore_rows(url: str, account_id: str) -> None:
    """What an operator restores so the parked deposit can apply: the account's rows."""
    now = datetime.now(UTC).isoformat()
    balance = {
        "account_id": account_id,
        "owner": "restored",
        "currency": "EUR",
        "balance": 0,
        "held": 0,
        "available": 0,
        "overdraft_limit": 0,
        "status": "open",
        "version": 1,
        "last_event_at": now,
        "position": 0,
    }
    store = open_store(url)
    try:
        with store.transaction():
            store.upsert(BALANCES, 1, [balance])
            store.upsert(
                STATEMENT_HEADS, 1, [{"account_id": account_id, "balance": 0, "entries": 0}]
            )
            version = by_name("daily_activity").version
            store.upsert(CURRENCIES, version, [{"account_id": account_id, "currency": "EUR"}])
    finally:
        store.close()


def test_the_dashboard_shows_the_system_converge(
    pg_url: str, server: ServeProcess, browser: Browser
) -> None:
    _, secret = open_tokens(pg_url).create("dashboard-test", ["read", "write", "admin"])
    api = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {secret}"})
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(server.base_url + "/")
    page.get_by_role("textbox", name="Token").fill(secret)
    page.get_by_role("button", name="Use").click()
    expect(page.locator("#projections tbody tr").first).to_be_visible(timeout=SHOWS)
    shot(page, "1-loaded")

    # A transfer through the API: the head moves to it, and the lag comes back to zero.
    accounts = []
    for owner in ("ann", "bob"):
        answer = api.post(
            "/v1/commands/open_account",
            json={"owner": owner, "currency": "EUR"},
            headers={"Idempotency-Key": f"open-{owner}"},
        )
        accounts.append(answer.json()["account_id"])
    api.post(
        "/v1/commands/deposit",
        json={"account_id": accounts[0], "amount": 1_000},
        headers={"Idempotency-Key": "fund"},
    ).raise_for_status()
    receipt = api.post(
        "/v1/commands/transfer",
        json={"source": accounts[0], "destination": accounts[1], "amount": 250},
        headers={"Idempotency-Key": "pay"},
    ).json()
    expect(page.locator("#head")).to_have_text(f"{receipt['position']:,}", timeout=SHOWS)
    balances = page.locator("#projections tbody tr[data-projection='account_balances']")
    expect(balances.locator("td").nth(5)).to_have_text("0", timeout=SHOWS)
    page.get_by_label("Account id").fill(accounts[1])
    page.get_by_role("button", name="Balance").click()
    expect(page.locator("#lookup-result")).to_contain_text('"balance": 250', timeout=SHOWS)
    shot(page, "2-transfer")

    # Who owns each projection (the server's runner), and the last reconcile: a row changed
    # behind the runner's back is found and repaired by `daybook reconcile --repair`, which
    # records its run; the page shows the run and the repaired row.
    expect(balances.locator("td").nth(2)).to_have_text("runner")
    reconciled = balances.locator("td").nth(7)
    expect(reconciled).to_have_text("never")
    tamper(pg_url, accounts[1])
    assert main(["reconcile", "account_balances", "--url", pg_url, "--repair"]) == 0
    expect(reconciled).to_have_text(re.compile(r"^1 drifted at [\d,]+, repaired$"), timeout=SHOWS)
    repair = page.locator("#decisions tbody tr").first
    expect(repair).to_contain_text("account_balances v1")
    expect(repair).to_contain_text(accounts[1])
    assert main(["reconcile", "account_balances", "--url", pg_url]) == 0
    expect(reconciled).to_have_text(re.compile(r"^clean at [\d,]+$"), timeout=SHOWS)
    shot(page, "3-reconciled")

    # A parked event: the projections stop and say so; the operator restores the rows the
    # event needs, and replays it from each one's button.
    stranger = str(uuid4())
    poisoned_deposit(pg_url, stranger)
    names = ("account_balances", "account_statement", "daily_activity")
    buttons = {
        name: page.get_by_role(
            "button",
            name=f"Replay the parked events of {name} version {by_name(name).version}",
        )
        for name in names
    }
    for button in buttons.values():
        expect(button).to_be_visible(timeout=60_000)
    expect(balances.locator("td").nth(3)).to_have_text("stopped")
    shot(page, "4-parked")
    restore_rows(pg_url, stranger)
    for name, button in buttons.items():
        button.click()
        row = page.locator(f"#projections tbody tr[data-projection='{name}']")
        expect(row.locator("td").nth(3)).to_have_text("live", timeout=SHOWS)
        expect(row.locator("td").nth(8)).to_have_text("0", timeout=SHOWS)
    expect(balances.locator("td").nth(5)).to_have_text("0", timeout=SHOWS)

    # A saga that needs a person: its compensation kept failing.
    with open_ledger(pg_url) as ledger:
        ledger.receive_stock("KETTLE", 3)
        order = ledger.execute(PlaceOrder("order-1", accounts[0], accounts[1], [("KETTLE", 1, 90)]))
        saga = order.saga_id
        assert saga is not None
        ledger.execute(RunLocalStep(saga, "reserve-0"))
        ledger.execute(CancelSaga(saga, "dashboard test", "customer asked"))
        for attempt in range(1, 9):
            ledger.execute(
                RetryLater(
                    saga,
                    "reserve-0",
                    attempt,
                    "stock service unavailable",
                    datetime.now(UTC) + timedelta(hours=1),
                    compensating=True,
                )
            )
    stuck = page.locator("#stuck tbody tr").filter(has_text=str(saga))
    expect(stuck).to_contain_text("needs_attention", timeout=SHOWS)
    last = shot(page, "5-stuck-saga")

    assert errors == []
    if os.environ.get("DAYBOOK_UPDATE_SCREENSHOT"):
        shutil.copy(last, README_SHOT)


def test_the_page_is_usable_with_the_keyboard(server: ServeProcess, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Use"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "account"


def test_the_data_needs_a_token(server: ServeProcess) -> None:
    assert httpx.get(server.base_url + "/").status_code == 200
    answer = httpx.get(server.base_url + "/v1/dashboard")
    assert answer.status_code == 401 and answer.headers["content-type"].startswith(
        "application/problem+json"
    )
