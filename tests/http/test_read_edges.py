"""Read answers at their edges: a cursor of one account sent for another, and a 404's headers."""

from __future__ import annotations

import uuid

import httpx

from tests.http.conftest import Api
from tests.http.test_api import assert_problem


def test_a_statement_cursor_of_one_account_is_refused_for_another(sqlite_api: Api) -> None:
    """A statement's cursor holds only an entry number, not the account it pages: handed to
    another account's statement it was taken, and that account's page started in the middle
    (its newest entries silently skipped)."""
    api = sqlite_api
    ann, bob = api.open_account("ann"), api.open_account("bob")
    for amount in range(1, 6):
        api.command("deposit", {"account_id": ann, "amount": amount})
    for amount in range(10, 16):
        api.command("deposit", {"account_id": bob, "amount": amount})
    first = api.get(f"/v1/accounts/{ann}/statement", limit=2, min_position=api.head()).json()
    assert first["next_cursor"] is not None
    reply = api.get(f"/v1/accounts/{bob}/statement", limit=2, cursor=first["next_cursor"])
    assert_problem(reply, 400, "invalid_cursor")


def test_a_404_carries_the_position_headers_as_every_read_answer_does(sqlite_api: Api) -> None:
    """The README: every read answer carries ``Daybook-As-Of-Position`` and
    ``Daybook-Lag-Events``; a 404 named its position only in its body."""
    api = sqlite_api
    api.open_account()
    reply = api.get(f"/v1/accounts/{uuid.uuid4()}/balance", min_position=api.head())
    assert reply.status_code == 404
    named = assert_problem(reply, 404, "not_found")["details"]["as_of_position"]
    assert reply.headers.get("daybook-as-of-position") == str(named)
    assert "daybook-lag-events" in reply.headers


def test_a_malformed_id_in_ids_is_an_invalid_parameter_as_too_many_ids_are(
    sqlite_api: Api,
) -> None:
    """Every query parameter's bad value (limit, days, timeout, min_position, a count of
    ids past the bound) is 400 invalid_parameter; an id of ``ids`` that is no UUID was a
    command's 422 invalid_request."""
    api = sqlite_api
    ann = api.open_account()
    too_many = api.get("/v1/balances/snapshot", ids=",".join([ann] * 1001))
    assert (too_many.status_code, too_many.json()["code"]) == (400, "invalid_parameter")
    malformed = api.get("/v1/balances/snapshot", ids=f"{ann},not-a-uuid")
    assert (malformed.status_code, malformed.json()["code"]) == (400, "invalid_parameter")
    assert "not-a-uuid" in malformed.json()["detail"]


def test_min_position_in_the_query_and_the_header_disagreeing_is_refused(
    sqlite_api: Api,
) -> None:
    """Two values for one setting, neither may silently win: the query's 0 was read at
    once, without waiting for the write the header names. The same value twice is fine."""
    api = sqlite_api
    ann = api.open_account()
    head = api.head()

    def read(query: int | str, header: int, timeout: float = 0) -> httpx.Response:
        return api.run(
            api.client.get(
                f"/v1/accounts/{ann}/balance",
                params={"min_position": query, "timeout": timeout},
                headers={**api.auth("tester"), "Daybook-Min-Position": str(header)},
            )
        )

    both = read(0, head + 1000)
    assert (both.status_code, both.json()["code"]) == (400, "invalid_parameter"), both.text
    assert "Daybook-Min-Position" in both.json()["detail"]
    assert read(head, head, timeout=10).status_code == 200
    assert read(f"0{head}", head, timeout=10).status_code == 200  # one position, two ways
