"""Keys reused across kinds of request, repeated header fields and ids, SKUs with a "/",
tampered cursors and risk-reducing lists over HTTP: each case once answered wrongly."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from daybook.domain.values import shown
from daybook.infrastructure.http.app import HttpOptions
from tests.http.conftest import Api, make_api
from tests.http.test_api import commands_counted


def _post(api: Api, path: str, body: Any, key: str) -> httpx.Response:
    headers = {**api.auth("tester"), "Idempotency-Key": key}
    return api.run(api.client.post(path, json=body, headers=headers))


def _transfer(source: str, destination: str, amount: int) -> dict[str, Any]:
    return {
        "command": "transfer",
        "fields": {"source": source, "destination": destination, "amount": amount},
    }


def _balance(api: Api, account: str) -> int:
    answer = api.get(f"/v1/accounts/{account}/balance", min_position=api.head())
    value: int = answer.json()["balance"]
    return value


def test_a_batch_key_reused_for_a_single_command_is_a_conflict(sqlite_api: Api) -> None:
    """The same key, another payload or command: 422 idempotency_conflict, whichever came
    first (a batch's items are recorded under ids of their own: its claim on the key is what
    a single command finds)."""
    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    batch = _post(api, "/v1/batch", {"commands": [_transfer(ann, bob, 1)]}, "reused")
    assert batch.status_code == 200, batch.text

    single = _post(api, "/v1/commands/deposit", {"account_id": ann, "amount": 50}, "reused")

    assert single.status_code == 422, single.text
    assert single.json()["code"] == "idempotency_conflict"
    assert _balance(api, ann) == 99  # nothing applied by the refused request


def test_a_single_command_keyed_k_slash_n_and_a_batch_keyed_k_are_two_operations(
    sqlite_api: Api,
) -> None:
    """Two keys, two operations: a single deposit keyed "order-8/0" and a batch keyed
    "order-8" holding the same deposit shared one request id (<token>/order-8/0), so the
    second was answered as a replay of the first and never applied."""
    api = sqlite_api
    ann = api.open_account("ann")
    deposit = {"account_id": ann, "amount": 7}
    batch = {"commands": [{"command": "deposit", "fields": deposit}]}

    first = _post(api, "/v1/batch", batch, "order-8")
    single = _post(api, "/v1/commands/deposit", deposit, "order-8/0")

    assert first.status_code == single.status_code == 200, (first.text, single.text)
    assert first.json()["applied"] == 1 and single.json()["replayed"] is False
    assert first.json()["outcomes"][0]["request_id"] != single.json()["request_id"]
    assert _balance(api, ann) == 14
    # Each is still its own retry's answer.
    again = _post(api, "/v1/batch", batch, "order-8").json()
    assert again["applied"] == 0 and again["outcomes"][0]["replayed"] is True
    assert _post(api, "/v1/commands/deposit", deposit, "order-8/0").json()["replayed"] is True
    assert _balance(api, ann) == 14


def test_a_batch_keyed_k_after_single_commands_keyed_k_slash_n_is_refused_not_swallowed(
    sqlite_api: Api,
) -> None:
    """The other order: records under <token>/K/<i> and no claim on K are what a daybook
    from before batches claimed their keys left for a batch, as well as what single commands
    keyed K/<i> leave. Neither replayed (the batch never applied) nor run (a batch applied
    twice): refused, nothing applied."""
    api = sqlite_api
    ann = api.open_account("ann")
    deposit = {"account_id": ann, "amount": 7}
    assert _post(api, "/v1/commands/deposit", deposit, "order-9/0").status_code == 200

    batch = _post(
        api, "/v1/batch", {"commands": [{"command": "deposit", "fields": deposit}]}, "order-9"
    )

    assert batch.status_code == 422, batch.text
    assert batch.json()["code"] == "idempotency_conflict"
    assert "'order-9/0'" in batch.json()["detail"]
    assert _balance(api, ann) == 7


def test_a_batch_key_reused_for_a_linked_list_is_a_conflict(sqlite_api: Api) -> None:
    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    batch = _post(api, "/v1/batch", {"commands": [_transfer(ann, bob, 1)]}, "reused")
    assert batch.status_code == 200, batch.text

    linked = _post(api, "/v1/atomic", {"commands": [_transfer(ann, bob, 7)]}, "reused")

    assert linked.status_code == 422, linked.text
    assert linked.json()["code"] == "idempotency_conflict"
    assert _balance(api, ann) == 99


def _cursor(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")


def test_a_tampered_statement_cursor_is_invalid_cursor(sqlite_api: Api) -> None:
    """A cursor this server did not hand out is invalid_cursor, as on the balances route."""
    api = sqlite_api
    ann = api.open_account("ann")
    for state in ({"before": "abc"}, {"before": 0}, {"before": -5}):
        answer = api.get(f"/v1/accounts/{ann}/statement", cursor=_cursor(state))
        assert answer.status_code == 400, answer.text
        assert answer.json()["code"] == "invalid_cursor", (state, answer.json())


def test_two_idempotency_key_fields_are_refused(sqlite_api: Api) -> None:
    """Two Idempotency-Key field lines are one field "a, b" (RFC 9110 5.3), which the
    server refuses as idempotency_key_invalid when sent on one line; sent as two lines the
    first key is used silently, so whether the command runs depends on whether a proxy
    merged the lines."""
    api = sqlite_api
    ann = api.open_account("ann")
    headers = [
        *api.auth("tester").items(),
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "first"),
        ("Idempotency-Key", "second"),
    ]
    body = json.dumps({"account_id": ann, "amount": 5})
    answer = api.run(api.client.post("/v1/commands/deposit", content=body, headers=headers))

    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "idempotency_key_invalid"


def test_two_idempotency_keys_joined_by_a_bare_comma_are_refused(sqlite_api: Api) -> None:
    """A proxy may merge two key lines into one with a bare comma (RFC 9110: "a comma and
    optional whitespace"): "first,second" was taken as one key and the command applied. A
    comma inside a quoted key is part of that one key."""
    api = sqlite_api
    ann = api.open_account("ann")
    head = api.head()
    for key in ("first,second", "first,", ","):
        reply = api.command("deposit", {"account_id": ann, "amount": 5}, key=key)
        assert reply.status_code == 400, (key, reply.text)
        assert reply.json()["code"] == "idempotency_key_invalid"
    assert api.head() == head
    quoted = api.command("deposit", {"account_id": ann, "amount": 5}, key='"first,second"')
    assert quoted.status_code == 200, quoted.text
    assert quoted.json()["idempotency_key"] == "first,second"


def test_a_list_of_risk_reducing_commands_is_not_rate_limited(sqlite_api: Api) -> None:
    """Commands that reduce risk (void, release...) are never shed and never counted against
    rate limits: in a list made only of them too."""
    api = sqlite_api
    ann = api.open_account("ann")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    holds = [
        api.command("hold", {"account_id": ann, "amount": 1, "timeout": 600}).json()["hold_id"]
        for _ in range(3)
    ]
    api.token("slow", "write", rate=1)
    headers = api.auth("slow")

    def post(path: str, body: Any, key: str) -> httpx.Response:
        sent = {**headers, "Idempotency-Key": key}
        return api.run(api.client.post(path, json=body, headers=sent))

    assert post("/v1/commands/deposit", {"account_id": ann, "amount": 1}, "uses-burst").is_success
    single = post("/v1/commands/void", {"hold_id": holds[0]}, "void-0")
    assert single.status_code == 200, single.text  # a single void is never limited

    void = {"command": "void", "fields": {"hold_id": holds[1]}}
    batch = post("/v1/batch", {"commands": [void]}, "void-batch")
    assert batch.status_code == 200, batch.text
    void = {"command": "void", "fields": {"hold_id": holds[2]}}
    linked = post("/v1/atomic", {"commands": [void]}, "void-atomic")
    assert linked.status_code == 200, linked.text


def test_a_snapshot_with_a_repeated_id_counts_the_account_once(sqlite_api: Api) -> None:
    """GET /v1/balances/snapshot?ids=a,a: the same account listed twice (or once upper-case,
    once lower-case) is one account; its balance must count once in ``totals``."""
    api = sqlite_api
    ann = api.open_account("ann")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success

    answer = api.get(
        "/v1/balances/snapshot", ids=f"{ann},{ann},{ann.upper()}", min_position=api.head()
    )

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["totals"] == {"EUR": 100}, body["totals"]
    assert [b["account_id"] for b in body["balances"]] == [ann]


def test_a_sku_with_a_slash_can_be_read(sqlite_api: Api) -> None:
    """A SKU may hold "/" (1-64 letters, digits and . _ : / -): it is read as sent, or
    percent-encoded (the path is decoded before routing)."""
    api = sqlite_api
    received = api.command("receive_stock", {"sku": "TEA/GREEN", "quantity": 5})
    assert received.status_code == 200, received.text
    for path in ("/v1/stock/TEA/GREEN", "/v1/stock/TEA%2FGREEN"):
        answer = api.get(path, min_position=api.head())
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json()["on_hand"] == 5


def test_a_sku_a_url_would_read_as_another_is_refused(sqlite_api: Api) -> None:
    """Every client resolves dot segments before it sends a path (/v1/stock/A/../B is sent
    as /v1/stock/B): such a SKU could be written but never read, or read as another."""
    api = sqlite_api
    for sku in ("A/../B", "..", "A/./B", "A//B", "A/"):
        refused = api.command("receive_stock", {"sku": sku, "quantity": 2})
        assert refused.status_code == 422, (sku, refused.text)
        assert refused.json()["code"] == "invalid_sku"
    assert api.head() == 0


def _as_an_earlier_daybook_left_it(api: Api, key: str, body: Any, *, claimed: bool = True) -> None:
    """Rewrite the records of the batch ``body`` sent with ``key`` as a daybook from before
    batch items had ids of their own left them: items under <token>/<key>/<i>, and the key's
    claim as that daybook made it (``claimed``) or none (a daybook from before batches
    claimed their keys)."""
    import hashlib
    import sqlite3

    from daybook.infrastructure.eventstore import REQUESTS_TABLE
    from daybook.infrastructure.http.lists import commands_of

    fingerprints = [command.fingerprint for command in commands_of(body, 1000, "tester")]
    claim = hashlib.sha256(orjson.dumps(["batch", fingerprints])).hexdigest()

    scope = f"tester/{key}"
    items = f"tester:{key}/"
    path = api.parts.pool.any().url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        moved = db.execute(
            f"UPDATE {REQUESTS_TABLE} SET request_id = ? || substr(request_id, ?) "
            "WHERE substr(request_id, 1, ?) = ?",
            (f"{scope}/", len(items) + 1, len(items), items),
        )
        assert moved.rowcount > 0
        if claimed:
            db.execute(
                f"UPDATE {REQUESTS_TABLE} SET command = 'batch', fingerprint = ? "
                "WHERE request_id = ?",
                (claim, scope),
            )
        else:
            db.execute(f"DELETE FROM {REQUESTS_TABLE} WHERE request_id = ?", (scope,))


def test_a_key_an_earlier_batch_holds_is_counted_as_the_command_s_refusal(
    sqlite_api: Api,
) -> None:
    """A single command or linked list keyed "<key>/<i>", refused idempotency_conflict
    before the ledger has it (an earlier daybook's batch holds the key), is counted in
    daybook_commands_total as the ledger counts that code: under the command (a linked
    list under atomic), once."""
    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    body = {"commands": [_transfer(ann, bob, 1)]}
    assert _post(api, "/v1/batch", body, "old").status_code == 200
    _as_an_earlier_daybook_left_it(api, "old", body)
    refusals = [("transfer", "idempotency_conflict"), ("atomic", "idempotency_conflict")]
    before = {refusal: commands_counted(*refusal) for refusal in refusals}

    single = _post(api, "/v1/commands/transfer", body["commands"][0]["fields"], "old/0")
    linked = _post(api, "/v1/atomic", body, "old/0")

    for reply in (single, linked):
        assert reply.status_code == 422 and reply.json()["code"] == "idempotency_conflict"
    counted = {refusal: commands_counted(*refusal) - before[refusal] for refusal in refusals}
    assert counted == {refusal: 1 for refusal in refusals}


def test_a_batch_an_earlier_daybook_ran_is_replayed_under_its_items_ids(
    sqlite_api: Api,
) -> None:
    """A batch recorded before an upgrade (its items under <token>/<key>/<i>, its key claimed)
    is answered as before when sent again: nothing applied twice, and an item that left no
    record runs under the id it had. Meanwhile a single command keyed "<key>/<i>" would be
    taken for that item's retry: it is refused."""
    import sqlite3

    from daybook.infrastructure.eventstore import REQUESTS_TABLE

    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    body = {"commands": [_transfer(ann, bob, 1), _transfer(ann, bob, 2)]}
    assert _post(api, "/v1/batch", body, "old").status_code == 200
    _as_an_earlier_daybook_left_it(api, "old", body)
    path = api.parts.pool.any().url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:  # as if the second item had left no record
        db.execute(f"DELETE FROM {REQUESTS_TABLE} WHERE request_id = 'tester/old/1'")
    assert _balance(api, ann) == 97

    again = _post(api, "/v1/batch", body, "old")

    assert again.status_code == 200, again.text
    outcomes = again.json()["outcomes"]
    assert [o["replayed"] for o in outcomes] == [True, False]
    assert outcomes[1]["request_id"] == "tester/old/1"
    assert _balance(api, ann) == 95
    for key in ("old/0", "old/1"):
        single = _post(api, "/v1/commands/transfer", body["commands"][0]["fields"], key)
        assert single.status_code == 422 and single.json()["code"] == "idempotency_conflict"
        linked = _post(api, "/v1/atomic", {"commands": body["commands"][:1]}, key)
        assert linked.status_code == 422 and linked.json()["code"] == "idempotency_conflict"
    appended = _post(api, "/v1/batch", {"commands": [*body["commands"], _transfer(ann, bob, 4)]},
                     "old")  # fmt: skip
    assert appended.status_code == 422 and appended.json()["code"] == "idempotency_conflict"
    assert _balance(api, ann) == 95


def test_a_batch_claimed_now_is_another_list_to_a_server_of_an_earlier_daybook(
    sqlite_api: Api,
) -> None:
    """While servers of both run, an earlier daybook's server must not take a batch claimed
    here for its own list (it would run its items again under its own ids): the claim's
    fingerprint is not the one it computes for any list."""
    import hashlib

    from daybook.infrastructure.http.lists import commands_of

    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    body = {"commands": [_transfer(ann, bob, 1)]}
    assert _post(api, "/v1/batch", body, "new").status_code == 200

    claim = api.parts.ledger.service.recorded(["tester/new"])["tester/new"]
    fingerprints = [command.fingerprint for command in commands_of(body, 1000, "tester")]
    theirs = hashlib.sha256(orjson.dumps(["batch", fingerprints])).hexdigest()
    assert claim.command != "batch" and claim.fingerprint != theirs


def test_a_batch_recorded_before_batches_claimed_their_keys_is_refused_when_sent_again(
    sqlite_api: Api,
) -> None:
    """A batch an older daybook ran has item records under <token>/<key>/<i> and no claim,
    which single commands keyed "<key>/<i>" leave too: sent again, it is refused (it was
    applied: do not send it with a new key), nothing applied twice."""
    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    assert api.command("deposit", {"account_id": ann, "amount": 100}).is_success
    body = {"commands": [_transfer(ann, bob, 1)]}
    assert _post(api, "/v1/batch", body, "old").status_code == 200
    _as_an_earlier_daybook_left_it(api, "old", body, claimed=False)

    again = _post(api, "/v1/batch", body, "old")

    assert again.status_code == 422, again.text
    assert again.json()["code"] == "idempotency_conflict"
    assert "no retry can answer it" in again.json()["detail"]
    assert _balance(api, ann) == 99


def test_a_list_that_cannot_be_read_counts_against_the_rate(sqlite_api: Api) -> None:
    """Only a list known to be made of risk-reducing commands goes uncounted: one that
    cannot be read counts, or a token could send malformed lists without limit."""
    api = sqlite_api
    api.token("slow", "write", rate=1)
    headers = api.auth("slow")

    def post(key: str) -> httpx.Response:
        sent = {**headers, "Idempotency-Key": key}
        return api.run(api.client.post("/v1/batch", json={"commands": "none"}, headers=sent))

    assert post("bad-1").status_code in (400, 422)
    assert post("bad-2").status_code == 429


def test_a_query_parameter_given_twice_is_refused(sqlite_api: Api) -> None:
    """``?min_position=90&min_position=1``: the last one won silently, and a read that asked
    to see position 90 was answered as of an earlier one. Every parameter but the list of
    ids is now refused when repeated, and names itself."""
    api = sqlite_api
    ann = api.open_account("ann")
    head = api.head()
    path = f"/v1/accounts/{ann}/balance"
    for name, values in {
        "min_position": [head + 1000, 1],
        "timeout": [10, 0],
        "limit": [1, 500],
        "cursor": ["a", "b"],
    }.items():
        query = [(name, str(value)) for value in values]
        target = path if name in ("min_position", "timeout") else f"/v1/accounts/{ann}/statement"
        if name != "timeout":
            query.append(("timeout", "10"))
        reply = api.run(api.client.get(target, params=query, headers=api.auth("tester")))
        assert reply.status_code == 400, (name, reply.text)
        problem = reply.json()
        assert problem["code"] == "invalid_parameter", problem
        assert f"{name} is given 2 times" in problem["detail"], problem
    ids = api.get("/v1/balances/snapshot", ids=[ann, ann], min_position=head)
    assert ids.status_code == 200, ids.text  # a list: repeated on purpose


def test_a_misspelt_query_parameter_is_refused_not_ignored(sqlite_api: Api) -> None:
    """``?min_positon=N``: the misspelt parameter was ignored, and the read answered at once,
    before the write it was told to wait for, with no word of it. Refused, naming it and
    the parameters the route takes."""
    api = sqlite_api
    ann = api.open_account("ann")
    path = f"/v1/accounts/{ann}/balance"
    query = {"min_positon": api.head() + 1000, "timeout": 0}
    reply = api.run(api.client.get(path, params=query, headers=api.auth("tester")))
    assert reply.status_code == 400, reply.text
    problem = reply.json()
    assert problem["code"] == "unknown_parameter", problem
    assert problem["type"] == "/problems/unknown_parameter"
    assert "'min_positon'" in problem["detail"], problem
    assert "min_position, timeout" in problem["detail"], problem
    assert problem["details"] == {"unknown": ["min_positon"], "takes": ["min_position", "timeout"]}
    described = api.run(api.client.get("/problems/unknown_parameter"))
    assert described.status_code == 200, described.text


#: A request of every kind the server answers (method, path, and a body for a POST); each is
#: refused when it carries a query parameter its route does not define.
_EVERY_ROUTE: list[tuple[str, str, Any]] = [
    ("POST", "/v1/commands/open_account", {"owner": "ann", "currency": "EUR"}),
    ("POST", "/v1/atomic", {"commands": [{"command": "open_account", "fields": {}}]}),
    ("POST", "/v1/batch", {"commands": [{"command": "open_account", "fields": {}}]}),
    ("POST", "/v1/projections/account_balances/resume", None),
    ("GET", f"/v1/accounts/{'0' * 8}-0000-0000-0000-{'0' * 12}/balance", None),
    ("GET", f"/v1/accounts/{'0' * 8}-0000-0000-0000-{'0' * 12}/statement", None),
    ("GET", "/v1/balances", None),
    ("GET", "/v1/balances/snapshot", None),
    ("GET", "/v1/stock/SKU-1", None),
    ("GET", "/v1/activity", None),
    ("GET", "/v1/status", None),
    ("GET", "/v1/dashboard", None),
    ("GET", "/metrics", None),
    ("GET", "/health", None),
    ("GET", "/problems/overloaded", None),
    ("GET", "/", None),
    ("GET", "/dashboard/dashboard.js", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
]


def test_every_route_refuses_a_query_parameter_it_does_not_define(sqlite_api: Api) -> None:
    api = sqlite_api
    head = api.head()
    for method, path, body in _EVERY_ROUTE:
        headers = {**api.auth("tester"), "Idempotency-Key": api.key()}
        reply = api.run(
            api.client.request(method, path, params={"bogus": "1"}, json=body, headers=headers)
        )
        assert reply.status_code == 400, (path, reply.status_code, reply.text[:300])
        assert reply.json()["code"] == "unknown_parameter", (path, reply.text)
    assert api.head() == head  # no command ran
    # The page Swagger UI's OAuth2 login returns to takes the identity provider's parameters.
    returned = api.run(api.client.get("/docs/oauth2-redirect", params={"code": "c", "state": "s"}))
    assert returned.status_code == 200, returned.text[:300]


def test_a_huge_unknown_parameter_is_not_echoed_whole(sqlite_api: Api) -> None:
    api = sqlite_api
    huge = "n" * 5_000
    names = {huge: "1", **{f"n{i}": "1" for i in range(500)}}
    reply = api.run(api.client.get("/v1/balances", params=names, headers=api.auth("tester")))
    assert reply.status_code == 400, reply.text[:300]
    assert reply.json()["code"] == "unknown_parameter"
    assert len(reply.content) < 2_000, len(reply.content)
    assert "(5002 characters)" in reply.json()["detail"]
    assert "501 unknown" in reply.json()["detail"]


def test_daybook_min_position_given_twice_is_refused(sqlite_api: Api) -> None:
    """Two ``Daybook-Min-Position`` header lines (a client's and a proxy's, say): the first
    won silently, and a read that asked to wait for position 999999 was answered at once,
    as if it had read its writes."""
    api = sqlite_api
    ann = api.open_account("ann")
    assert api.get(f"/v1/accounts/{ann}/balance", min_position=api.head()).status_code == 200
    headers = [
        *api.auth("tester").items(),
        ("Daybook-Min-Position", "1"),
        ("Daybook-Min-Position", "999999"),
    ]
    reply = api.run(
        api.client.get(f"/v1/accounts/{ann}/balance", params={"timeout": 0}, headers=headers)
    )
    assert reply.status_code == 400, reply.text
    problem = reply.json()
    assert problem["code"] == "invalid_parameter", problem
    assert "Daybook-Min-Position is given 2 times" in problem["detail"], problem


def test_a_huge_bad_value_is_not_echoed_whole(sqlite_api: Api) -> None:
    """An owner name of half a megabyte came back whole in the refusal, in its message
    and again in its details."""
    api = sqlite_api
    reply = api.command("open_account", {"owner": "a\n" * 250_000, "currency": "EUR"})
    assert reply.status_code == 422, reply.text[:300]
    assert reply.json()["code"] == "invalid_request"
    assert len(reply.content) < 2_000, len(reply.content)
    listed = _post(
        api,
        "/v1/batch",
        {
            "commands": [
                {"command": "open_account", "fields": {"owner": "b\n" * 250_000, "currency": "EUR"}}
            ]
        },
        "huge",
    )
    assert listed.status_code == 422, listed.text[:300]
    assert len(listed.content) < 2_000, len(listed.content)


def _post_text(api: Api, path: str, content: str, key: str) -> httpx.Response:
    headers = {**api.auth("tester"), "Idempotency-Key": key, "Content-Type": "application/json"}
    return api.run(api.client.post(path, content=content, headers=headers))


def test_a_huge_name_is_not_echoed_whole(sqlite_api: Api) -> None:
    """Names a client sent were echoed whole: an unknown argument (in the message and again
    in the details), a member repeated, an unknown command in a list; and every unknown
    argument of a body of many."""
    api = sqlite_api
    account = api.open_account("ann")
    huge = "n" * 500_000
    unknown = _post_text(
        api, "/v1/commands/deposit", json.dumps({"account_id": account, "amount": 1, huge: 1}), "1"
    )
    repeated = _post_text(
        api,
        "/v1/commands/deposit",
        f'{{"account_id": "{account}", "amount": 1, "{huge}": 1, "{huge}": 2}}',
        "2",
    )
    command = _post_text(
        api, "/v1/batch", json.dumps({"commands": [{"command": huge, "fields": {}}]}), "3"
    )
    many = _post_text(
        api,
        "/v1/commands/deposit",
        json.dumps({"account_id": account, "amount": 1, **{f"n{i}": 1 for i in range(50_000)}}),
        "4",
    )
    replies = {"unknown": unknown, "repeated": repeated, "command": command, "many": many}
    sizes = {name: (reply.status_code, len(reply.content)) for name, reply in replies.items()}
    assert [status for status, _ in sizes.values()] == [422, 400, 422, 422], sizes
    assert all(size < 2_000 for _, size in sizes.values()), sizes
    assert "(500002 characters)" in unknown.json()["detail"]
    assert unknown.json()["details"]["unknown"] == [shown(huge)]
    assert "(500002 characters)" in repeated.json()["detail"]
    assert "(500002 characters)" in command.json()["detail"]
    assert "50000 unknown" in many.json()["detail"], many.json()["detail"]
    assert len(many.json()["details"]["unknown"]) == 10
    memo = api.command("deposit", {"account_id": account, "amount": 1, "memo": "x"})
    assert memo.json()["details"]["unknown"] == ["memo"]  # a short name as it was sent


def test_a_huge_content_type_is_not_echoed_whole(sqlite_api: Api) -> None:
    """The Content-Type of a body that is not JSON came back whole in the refusal's
    message, however long the client made it."""
    api = sqlite_api
    media = "text/plain; x=" + "y" * 60_000
    headers = {**api.auth("tester"), "Idempotency-Key": "1", "Content-Type": media}
    reply = api.run(api.client.post("/v1/commands/deposit", content=b"{}", headers=headers))
    assert reply.status_code == 415, reply.text[:300]
    assert reply.json()["code"] == "unsupported_media_type"
    assert len(reply.content) < 2_000, len(reply.content)
    assert shown(media) in reply.json()["detail"]


def test_an_empty_min_position_is_refused_not_ignored(sqlite_api: Api) -> None:
    """``?min_position=`` (a client's template with nothing filled in) was taken for no
    position at all: the read was answered at once, and a ``Daybook-Min-Position`` header
    won over the query, which the README says wins."""
    api = sqlite_api
    ann = api.open_account("ann")
    path = f"/v1/accounts/{ann}/balance"
    empty = api.run(
        api.client.get(path, params={"min_position": "", "timeout": 0}, headers=api.auth("tester"))
    )
    assert empty.status_code == 400, empty.text
    assert empty.json()["code"] == "invalid_parameter"
    assert "min_position" in empty.json()["detail"]
    both = api.run(
        api.client.get(
            path,
            params={"min_position": "", "timeout": 0},
            headers={**api.auth("tester"), "Daybook-Min-Position": "1"},
        )
    )
    assert both.status_code == 400, both.text


def test_what_a_not_found_echoes_is_cut_short(sqlite_api: Api) -> None:
    """A problem code and a path of any length came back whole in a 404's detail; and the
    name of a projection to resume."""
    api = sqlite_api
    huge = "x" * 5_000
    replies = [
        api.run(api.client.get(f"/problems/{huge}")),
        api.run(api.client.get(f"/nothing/{huge}")),
        api.run(api.client.post(f"/v1/projections/{huge}/resume", headers=api.auth("tester"))),
    ]
    assert [reply.status_code for reply in replies] == [404, 404, 404], replies
    for reply in replies:
        detail = reply.json()["detail"]
        assert len(detail) < 400 and "(5" in detail, detail


def test_resuming_a_version_that_is_not_stopped_answers_illegal_transition(
    sqlite_api: Api,
) -> None:
    """The README's code for it (the dashboard's resume answered ``invalid_request``)."""
    api = sqlite_api
    ann = api.open_account("ann")
    assert api.get(f"/v1/accounts/{ann}/balance", min_position=api.head()).status_code == 200
    reply = api.run(
        api.client.post("/v1/projections/account_balances/resume", headers=api.auth("tester"))
    )
    assert reply.status_code == 422, reply.text
    assert reply.json()["code"] == "illegal_transition", reply.text
    assert "cannot resume a live version" in reply.json()["detail"], reply.text


def test_a_path_the_client_sent_is_echoed_cut_short_in_every_refusal(sqlite_api: Api) -> None:
    # The README: "like any value it echoes, a name the client sent ... is cut to 80
    # characters of its quoted form, saying its length". A 405 and the dashboard's 404
    # repeated the whole path, however long.
    long = "x" * 5000
    answers = [
        sqlite_api.run(
            sqlite_api.client.delete(f"/v1/stock/{long}", headers=sqlite_api.auth("tester"))
        ),
        sqlite_api.run(sqlite_api.client.get(f"/dashboard/{long}")),
    ]
    for reply in answers:
        assert reply.status_code in (404, 405), reply.text[:200]
        assert len(reply.json()["detail"]) < 300, (reply.status_code, len(reply.json()["detail"]))


def test_risk_reducing_commands_that_reduce_nothing_count_against_the_rate(
    tmp_path: Path,
) -> None:
    """A token limited to 2 requests a second sent, in one instant, 10 lists of 1,000 voids
    of holds that do not exist: each was let in over the rate (risk-reducing commands are not
    limited), each void refused `hold_not_found`, nothing released, and each left a request
    record for the retention window: 10,000 rows the limit was meant to bound. Such a request
    counts after all: past one burst of them over the rate, the token is limited. (Lists of
    100 here: the count of requests let in is what matters.)"""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(token_rate=2.0))
    api.app.state.limits.clock = lambda: 100.0  # time stands still: only the count matters
    try:
        statuses = []
        for _ in range(10):
            body = {
                "commands": [
                    {"command": "void", "fields": {"hold_id": str(uuid.uuid4())}}
                    for _ in range(100)
                ]
            }
            headers = {**api.auth("tester"), "Idempotency-Key": str(uuid.uuid4())}
            reply = api.run(api.client.post("/v1/batch", json=body, headers=headers))
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                codes = {o["problem"]["code"] for o in reply.json()["outcomes"]}
                assert codes == {"hold_not_found"}, codes
            else:
                assert reply.json()["code"] == "rate_limited", reply.text
        # Two within the rate's burst, two more over it, then limited.
        assert statuses == [200] * 4 + [429] * 6, statuses
        single = api.command("void", {"hold_id": str(uuid.uuid4())})
        assert single.status_code == 429, single.text
    finally:
        api.close()


def _holds(api: Api, count: int) -> list[str]:
    ann = api.open_account("ann")
    assert api.command("deposit", {"account_id": ann, "amount": 1000}).is_success
    return [
        api.command("hold", {"account_id": ann, "amount": 1, "timeout": 600}).json()["hold_id"]
        for _ in range(count)
    ]


def _together(api: Api, sends: list[Any]) -> list[int]:
    async def all_at_once() -> list[httpx.Response]:
        return list(await asyncio.gather(*sends))

    return [reply.status_code for reply in api.run(all_at_once())]


def test_risk_reducing_requests_that_reduce_nothing_are_bounded_over_time(
    tmp_path: Path,
) -> None:
    """Such requests sent together all get in (none is counted before it ends: voids that
    release something must never wait on each other), and are counted as they end: the
    token's next one is refused until the debt is paid back at its rate. A single void that
    cannot even be read counts too."""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(token_rate=2.0))
    api.app.state.limits.clock = lambda: 100.0  # time stands still: only the count matters

    def voids() -> Any:
        commands = [{"command": "void", "fields": {"hold_id": str(uuid.uuid4())}}] * 100
        headers = {**api.auth("tester"), "Idempotency-Key": str(uuid.uuid4())}
        return api.client.post("/v1/batch", json={"commands": commands}, headers=headers)

    try:
        assert _together(api, [voids() for _ in range(10)]) == [200] * 10
        assert _together(api, [voids()]) == [429]
    finally:
        api.close()
    api = make_api(f"sqlite:///{tmp_path}/other.db", HttpOptions(token_rate=2.0))
    api.app.state.limits.clock = lambda: 100.0
    try:
        unreadable = [api.command("void", {"hold_id": "nope"}).status_code for _ in range(6)]
        assert unreadable == [422] * 4 + [429] * 2, unreadable
    finally:
        api.close()


def test_risk_reducing_requests_that_reduce_something_are_never_limited(tmp_path: Path) -> None:
    """Ten voids of real holds sent together by a token at 2 requests a second all get in,
    and a deposit sent with them is not refused for them; voids refused because the server
    is stopping are not the caller's to count."""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db")
    try:
        holds = _holds(api, 16)
        bob = api.open_account("bob")
        api.token("slow", "write", rate=2)
        api.app.state.limits.clock = lambda: 100.0
        sends = [api.send_command("void", {"hold_id": h}, who="slow") for h in holds[:10]]
        sends.append(api.send_command("deposit", {"account_id": bob, "amount": 1}, who="slow"))
        assert _together(api, sends) == [200] * 11
        api.run(api.parts.ledger.close())
        stopping = [api.command("void", {"hold_id": h}, who="slow").status_code for h in holds[10:]]
        assert stopping == [503] * 6, stopping
    finally:
        api.close()
