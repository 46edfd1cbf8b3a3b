"""What ``/v1/dashboard`` answers about the projections: their owner from the read-model
catalog, the last reconcile run, and the rows reconcile repaired (the browser test,
``tests/integration/test_dashboard.py``, checks that the page shows them)."""

from __future__ import annotations

from typing import Any

from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.location import open_store
from daybook.projections.accounts import BALANCES
from tests.http.conftest import Api


def projection(api: Api, name: str) -> dict[str, Any]:
    view = api.get("/v1/dashboard").json()
    found: dict[str, Any] = next(p for p in view["projections"] if p["name"] == name)
    return found


def test_the_dashboard_shows_owners_the_last_reconcile_and_its_repairs(
    sqlite_api: Api, tmp_path: Any
) -> None:
    api = sqlite_api
    account = api.open_account("ann")
    deposit = api.command("deposit", {"account_id": account, "amount": 5}).json()
    api.get(f"/v1/accounts/{account}/balance", min_position=deposit["position"])
    balances = projection(api, "account_balances")
    assert (balances["owner"], balances["last_reconcile"]) == ("runner", None)
    assert api.get("/v1/dashboard").json()["decisions"] == []

    url = api.parts.readmodels_url
    assert url is not None
    store = open_store(url)
    try:
        with store.transaction():
            row = store.fetch(BALANCES, 1, (account,))
            assert row is not None
            store.upsert(BALANCES, 1, [{**row, "owner": "tampered"}])
    finally:
        store.close()
    ledger_url = f"sqlite:///{tmp_path}/ledger.db"
    assert main(["reconcile", "account_balances", "--url", ledger_url, "--repair"]) == 0

    last = projection(api, "account_balances")["last_reconcile"]
    assert {k: last[k] for k in ("result", "position", "drift", "error")} == {
        "result": "repaired",
        "position": deposit["position"],
        "drift": 1,
        "error": None,
    }
    assert last["at"] and account in last["drifts"][0]
    [decision] = api.get("/v1/dashboard").json()["decisions"]
    assert decision["projection"] == "account_balances v1" and decision["row"] == account
    assert decision["table"] == "account_balances" and decision["change"] == "different"

    assert main(["reconcile", "account_balances", "--url", ledger_url]) == 0
    assert projection(api, "account_balances")["last_reconcile"]["result"] == "clean"
    assert projection(api, "account_statement")["last_reconcile"] is None
