"""Lists of commands over HTTP: ``POST /v1/atomic`` (all-or-nothing) and ``POST /v1/batch``
(one outcome per command), with the Idempotency-Key answers of a single command."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from daybook.infrastructure.http import lists
from daybook.infrastructure.http.app import HttpOptions
from tests.http.conftest import Api, make_api
from tests.http.test_api import assert_problem, commands_counted


def post(api: Api, path: str, body: Any, key: str | None = "list-1") -> httpx.Response:
    headers = api.auth("tester")
    if key is not None:
        headers["Idempotency-Key"] = key
    return api.run(api.client.post(path, json=body, headers=headers))


def item(command: str, **fields: Any) -> dict[str, Any]:
    return {"command": command, "fields": fields}


def balance(api: Api, account: str) -> int:
    answer = api.get(f"/v1/accounts/{account}/balance", min_position=api.head()).json()
    value: int = answer["balance"]
    return value


@pytest.fixture
def accounts(api: Api) -> tuple[str, str]:
    ann, bob = api.open_account("ann"), api.open_account("bob")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    return ann, bob


# -- /v1/atomic -----------------------------------------------------------------------------


def test_a_linked_list_applies_every_command_and_answers_each_receipt(
    api: Api, accounts: tuple[str, str]
) -> None:
    ann, bob = accounts
    body = {
        "commands": [
            item("transfer", source=ann, destination=bob, amount=60),
            item("withdraw", account_id=bob, amount=10),
        ]
    }
    reply = post(api, "/v1/atomic", body)
    assert reply.status_code == 200, reply.text
    receipt = reply.json()
    assert receipt["command"] == "atomic" and receipt["idempotency_key"] == "list-1"
    assert [part["command"] for part in receipt["linked"]] == ["transfer", "withdraw"]
    assert receipt["linked"][0]["transfer_id"] and receipt["linked"][1]["account_id"] == bob
    assert reply.headers["daybook-position"] == str(receipt["position"])
    assert (balance(api, ann), balance(api, bob)) == (40, 50)

    again = post(api, "/v1/atomic", body)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == {**receipt, "replayed": True, "linked": [
        {**part, "replayed": True} for part in receipt["linked"]
    ]}  # fmt: skip
    head = api.head()
    other = {"commands": body["commands"][:1]}
    assert_problem(post(api, "/v1/atomic", other), 422, "idempotency_conflict")
    assert api.head() == head and (balance(api, ann), balance(api, bob)) == (40, 50)


def test_a_refused_linked_list_writes_nothing_and_names_the_command(
    api: Api, accounts: tuple[str, str]
) -> None:
    ann, bob = accounts
    head = api.head()
    body = {
        "commands": [
            item("transfer", source=ann, destination=bob, amount=60),
            item("withdraw", account_id=bob, amount=500),
        ]
    }
    problem = assert_problem(post(api, "/v1/atomic", body), 409, "insufficient_funds")
    assert problem["details"]["index"] == 1
    codes = [outcome["code"] for outcome in problem["details"]["outcomes"]]
    assert codes == ["linked_command_failed", "insufficient_funds"]
    assert api.head() == head and balance(api, ann) == 100
    # A retry gets the original refusal.
    assert_problem(post(api, "/v1/atomic", body), 409, "insufficient_funds")


def test_a_linked_list_creating_a_sku_on_an_id_it_opened_an_account_with_is_409(
    api: Api,
) -> None:
    from daybook.domain.values import inventory_id

    head = api.head()
    body = {
        "commands": [
            item(
                "open_account",
                owner="mallory",
                currency="EUR",
                account_id=str(inventory_id("SKU-Y")),
            ),
            item("receive_stock", sku="SKU-Y", quantity=5),
        ]
    }
    problem = assert_problem(post(api, "/v1/atomic", body), 409, "id_taken")
    assert problem["details"]["index"] == 1 and "another SKU" in problem["detail"]
    assert api.head() == head


# -- /v1/batch ------------------------------------------------------------------------------


def test_a_batch_answers_one_outcome_per_command_in_order(
    api: Api, accounts: tuple[str, str]
) -> None:
    ann, bob = accounts
    body = {
        "commands": [
            item("deposit", account_id=bob, amount=5),
            item("withdraw", account_id=bob, amount=1_000),
            item("transfer", source=ann, destination=bob, amount=30),
            item("hold", account_id=ann, amount=20, timeout=60),
        ]
    }
    reply = post(api, "/v1/batch", body, key="batch-1")
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    outcomes = answer["outcomes"]
    assert [o["index"] for o in outcomes] == [0, 1, 2, 3]
    assert [o["status"] for o in outcomes] == [200, 409, 200, 200]
    assert outcomes[1]["problem"]["code"] == "insufficient_funds"
    assert outcomes[1]["problem"]["type"] == "/problems/insufficient_funds"
    assert outcomes[0]["request_id"] == "tester:batch-1/0"
    assert outcomes[2]["transfer_id"] and outcomes[3]["hold_id"]
    assert (answer["applied"], answer["refused"]) == (3, 1)
    assert answer["position"] == outcomes[3]["position"] == int(reply.headers["daybook-position"])
    assert (balance(api, ann), balance(api, bob)) == (70, 35)

    # The same key and list: every item's original outcome, nothing applied again.
    head = api.head()
    again = post(api, "/v1/batch", body, key="batch-1").json()
    assert api.head() == head
    assert [o["status"] for o in again["outcomes"]] == [200, 409, 200, 200]
    assert all(o["replayed"] for o in again["outcomes"] if o["status"] == 200)
    assert again["outcomes"][3]["hold_id"] == outcomes[3]["hold_id"]
    assert again["applied"] == 0


@pytest.mark.parametrize(
    "change",
    [
        lambda cs: [cs[0], {**cs[1], "fields": {**cs[1]["fields"], "amount": 6}}],  # changed
        lambda cs: cs[:1],  # removed
    ],
    ids=["changed", "removed"],
)
def test_the_same_key_with_another_batch_is_refused_and_applies_nothing(
    api: Api, accounts: tuple[str, str], change: Any
) -> None:
    ann, _ = accounts
    commands = [
        item("deposit", account_id=ann, amount=5),
        item("deposit", account_id=ann, amount=5),
    ]
    assert post(api, "/v1/batch", {"commands": commands}, key="b").is_success
    head = api.head()
    reply = post(api, "/v1/batch", {"commands": change(commands)}, key="b")
    assert_problem(reply, 422, "idempotency_conflict")
    assert api.head() == head and balance(api, ann) == 110


def test_a_key_used_for_a_single_command_is_refused_for_a_batch(
    api: Api, accounts: tuple[str, str]
) -> None:
    ann, _ = accounts
    assert api.command("deposit", {"account_id": ann, "amount": 5}, key="one").is_success
    head = api.head()
    body = {"commands": [item("deposit", account_id=ann, amount=5)]}
    assert_problem(post(api, "/v1/batch", body, key="one"), 422, "idempotency_conflict")
    assert api.head() == head


def test_a_batch_sent_again_with_items_appended_runs_the_new_items(
    api: Api, accounts: tuple[str, str]
) -> None:
    """The same list with items appended: the first items' outcomes, and the appended items
    run as new commands (it was refused, idempotency_conflict with nothing changed)."""
    ann, _ = accounts
    first = [item("deposit", account_id=ann, amount=1), item("deposit", account_id=ann, amount=2)]
    assert post(api, "/v1/batch", {"commands": first}, key="grow").is_success
    longer = [*first, item("deposit", account_id=ann, amount=4)]

    again = post(api, "/v1/batch", {"commands": longer}, key="grow")

    assert again.status_code == 200, again.text
    assert [o["replayed"] for o in again.json()["outcomes"]] == [True, True, False]
    assert again.json()["applied"] == 1 and balance(api, ann) == 107
    # The longer list is the one its key answers now; the first, shorter, is another list.
    head = api.head()
    assert post(api, "/v1/batch", {"commands": longer}, key="grow").json()["applied"] == 0
    problem = assert_problem(post(api, "/v1/batch", {"commands": first}, key="grow"), 422,
                             "idempotency_conflict")  # fmt: skip
    assert "fewer" in problem["detail"]
    changed = [*first, item("deposit", account_id=ann, amount=5)]
    problem = assert_problem(post(api, "/v1/batch", {"commands": changed}, key="grow"), 422,
                             "idempotency_conflict")  # fmt: skip
    assert problem["details"]["changed"] == [2]
    assert api.head() == head and balance(api, ann) == 107


def test_a_batch_key_in_use_is_409(api: Api, accounts: tuple[str, str]) -> None:
    ann, _ = accounts
    in_flight: set[str] = api.app.state.commands.in_flight
    in_flight.add("tester/busy")
    body = {"commands": [item("deposit", account_id=ann, amount=5)]}
    for path in ("/v1/batch", "/v1/atomic"):
        assert_problem(post(api, path, body, key="busy"), 409, "idempotency_key_in_use")
    in_flight.discard("tester/busy")
    assert post(api, "/v1/batch", body, key="busy").is_success


@pytest.mark.parametrize("path", ["/v1/atomic", "/v1/batch"])
def test_a_list_longer_than_the_command_capacity_is_refused_for_good(
    tmp_path: Any, path: str
) -> None:
    """A server admits --command-capacity commands at once: a longer list was refused
    503 overloaded with Retry-After on an idle server, every time, and its client retried
    for ever. It is refused as too long, for good; one of risk-reducing commands only is
    never shed, and runs."""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(command_capacity=4))
    try:
        ann = api.open_account("ann")
        deposits = [item("deposit", account_id=ann, amount=1)] * 5
        for _ in range(2):
            problem = assert_problem(post(api, path, {"commands": deposits}), 422,
                                     "invalid_request")  # fmt: skip
            assert problem["details"] == {"limit": 4, "count": 5}
            assert "--command-capacity" in problem["detail"]
        assert post(api, path, {"commands": deposits[:4]}, key="fits").is_success
        assert balance(api, ann) == 4
        unknown = "00000000-0000-0000-0000-000000000009"
        releases = [item("release_reservation", sku="TEA", reservation_id=unknown)] * 5
        reply = post(api, path, {"commands": releases}, key="releases")
        assert reply.status_code in (200, 404), reply.text  # run: no such reservation
        status = api.run(api.client.get("/v1/status", headers=api.auth("tester"))).json()
        assert status["admission"]["command"]["in_progress"] == 0
    finally:
        api.close()


@pytest.mark.parametrize("path", ["/v1/atomic", "/v1/batch"])
def test_the_tokens_name_is_the_actor_of_every_event_a_list_writes(
    api: Api, accounts: tuple[str, str], path: str
) -> None:
    """As for a single command: the events of a linked list recorded no actor at all."""
    ann, bob = accounts
    api.token("checkout", "write")
    body = {
        "commands": [
            item("transfer", source=ann, destination=bob, amount=30),
            item("hold", account_id=ann, amount=20, timeout=60),
        ]
    }
    headers = {**api.auth("checkout"), "Idempotency-Key": "pay-1"}
    reply = api.run(api.client.post(path, json=body, headers=headers))
    assert reply.status_code == 200, reply.text
    store = api.parts.ledger.service.repository.event_store
    written = [*list(store.get(uuid.UUID(ann)))[2:], *list(store.get(uuid.UUID(bob)))[1:]]
    assert len(written) == 3, written  # out, hold placed; in
    assert {e.meta.actor for e in written} == {"checkout"}


# -- bad input, for both --------------------------------------------------------------------

ACCOUNT = "00000000-0000-0000-0000-000000000005"


@pytest.mark.parametrize("path", ["/v1/atomic", "/v1/batch"])
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ([], 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ({"commands": []}, 422, "invalid_request"),
        ({"commands": "deposit"}, 422, "invalid_request"),
        ({"commands": [item("deposit", amount=5)], "extra": 1}, 422, "invalid_request"),
        ({"commands": ["deposit"]}, 422, "invalid_request"),
        ({"commands": [{"fields": {}}]}, 422, "invalid_request"),
        ({"commands": [item("no_such_command")]}, 422, "invalid_request"),
        ({"commands": [item("atomic", commands=[])]}, 422, "invalid_request"),
        ({"commands": [{"command": "deposit", "fields": {}, "x": 1}]}, 422, "invalid_request"),
        ({"commands": [item("deposit", account_id=ACCOUNT)]}, 422, "invalid_request"),
        (
            {"commands": [item("deposit", account_id=ACCOUNT, amount=5, memo="x")]},
            422,
            "invalid_request",
        ),
        (
            {"commands": [item("deposit", account_id=ACCOUNT, amount=5, request_id="r")]},
            422,
            "invalid_request",
        ),
        (
            {"commands": [item("deposit", account_id=ACCOUNT, amount=12.5)]},
            422,
            "invalid_amount",
        ),
    ],
)
def test_a_list_that_cannot_be_read_is_refused_whole(
    api: Api, accounts: tuple[str, str], path: str, body: Any, status: int, code: str
) -> None:
    ann, _ = accounts
    head = api.head()
    if isinstance(body, dict) and isinstance(body.get("commands"), list) and body["commands"]:
        # A good command first: it must not be applied either.
        body = {**body, "commands": [item("deposit", account_id=ann, amount=1), *body["commands"]]}
    problem = assert_problem(post(api, path, body), status, code)
    if code == "invalid_amount":
        assert problem["details"]["index"] == 1
    assert api.head() == head


@pytest.mark.parametrize("path", ["/v1/atomic", "/v1/batch"])
def test_a_list_item_refused_on_its_fields_is_counted_once_under_its_command(
    api: Api, accounts: tuple[str, str], path: str
) -> None:
    ann, bob = accounts
    body = {
        "commands": [
            item("deposit", account_id=ann, amount=1),
            item("transfer", source=ann, destination=bob, amount=0),
        ]
    }
    before = commands_counted("transfer", "invalid_amount"), commands_counted("deposit", "ok")
    assert_problem(post(api, path, body), 422, "invalid_amount")
    after = commands_counted("transfer", "invalid_amount"), commands_counted("deposit", "ok")
    assert after == (before[0] + 1, before[1])  # the good item did not run


@pytest.mark.parametrize("path", ["/v1/atomic", "/v1/batch"])
def test_lists_need_a_key_json_and_a_bounded_length(
    api: Api, accounts: tuple[str, str], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann, _ = accounts
    head = api.head()
    body = {"commands": [item("deposit", account_id=ann, amount=1)] * 3}
    assert_problem(post(api, path, body, key=None), 400, "idempotency_key_missing")
    headers = {**api.auth("tester"), "Idempotency-Key": "k", "Content-Type": "application/json"}
    malformed = api.run(api.client.post(path, content=b'{"commands": [', headers=headers))
    assert_problem(malformed, 400, "malformed_json")
    monkeypatch.setattr(lists, "MAX_BATCH", 2)
    monkeypatch.setattr(lists, "MAX_LINKED", 2)
    problem = assert_problem(post(api, path, body), 422, "invalid_request")
    assert problem["details"] == {"limit": 2, "count": 3}
    assert api.head() == head


def test_the_openapi_document_describes_both_and_their_idempotency(api: Api) -> None:
    paths = api.run(api.client.get("/openapi.json")).json()["paths"]
    for path in ("/v1/atomic", "/v1/batch"):
        operation = paths[path]["post"]
        assert any(
            p["name"] == "Idempotency-Key" and p["required"] for p in operation["parameters"]
        )
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["commands"] and schema["properties"]["commands"]["maxItems"]
        assert "idempotency_conflict" in operation["description"]
    assert "`<token>:<Idempotency-Key>/<i>`" in paths["/v1/batch"]["post"]["description"]
    atomic = paths["/v1/atomic"]["post"]["responses"]["200"]["content"]["application/json"]
    assert atomic["schema"] == {"$ref": "#/components/schemas/Receipt"}


def test_a_batch_of_the_longest_list_fits_the_default_body_limit(
    api: Api, accounts: tuple[str, str]
) -> None:
    """A server on its defaults takes the longest list it accepts: every transfer of it,
    written as a caller would (ids in full, a request key), fits in the body limit."""
    ann, bob = accounts
    body = {
        "commands": [
            item("transfer", source=ann, destination=bob, amount=1, transfer_id=str(uuid.uuid4()))
            for _ in range(lists.MAX_BATCH)
        ]
    }
    reply = post(api, "/v1/batch", body, key="longest")
    assert reply.status_code == 200, reply.text
    statuses = [o["status"] for o in reply.json()["outcomes"]]
    assert statuses.count(200) == 100 and statuses.count(409) == lists.MAX_BATCH - 100


def test_a_batch_with_the_longest_token_name_and_key_runs(api: Api) -> None:
    """A token name has up to 64 characters and a key up to 128: item ids of the form
    ``<token>:<key>/<i>`` fit a request id's 200 (a first form, ``<token>:batch/<key>/<i>``,
    did not, and every such batch was refused about a request id the client never sent)."""
    token = "t" * 64
    api.token(token, "read", "write")
    ann = api.open_account("ann")
    headers = {**api.auth(token), "Idempotency-Key": "k" * 128}
    items = [{"command": "deposit", "fields": {"account_id": ann, "amount": 5}}] * 1000
    reply = api.run(api.client.post("/v1/batch", json={"commands": items}, headers=headers))
    assert reply.status_code == 200, reply.text
    outcomes = reply.json()["outcomes"]
    assert [o["status"] for o in outcomes] == [200] * 1000
    assert outcomes[-1]["request_id"] == f"{token}:{'k' * 128}/999"


def test_a_batch_refused_409_takes_no_key_from_the_command_still_in_progress(
    api: Api, accounts: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single command with key K is in the server (its commit is slow); a batch sent with
    K meanwhile is answered ``409 idempotency_key_in_use`` ("retry once it has been
    answered"). It must leave nothing behind: the command in progress, sent first, is then
    applied, and the batch's retry is the one refused. The batch claimed K in the store
    before it looked at the keys in progress, so the command was refused
    ``422 idempotency_conflict`` ("already used for a http_batch") and the batch, retried,
    was applied in its place."""
    ann, _ = accounts
    ledger = api.parts.ledger
    release = asyncio.Event()
    execute = ledger.execute

    async def slow(command: Any) -> Any:
        await release.wait()  # a commit that takes a while (a busy database)
        return await execute(command)

    monkeypatch.setattr(ledger, "execute", slow)
    batch = {"commands": [item("deposit", account_id=ann, amount=7)]}
    headers = {**api.auth("tester"), "Idempotency-Key": "K"}

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        single = asyncio.ensure_future(
            api.client.post(
                "/v1/commands/deposit", json={"account_id": ann, "amount": 5}, headers=headers
            )
        )
        while "tester/K" not in api.app.state.commands.in_flight:
            await asyncio.sleep(0.001)
        second = await api.client.post("/v1/batch", json=batch, headers=headers)
        release.set()
        return await single, second

    single, second = api.run(scenario())
    assert_problem(second, 409, "idempotency_key_in_use")
    assert single.status_code == 200, single.text
    assert balance(api, ann) == 105
