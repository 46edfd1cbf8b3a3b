"""Read answers at their edges: a cursor of one account sent for another, and a 404's headers."""

from __future__ import annotations

import uuid

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
