"""The HTTP API on every backend: commands with idempotency keys, problem+json refusals that
change nothing, consistency tokens, snapshot reads and cursors."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import sqlite3
import threading
import time
import uuid
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from eventsourcing.persistence import OperationalError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from daybook.domain.commands import Receipt, registered
from daybook.infrastructure.bootstrap import http_parts
from daybook.infrastructure.eventstore import REQUESTS_TABLE
from daybook.infrastructure.http import reads
from daybook.infrastructure.http.app import HttpOptions
from daybook.infrastructure.http.problems import PROBLEM_JSON
from daybook.infrastructure.http.tokens import open_tokens
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.observability.logs import JsonFormatter
from daybook.infrastructure.readmodels import ReadModelChanged, ReadModels
from daybook.infrastructure.settings import Settings
from daybook.projections.accounts import ACCOUNT_BALANCES, ACCOUNT_STATEMENT, DEPOSITED
from daybook.projections.model import LogEvent, Rows
from tests.http.conftest import Api, make_api
from tests.pg_locks import events_table
from tests.stack import collector_short_of_stack


def assert_problem(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = reply.json()
    assert body["code"] == code and body["status"] == status
    assert body["type"] == f"/problems/{code}"
    assert body["title"] and body["detail"]
    assert "Traceback" not in reply.text
    return body


# -- the bad-input matrix -------------------------------------------------------------------

BIG = 2**63


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"amount": 12.5}, "invalid_amount"),  # a float
        ({"amount": 100.0}, "invalid_amount"),  # a float that looks whole
        ({"amount": "100"}, "invalid_amount"),  # a numeric string
        ({"amount": BIG}, "invalid_amount"),  # just past 2**63-1
        ({"amount": 2**64}, "invalid_amount"),  # past 64 bits (orjson would make it a float)
        ({"amount": 10**30}, "invalid_amount"),
        ({"amount": True}, "invalid_amount"),  # a boolean
        ({"amount": 0}, "invalid_amount"),
        ({"amount": -5}, "invalid_amount"),
        ({"amount": None}, "invalid_amount"),
        ({"amount": [1]}, "invalid_amount"),
        ({}, "invalid_request"),  # missing field
        ({"amount": 5, "memo": "x"}, "invalid_request"),  # unknown field
        ({"amount": 5, "request_id": "mine"}, "invalid_request"),  # set by the server
        ({"amount": 5, "actor": "someone-else"}, "invalid_request"),  # set by the server
        ({"amount": 5, "correlation_id": ""}, "invalid_request"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(api: Api, body: dict[str, Any], code: str) -> None:
    account = api.open_account()
    head = api.head()
    reply = api.command("deposit", {"account_id": account, **body})
    assert_problem(reply, 422, code)
    assert api.head() == head


def commands_counted(command: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "daybook_commands_total", {"command": command, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"amount": -5}, "invalid_amount"),  # refused as the command is built
        ({"amount": 5, "memo": "x"}, "invalid_request"),  # an argument it does not take
    ],
)
def test_a_command_refused_on_its_fields_is_counted_like_any_refusal(
    sqlite_api: Api, body: dict[str, Any], code: str
) -> None:
    """daybook_commands_total counts a command the server could not build from the body as
    it counts one the ledger refused: by command and code."""
    account = sqlite_api.open_account()
    before = commands_counted("deposit", code)
    reply = sqlite_api.command("deposit", {"account_id": account, **body})
    assert_problem(reply, 422, code)
    assert commands_counted("deposit", code) == before + 1
    scraped = sqlite_api.run(
        sqlite_api.client.get("/metrics", headers=sqlite_api.auth("tester"))
    ).text
    assert f'daybook_commands_total{{command="deposit",outcome="{code}"}}' in scraped


def test_a_command_name_no_command_has_is_not_counted(sqlite_api: Api) -> None:
    """An unknown command, in the path or a list, is refused but not counted under the name
    the client sent: each name would be a series of daybook_commands_total for the life of
    the server (the HTTP metrics count the request, by route)."""
    name = "no_such_command"
    headers = {**sqlite_api.auth("tester"), "Idempotency-Key": sqlite_api.key()}
    path = f"/v1/commands/{name}"
    reply = sqlite_api.run(sqlite_api.client.post(path, json={}, headers=headers))
    assert reply.status_code == 404, reply.text
    listed = {"commands": [{"command": name, "fields": {}}]}
    headers["Idempotency-Key"] = sqlite_api.key()
    reply = sqlite_api.run(sqlite_api.client.post("/v1/batch", json=listed, headers=headers))
    assert_problem(reply, 422, "invalid_request")
    counted = [
        sample
        for family in metrics.COMMANDS.collect()
        for sample in family.samples
        if sample.labels.get("command") == name
    ]
    assert counted == []


def test_a_request_that_names_no_command_fields_is_not_counted_as_a_command(
    sqlite_api: Api,
) -> None:
    """A body that is not JSON, or a missing key, is a request the server could not read:
    counted in the HTTP metrics, never as a command."""
    account = sqlite_api.open_account()
    before = {code: commands_counted("deposit", code) for code in ("malformed_json",)}
    headers = {**sqlite_api.auth("tester"), "Idempotency-Key": sqlite_api.key()}
    headers["Content-Type"] = "application/json"
    raw = b'{"account_id": "' + account.encode() + b'", "amount": 5'
    reply = sqlite_api.run(
        sqlite_api.client.post("/v1/commands/deposit", content=raw, headers=headers)
    )
    assert_problem(reply, 400, "malformed_json")
    assert {code: commands_counted("deposit", code) for code in before} == before


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code"),
    [
        (b'{"amount": 5', "application/json", 400, "malformed_json"),
        (b'{"amount": NaN}', "application/json", 400, "malformed_json"),
        (b'{"amount": 5, "amount": 500000}', "application/json", 400, "malformed_json"),
        (b"\xff\xfe{}", "application/json", 400, "malformed_json"),
        (b"", "application/json", 400, "malformed_json"),
        (b"[1, 2]", "application/json", 422, "invalid_request"),  # not an object
        (
            b'{"amount": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
            "application/json",
            400,
            "malformed_json",
        ),
        (b'{"amount": ' + b"9" * 5_000 + b"}", "application/json", 400, "malformed_json"),
        (b'{"amount": 5}', "text/plain", 415, "unsupported_media_type"),
        (b'{"amount": 5}', "", 415, "unsupported_media_type"),
        (b"amount=5", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"pad": "' + b"x" * 1_100_000 + b'"}', "application/json", 413, "payload_too_large"),
    ],
)
def test_malformed_bodies_are_refused_and_write_nothing(
    api: Api, raw: bytes, content_type: str, status: int, code: str
) -> None:
    api.open_account()
    head = api.head()
    headers = {**api.auth("tester"), "Idempotency-Key": api.key()}
    if content_type:
        headers["Content-Type"] = content_type
    reply = api.run(api.client.post("/v1/commands/deposit", content=raw, headers=headers))
    assert_problem(reply, status, code)
    assert api.head() == head


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/commands/deposit", b'{"amount": 5, "\\ud800": 1}'),
        ("/v1/atomic", b'{"commands": [{"command": "deposit", "fields": {"\\udfff": 1}}]}'),
        ("/v1/batch", b'{"commands": [{"command": "deposit", "fields": {"\\udfff": 1}}]}'),
    ],
)
def test_a_member_named_by_a_lone_surrogate_is_refused_by_name(
    api: Api, path: str, raw: bytes
) -> None:
    """JSON may escape a lone surrogate, which UTF-8 cannot hold: the refusal that names the
    member still answers (it was a 500, the problem failing to encode)."""
    head = api.head()
    headers = {**api.auth("tester"), "Idempotency-Key": api.key()}
    headers["Content-Type"] = "application/json"
    reply = api.run(api.client.post(path, content=raw, headers=headers))
    body = assert_problem(reply, 422, "invalid_request")
    assert "has no argument" in body["detail"]
    assert api.head() == head


def test_a_body_too_deep_or_a_number_too_long_is_told_in_the_clients_terms(api: Api) -> None:
    headers = {**api.auth("tester"), "Content-Type": "application/json"}
    bodies = {
        b'{"amount": ' + b"[" * 30_000 + b"]" * 30_000 + b"}": "nested too deeply",
        b'{"amount": ' + b"9" * 5_000 + b"}": "more than 100 digits",
    }
    for raw, said in bodies.items():
        sent = {**headers, "Idempotency-Key": api.key()}
        reply = api.run(api.client.post("/v1/commands/deposit", content=raw, headers=sent))
        body = assert_problem(reply, 400, "malformed_json")
        assert said in body["detail"] and "sys." not in body["detail"]


def test_a_body_nested_too_deep_is_refused_without_using_up_the_stack(api: Api) -> None:
    """The standard library's parser, which reads command bodies, recurses once per level
    of nesting: a body 30,000 deep took it to the interpreter's recursion limit before it
    was refused, and any Python code the collector ran meanwhile (a finalizer: a client's
    body could make the server's clean-ups fail) found no stack left. Refused before it is
    parsed; nesting that a command has (a batch's fields) still goes through."""
    headers = {**api.auth("tester"), "Content-Type": "application/json"}
    deep = b'{"amount": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    for raw in (deep, deep.replace(b"[", b'{"a": ').replace(b"]", b"}")):
        sent = {**headers, "Idempotency-Key": api.key()}
        with collector_short_of_stack() as short:
            reply = api.run(api.client.post("/v1/commands/deposit", content=raw, headers=sent))
        body = assert_problem(reply, 400, "malformed_json")
        assert "nested too deeply" in body["detail"] and not short, body
    # Brackets in a string are not nesting, nor are escaped quotes the string's end.
    owner = '\\" [[[' + "{" * 120
    items = [{"command": "open_account", "fields": {"owner": owner, "currency": "EUR"}}]
    sent = {**headers, "Idempotency-Key": api.key()}
    reply = api.run(api.client.post("/v1/batch", json={"commands": items}, headers=sent))
    assert reply.status_code == 200, reply.text
    assert reply.json()["applied"] == 1, reply.text
    # Nor are a UTF-16 body's bytes (U+0122 and U+015B hold a quote's and a bracket's).
    owner = "Ģ" + "ś" * 70
    raw = json.dumps({"owner": owner, "currency": "EUR"}, ensure_ascii=False).encode("utf-16")
    sent = {**headers, "Idempotency-Key": api.key()}
    reply = api.run(api.client.post("/v1/commands/open_account", content=raw, headers=sent))
    assert reply.status_code == 200, reply.text


def test_a_number_of_more_than_100_digits_is_malformed_with_or_without_a_sign(api: Api) -> None:
    account = api.open_account()
    headers = {**api.auth("tester"), "Content-Type": "application/json"}
    refused = {"9" * 100: 422, "-" + "9" * 100: 422, "9" * 101: 400, "-" + "9" * 101: 400}
    for number, status in refused.items():
        raw = f'{{"account_id": "{account}", "amount": {number}}}'.encode()
        sent = {**headers, "Idempotency-Key": api.key()}
        reply = api.run(api.client.post("/v1/commands/deposit", content=raw, headers=sent))
        assert_problem(reply, status, "invalid_amount" if status == 422 else "malformed_json")


def test_an_oversized_body_without_a_length_is_refused_as_it_arrives(api: Api) -> None:
    head = api.head()

    async def chunks() -> Any:
        for _ in range(1100):
            yield b"x" * 1024

    headers = {**api.auth("tester"), "Idempotency-Key": "k", "Content-Type": "application/json"}
    reply = api.run(api.client.post("/v1/commands/deposit", content=chunks(), headers=headers))
    assert_problem(reply, 413, "payload_too_large")
    assert api.head() == head


def test_a_body_that_stops_arriving_is_refused_not_waited_for_for_ever(tmp_path: Any) -> None:
    # A client gone mid-upload without closing its connection: its request held the server
    # (and a SIGTERM, which waits for every request in progress) for as long as it stayed.
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(body_timeout=0.5))
    head = api.head()

    async def stalls() -> Any:
        yield b'{"account_id": '
        await asyncio.sleep(3600)
        yield b"}"

    async def send() -> httpx.Response:
        headers = {**api.auth("tester"), "Idempotency-Key": "k", "Content-Type": "application/json"}
        post = api.client.post("/v1/commands/deposit", content=stalls(), headers=headers)
        return await asyncio.wait_for(post, 10)

    try:
        try:
            reply = api.run(send())
        except TimeoutError:
            pytest.fail("a request whose body stalled was still waiting for it 10 s later")
        assert_problem(reply, 408, "request_timeout")
        assert api.head() == head
    finally:
        api.close()


def test_a_body_that_trickles_is_refused_once_it_falls_below_the_minimum_rate(
    tmp_path: Any,
) -> None:
    """Each part in time, a byte every 0.1 s: the request was held for as long as the client
    kept trickling (up to ``max_body_bytes`` parts). The body may take ``body_timeout``
    seconds, plus one per ``BODY_MIN_RATE`` bytes received."""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(body_timeout=0.5))
    head = api.head()

    async def trickles() -> Any:
        yield b'{"account_id": '
        while True:  # the server gives up first, or the client does
            await asyncio.sleep(0.1)
            yield b" "

    async def send() -> httpx.Response:
        headers = {**api.auth("tester"), "Idempotency-Key": "k", "Content-Type": "application/json"}
        post = api.client.post("/v1/commands/deposit", content=trickles(), headers=headers)
        return await asyncio.wait_for(post, 30)

    try:
        try:
            reply = api.run(send())
        except TimeoutError:
            pytest.fail("a body trickling a byte every 0.1 s was still read 30 s later")
        body = assert_problem(reply, 408, "request_timeout")
        assert "slower than 500 bytes/s" in body["detail"], body
        assert api.head() == head
    finally:
        api.close()


def test_a_domain_refusal_is_problem_json_with_its_code_and_numbers(api: Api) -> None:
    account = api.open_account()
    reply = api.command("withdraw", {"account_id": account, "amount": 500})
    body = assert_problem(reply, 409, "insufficient_funds")
    assert body["details"]["available"] == 0 and body["details"]["amount"] == 500
    assert "500" in body["detail"]
    missing = api.command("deposit", {"account_id": str(uuid.uuid4()), "amount": 5})
    assert_problem(missing, 404, "account_not_found")


# -- every registered command is served ----------------------------------------------------


def test_every_public_command_has_a_route_and_a_schema(api: Api) -> None:
    document = api.run(api.client.get("/openapi.json")).json()
    offered = [c for c in registered() if c.public and c.name != "atomic"]
    assert len(offered) >= 18
    for command_class in offered:
        path = document["paths"][f"/v1/commands/{command_class.name}"]["post"]
        schema = path["requestBody"]["content"]["application/json"]["schema"]
        assert "request_id" not in schema["properties"] and "actor" not in schema["properties"]
        assert any(p["name"] == "Idempotency-Key" and p["required"] for p in path["parameters"])
    assert api.run(api.client.get("/docs")).status_code == 200
    order = document["paths"]["/v1/commands/place_order"]["post"]["requestBody"]
    lines = order["content"]["application/json"]["schema"]["properties"]["lines"]
    assert lines["type"] == "array"  # a list of [sku, quantity, unit_price], not a string
    line = lines["items"]
    assert [item["type"] for item in line["prefixItems"]] == ["string", "integer", "integer"]
    assert line["minItems"] == line["maxItems"] == 3


#: What only daybook's own services send: the saga processor's record that a step ran (a
#: gateway charged) and the payment reconciler's records; and linked commands, which have a
#: route of their own (``/v1/atomic``).
NOT_OFFERED = [
    "run_local_step",
    "complete_remote_step",
    "fail_step",
    "retry_later",
    "fire_saga_deadline",
    "run_local_compensation",
    "complete_remote_compensation",
    "record_reconciliation",
]


def test_commands_only_daybooks_services_send_are_not_offered_over_http(api: Api) -> None:
    """A token that may write must not be able to say that a payment step succeeded: the
    order would complete, its hold captured and its stock shipped, with nothing charged."""
    assert {c.name for c in registered() if not c.public} == set(NOT_OFFERED)
    account = api.open_account()
    head = api.head()
    fields = {"saga_id": str(uuid.uuid4()), "step": "charge", "result": {"charged": "x"}}
    document = api.run(api.client.get("/openapi.json")).json()
    for name in [*NOT_OFFERED, "atomic"]:
        assert f"/v1/commands/{name}" not in document["paths"]
        assert api.command(name, fields).status_code == 404
    for name in NOT_OFFERED:
        for path in ("/v1/batch", "/v1/atomic"):
            body = {
                "commands": [
                    {"command": "deposit", "fields": {"account_id": account, "amount": 5}},
                    {"command": name, "fields": fields},
                ]
            }
            headers = {**api.auth("tester"), "Idempotency-Key": api.key()}
            reply = api.run(api.client.post(path, json=body, headers=headers))
            problem = assert_problem(reply, 422, "invalid_request")
            assert "not over HTTP" in problem["detail"]
    assert api.head() == head


def test_the_stock_commands_work_over_http(api: Api) -> None:
    assert api.command("receive_stock", {"sku": "SKU-1", "quantity": 10}).status_code == 200
    reserved = api.command("reserve_stock", {"sku": "SKU-1", "quantity": 3}).json()
    committed = api.command(
        "commit_reservation",
        {"sku": "SKU-1", "reservation_id": reserved["reservation_id"], "quantity": 2},
    )
    assert committed.status_code == 200, committed.text
    stock = api.get("/v1/stock/SKU-1", min_position=committed.json()["position"]).json()
    assert (stock["on_hand"], stock["reserved"], stock["available"]) == (8, 0, 8)


# -- every receipt field is answered -------------------------------------------------------


def test_a_hold_and_its_capture_answer_every_receipt_field(api: Api) -> None:
    payer, payee = api.open_account("ann"), api.open_account("bob")
    api.command("deposit", {"account_id": payer, "amount": 500})
    body = {"account_id": payer, "amount": 200, "destination": payee, "timeout": 60}
    held = api.command("hold", body)
    assert held.status_code == 200, held.text
    hold = held.json()
    assert hold["account_id"] == payer and uuid.UUID(hold["hold_id"])
    assert "transfer_id" not in hold and "linked" not in hold  # unset fields are left out
    captured = api.command("capture", {"hold_id": hold["hold_id"], "amount": 150})
    assert captured.status_code == 200, captured.text
    capture = captured.json()
    assert capture["hold_id"] == hold["hold_id"] and capture["account_id"] == payer
    assert uuid.UUID(capture["transfer_id"])
    assert capture["command"] == "capture" and capture["position"] > hold["position"]


def test_an_order_answers_its_saga_id(api: Api) -> None:
    customer, merchant = api.open_account("ann"), api.open_account("shop")
    api.command("receive_stock", {"sku": "KETTLE", "quantity": 3})
    body = {
        "order_id": "o-1",
        "customer": customer,
        "merchant": merchant,
        "lines": [["KETTLE", 1, 90]],
    }
    placed = api.command("place_order", body, key="order-1")
    assert placed.status_code == 200, placed.text
    assert uuid.UUID(placed.json()["saga_id"]) and placed.json()["account_id"] == customer
    again = api.command("place_order", body, key="order-1")
    assert again.json() == {**placed.json(), "replayed": True}


def test_the_receipt_schema_names_every_receipt_field(api: Api) -> None:
    document = api.run(api.client.get("/openapi.json")).json()
    schema = document["components"]["schemas"]["Receipt"]
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Receipt)}
    assert schema["properties"]["linked"]["items"] == {"$ref": "#/components/schemas/Receipt"}
    answer = document["paths"]["/v1/commands/hold"]["post"]["responses"]["200"]
    parts = answer["content"]["application/json"]["schema"]["allOf"]
    assert {"$ref": "#/components/schemas/Receipt"} in parts


# -- idempotency keys -----------------------------------------------------------------------


def test_the_same_key_and_payload_replay_the_original_receipt(api: Api) -> None:
    account = api.open_account()
    first = api.command("deposit", {"account_id": account, "amount": 700}, key="pay-1")
    again = api.command("deposit", {"account_id": account, "amount": 700}, key='"pay-1"')
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true" and again.json()["replayed"] is True
    assert {**again.json(), "replayed": False} == {**first.json(), "replayed": False}
    assert (
        api.get(f"/v1/accounts/{account}/balance", min_position=first.json()["position"]).json()[
            "balance"
        ]
        == 700
    )


def test_the_same_key_with_another_payload_is_refused_as_the_draft_says(api: Api) -> None:
    account = api.open_account()
    api.command("deposit", {"account_id": account, "amount": 700}, key="pay-1")
    head = api.head()
    other = api.command("deposit", {"account_id": account, "amount": 701}, key="pay-1")
    assert_problem(other, 422, "idempotency_conflict")
    command = api.command("withdraw", {"account_id": account, "amount": 700}, key="pay-1")
    assert_problem(command, 422, "idempotency_conflict")
    assert api.head() == head


def test_a_refusal_is_replayed_too(api: Api) -> None:
    account = api.open_account()
    refused = api.command("withdraw", {"account_id": account, "amount": 50}, key="w-1")
    assert_problem(refused, 409, "insufficient_funds")
    api.command("deposit", {"account_id": account, "amount": 100})
    again = api.command("withdraw", {"account_id": account, "amount": 50}, key="w-1")
    assert_problem(again, 409, "insufficient_funds")  # the original outcome, not a new try


@pytest.mark.parametrize("key", [None, "", "   ", "has space", "x" * 129, '"unterminated'])
def test_a_missing_or_malformed_key_is_refused(api: Api, key: str | None) -> None:
    account = api.open_account()
    head = api.head()
    headers = api.auth("tester")
    if key is not None:
        headers["Idempotency-Key"] = key
    body = {"account_id": account, "amount": 5}
    reply = api.run(api.client.post("/v1/commands/deposit", json=body, headers=headers))
    expected = (
        "idempotency_key_missing" if key is None or not key.strip() else ("idempotency_key_invalid")
    )
    assert_problem(reply, 400, expected)
    assert api.head() == head


def test_a_retry_while_the_first_is_in_progress_is_409(api: Api) -> None:
    account = api.open_account()
    in_flight: set[str] = api.app.state.commands.in_flight
    in_flight.add("tester/busy")  # as if the first request with this key were in the ledger
    reply = api.command("deposit", {"account_id": account, "amount": 5}, key="busy")
    assert_problem(reply, 409, "idempotency_key_in_use")
    assert reply.headers["retry-after"] == "1"
    in_flight.discard("tester/busy")
    assert api.command("deposit", {"account_id": account, "amount": 5}, key="busy").is_success


@pytest.mark.parametrize("key", ["plain", "order-8/0"])
def test_the_same_key_sent_twice_at_once_is_409_for_the_second(api: Api, key: str) -> None:
    """A key shaped "<key>/<n>" is looked up (a batch of an earlier daybook may have claimed
    "<key>") before the command runs: it is in progress from the moment it is checked, or
    both requests pass the check and the second is answered a replay of the first while
    the first is still in the server."""
    account = api.open_account()

    async def twice() -> list[httpx.Response]:
        body = {"account_id": account, "amount": 5}
        return list(
            await asyncio.gather(*(api.send_command("deposit", body, key=key) for _ in range(2)))
        )

    replies = sorted(api.run(twice()), key=lambda reply: reply.status_code)
    assert [r.status_code for r in replies] == [200, 409], [r.text for r in replies]
    assert replies[0].json()["replayed"] is False
    assert_problem(replies[1], 409, "idempotency_key_in_use")


def test_concurrent_retries_apply_once(api: Api) -> None:
    account = api.open_account()
    body = {"account_id": account, "amount": 5}

    async def burst() -> list[httpx.Response]:
        return list(
            await asyncio.gather(
                *(api.send_command("deposit", body, key="same") for _ in range(20))
            )
        )

    replies = api.run(burst())
    assert {r.status_code for r in replies} <= {200, 409}
    assert sum(r.status_code == 200 and not r.json()["replayed"] for r in replies) == 1
    balance = api.get(f"/v1/accounts/{account}/balance", min_position=api.head()).json()
    assert balance["balance"] == 5


def test_keys_are_scoped_by_token(api: Api) -> None:
    api.token("other", "write")
    account = api.open_account()
    one = api.command("deposit", {"account_id": account, "amount": 5}, key="k")
    two = api.command("deposit", {"account_id": account, "amount": 5}, key="k", who="other")
    assert one.is_success and two.is_success and not two.json()["replayed"]
    assert (
        api.get(f"/v1/accounts/{account}/balance", min_position=api.head()).json()["balance"] == 10
    )


def test_the_tokens_name_is_the_actor_in_event_metadata(api: Api) -> None:
    api.token("checkout", "write")
    account = api.open_account()
    api.command("deposit", {"account_id": account, "amount": 5}, who="checkout")
    events = api.parts.ledger.service.repository.event_store.get(uuid.UUID(account))
    assert [e.meta.actor for e in events] == ["tester", "checkout"]


def test_a_cancel_records_the_token_that_sent_it_on_the_decision(api: Api) -> None:
    """``decided_by`` is what the body says; the token that sent the cancel is the actor of
    every event it writes, its decision (``Cancelled``) included."""
    api.token("mallory", "read", "write")
    customer, merchant = api.open_account("ann"), api.open_account("shop")
    api.command("deposit", {"account_id": customer, "amount": 500})
    api.command("receive_stock", {"sku": "KETTLE", "quantity": 3})
    order = {"order_id": "o-1", "customer": customer, "merchant": merchant}
    placed = api.command("place_order", {**order, "lines": [["KETTLE", 1, 90]]})
    saga_id = placed.json()["saga_id"]
    cancel = {"saga_id": saga_id, "decided_by": "ops-alice", "reason": "customer asked"}
    answer = api.command("cancel_saga", cancel, who="mallory")
    assert answer.status_code == 200, answer.text
    events = api.parts.ledger.service.repository.event_store.get(uuid.UUID(saga_id))
    actors = {type(e).__name__: e.meta.actor for e in list(events)[1:]}
    assert actors == {"Cancelled": "mallory", "Finished": "mallory"}


# -- consistency tokens ---------------------------------------------------------------------


def test_a_write_answers_its_position_and_a_read_waits_for_it(api: Api) -> None:
    account = api.open_account()
    reply = api.command("deposit", {"account_id": account, "amount": 42})
    position = reply.json()["position"]
    assert reply.headers["daybook-position"] == str(position)
    read = api.get(f"/v1/accounts/{account}/balance", min_position=position)
    assert read.status_code == 200
    body = read.json()
    assert body["balance"] == 42 and body["as_of_position"] >= position
    assert body["lag_events"] is not None and body["lag_events"] >= 0
    assert read.headers["daybook-as-of-position"] == str(body["as_of_position"])
    by_header = api.run(
        api.client.get(
            f"/v1/accounts/{account}/balance",
            headers={**api.auth("tester"), "Daybook-Min-Position": str(position)},
        )
    )
    assert by_header.json()["balance"] == 42


def test_a_position_not_reached_in_time_is_503_with_retry_after(api: Api) -> None:
    account = api.open_account()
    reply = api.get(f"/v1/accounts/{account}/balance", min_position=10**9, timeout=0.05)
    body = assert_problem(reply, 503, "stale_read")
    assert int(reply.headers["retry-after"]) >= 1 and body["details"]["wanted"] == 10**9


def test_a_serving_version_this_servers_code_cannot_read_is_503_read_model_changed(
    sqlite_api: Api,
) -> None:
    """A deploy under way: reads switched to a version whose table lacks a column this
    server's code reads. Not a bug (500): another server, or this one upgraded, answers."""
    from tests.projections.helpers import switch_to_v2_without_a_column

    api = sqlite_api
    account = api.open_account()
    position = api.command("deposit", {"account_id": account, "amount": 5}).json()["position"]
    assert api.get(f"/v1/accounts/{account}/balance", min_position=position).status_code == 200
    assert api.parts.log is not None
    switch_to_v2_without_a_column(api.parts.log, api.parts.pool.any().url)
    reply = api.get(f"/v1/accounts/{account}/balance")
    body = assert_problem(reply, 503, "read_model_changed")
    assert int(reply.headers["retry-after"]) >= 1
    assert "account_balances is served by its version 2" in body["detail"]


def test_reads_waiting_for_a_position_leave_the_connections_to_other_reads(
    sqlite_api: Api,
) -> None:
    """As many reads as the server has read-model connections wait for a position the log
    has not reached: a read that waits for nothing (timeout=0) is answered while they are
    still waiting, not once they give up (each held a connection while it slept)."""
    api = sqlite_api
    account = api.open_account()
    path = f"/v1/accounts/{account}/balance"
    assert api.get(path, min_position=api.head()).status_code == 200  # built and current
    door = api.app.state.doors["read"]
    connections = len(api.parts.pool._all)
    target = api.head() + 3

    async def scenario() -> tuple[int, list[bool], list[int]]:
        waiting = [
            asyncio.ensure_future(
                api.client.get(
                    path, params={"min_position": target, "timeout": 10}, headers=api.auth("tester")
                )
            )
            for _ in range(connections)
        ]
        for _ in range(1000):  # until all are inside (10 s at most)
            if door.inside == connections:
                break
            await asyncio.sleep(0.01)
        assert door.inside == connections
        plain = await api.client.get(path, params={"timeout": 0}, headers=api.auth("tester"))
        still_waiting = [not task.done() for task in waiting]
        # The position they wait for comes, and they are answered.
        while await api.parts.ledger.head() < target:
            await api.send_command("deposit", {"account_id": account, "amount": 1})
        answers = await asyncio.gather(*waiting)
        return plain.status_code, still_waiting, [a.status_code for a in answers]

    plain, still_waiting, statuses = api.run(scenario())
    assert plain == 200
    assert still_waiting == [True] * connections, "the plain read waited for the waiting ones"
    assert statuses == [200] * connections


def test_a_read_of_a_read_model_nothing_builds_says_so(tmp_path: Any) -> None:
    """Projections run elsewhere, and nothing has begun to build the read model: a read that
    waits for a position says it has not been built, not that it is "still being built"
    (the watcher's path said so; a direct read already did not)."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    parts = http_parts(Settings.load(url=url), projections=None, tokens=open_tokens(url))
    api = Api(parts)
    api.token("tester", "read", "write")
    try:
        account = api.open_account()
        reply = api.get(f"/v1/accounts/{account}/balance", min_position=api.head(), timeout=0.3)
        body = assert_problem(reply, 503, "stale_read")
        assert "has not been built (nothing has begun building it)" in body["detail"], body
    finally:
        api.close()


def test_reads_asking_no_position_wait_their_turn_for_a_connection(sqlite_api: Api) -> None:
    """Three times as many reads as connections, asking for no position (timeout=0), sent at
    once: each waits its turn and is answered. A read that found no connection free was
    refused at once, 503 stale_read, though it asked for no freshness at all."""
    api = sqlite_api
    account = api.open_account()
    path = f"/v1/accounts/{account}/balance"
    assert api.get(path, min_position=api.head()).status_code == 200
    count = 3 * len(api.parts.pool._all)

    async def burst() -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                api.client.get(path, params={"timeout": 0}, headers=api.auth("tester"))
                for _ in range(count)
            )
        )

    replies = api.run(burst())
    refused = [reply.text for reply in replies if reply.status_code != 200]
    assert refused == [], refused[0]


def test_reads_waiting_for_a_position_do_not_each_poll_the_read_model(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 reads wait for a position the log has not reached: one watcher looks at the read
    model's position for all of them, and a read queries only once its position is reached.
    Each polled on its own, every 5-50 ms: thousands of queries a second."""
    api = sqlite_api
    account = api.open_account()
    path = f"/v1/accounts/{account}/balance"
    assert api.get(path, min_position=api.head()).status_code == 200
    looks = [0]
    views = api.parts.pool._all
    original = type(views[0]).find_balance

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        looks[0] += 1
        return original(self, *args, **kwargs)

    for each in views:
        monkeypatch.setattr(each, "find_balance", counted.__get__(each))
    target = api.head() + 1000
    waiting = 200

    async def scenario() -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                api.client.get(
                    path, params={"min_position": target, "timeout": 1}, headers=api.auth("tester")
                )
                for _ in range(waiting)
            )
        )

    replies = api.run(scenario())
    assert {reply.status_code for reply in replies} == {503}
    bodies = [reply.json() for reply in replies]
    assert {body["code"] for body in bodies} == {"stale_read"}
    assert {body["details"]["wanted"] for body in bodies} == {target}
    assert all(body["details"]["reached"] < target for body in bodies)
    assert looks[0] < waiting // 10, f"{looks[0]} queries for {waiting} waiting reads"


def test_reads_waiting_for_a_position_leave_room_for_reads_that_wait_for_nothing(
    sqlite_api: Api,
) -> None:
    """200 reads wait for a position the log has not reached; plain reads (timeout=0) sent
    meanwhile are all answered, and the waiting ones end at their timeout, refused as stale
    (not shed, not hung). Plain reads were refused 503 stale_read whenever the waiting
    ones' looks held every connection."""
    api = sqlite_api
    account = api.open_account()
    path = f"/v1/accounts/{account}/balance"
    assert api.get(path, min_position=api.head()).status_code == 200
    target = api.head() + 1000

    async def waiter() -> tuple[int, str]:
        reply = await api.client.get(
            path, params={"min_position": target, "timeout": 2}, headers=api.auth("tester")
        )
        return reply.status_code, reply.json()["code"]

    async def scenario() -> tuple[list[int], list[tuple[int, str]]]:
        waiting = [asyncio.ensure_future(waiter()) for _ in range(200)]
        await asyncio.sleep(0.3)
        plain = []
        for _ in range(20):
            reply = await api.client.get(path, params={"timeout": 0}, headers=api.auth("tester"))
            plain.append(reply.status_code)
            await asyncio.sleep(0.02)
        return plain, await asyncio.gather(*waiting)

    plain, waited = api.run(scenario())
    assert plain == [200] * 20
    assert set(waited) == {(503, "stale_read")}


def test_a_read_with_no_connection_free_within_the_longest_wait_is_503_overloaded(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read-model connection is busy (here, stuck) past --max-read-wait: a read that
    waited its turn that long is refused 503 overloaded with Retry-After."""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(max_read_wait=0.5))
    try:
        account = api.open_account()
        path = f"/v1/accounts/{account}/balance"
        assert api.get(path, timeout=0.5, min_position=api.head()).status_code == 200
        gate = threading.Event()
        views = api.parts.pool._all
        original = type(views[0]).find_balance

        entered: list[int] = []

        def stuck(self: Any, *args: Any, **kwargs: Any) -> Any:
            entered.append(1)
            gate.wait(30)
            return original(self, *args, **kwargs)

        for each in views:
            monkeypatch.setattr(each, "find_balance", stuck.__get__(each))

        async def scenario() -> tuple[httpx.Response, list[int]]:
            busy = [
                asyncio.ensure_future(
                    api.client.get(path, params={"timeout": 0}, headers=api.auth("tester"))
                )
                for _ in views
            ]
            while len(entered) < len(views):  # every connection taken, however slow the machine
                await asyncio.sleep(0.01)
            try:
                refused = await api.client.get(
                    path, params={"timeout": 0}, headers=api.auth("tester")
                )
            finally:
                gate.set()
            return refused, [reply.status_code for reply in await asyncio.gather(*busy)]

        refused, statuses = api.run(scenario())
        body = assert_problem(refused, 503, "overloaded")
        assert "no read-model connection came free" in body["detail"]
        assert int(refused.headers["retry-after"]) >= 1
        assert statuses == [200] * len(views)
    finally:
        api.close()


@pytest.mark.parametrize(
    "params",
    [
        {"min_position": "-1"},
        {"min_position": "x"},
        {"min_position": "1", "timeout": "9999"},
        {"min_position": str(2**63)},  # past what a position can be
        {"min_position": "9" * 5_000},
        {"min_position": "1_000"},  # int() reads it as 1000
        {"min_position": "\u0663"},  # an Arabic-Indic 3, which int() reads as 3
        {"min_position": " 3"},
        {"timeout": "1_0"},
        {"timeout": "\u0661"},
    ],
)
def test_bad_read_parameters(api: Api, params: dict[str, str]) -> None:
    account = api.open_account()
    reply = api.get(f"/v1/accounts/{account}/balance", **params)
    assert_problem(reply, 400, "invalid_parameter")


def test_the_openapi_document_declares_the_read_routes_parameters(sqlite_api: Api) -> None:
    """The read routes read their query by hand, so the document declared none of it: the
    docs page could send no page size, cursor or min_position, and a client generated
    from it could not read its own writes."""
    document = sqlite_api.run(sqlite_api.client.get("/openapi.json")).json()
    wait = {("min_position", "query"), ("timeout", "query"), ("Daybook-Min-Position", "header")}
    wanted = {
        "/v1/accounts/{account_id}/balance": {("account_id", "path"), *wait},
        "/v1/balances/snapshot": {("ids", "query"), *wait},
        "/v1/balances": {("limit", "query"), ("cursor", "query"), *wait},
        "/v1/stock/{sku}": {("sku", "path"), *wait},
        "/v1/accounts/{account_id}/statement": {
            ("account_id", "path"),
            ("limit", "query"),
            ("cursor", "query"),
            *wait,
        },
        "/v1/activity": {("days", "query"), *wait},
    }
    for path, names in wanted.items():
        declared = document["paths"][path]["get"].get("parameters", [])
        assert {(p["name"], p["in"]) for p in declared} == names, path
        assert all(not p.get("required") for p in declared if p["in"] != "path"), path
    timeout = next(
        p for p in document["paths"]["/v1/activity"]["get"]["parameters"] if p["name"] == "timeout"
    )
    assert timeout["schema"]["maximum"] == sqlite_api.parts.options.max_read_wait


def test_a_read_without_a_timeout_waits_at_most_the_servers_longest_wait(tmp_path: Any) -> None:
    """The default timeout is 2 s, or --max-read-wait when that is shorter: a server whose
    longest wait is 1 s refused every read that sent no timeout, about a "2" it never got."""
    api = make_api(f"sqlite:///{tmp_path}/ledger.db", HttpOptions(max_read_wait=1.0))
    try:
        account = api.open_account()
        reply = api.run(
            api.client.get(
                f"/v1/accounts/{account}/balance",
                params={"min_position": api.head()},
                headers=api.auth("tester"),
            )
        )
        assert reply.status_code == 200, reply.text
        late = api.run(
            api.client.get(
                f"/v1/accounts/{account}/balance",
                params={"min_position": 10**9},
                headers=api.auth("tester"),
            )
        )
        assert_problem(late, 503, "stale_read")
    finally:
        api.close()


def test_an_unknown_account_is_404_saying_as_of_when(api: Api) -> None:
    opened = api.open_account()
    reply = api.get(f"/v1/accounts/{uuid.uuid4()}/balance", min_position=api.head())
    body = assert_problem(reply, 404, "not_found")
    assert body["details"]["as_of_position"] >= 1
    assert body["details"]["includes_later"] is False  # as every answer says it
    reply = api.get(f"/v1/accounts/{uuid.uuid4()}/statement", min_position=api.head())
    assert assert_problem(reply, 404, "not_found")["details"]["as_of_position"] >= 1
    empty = api.get(f"/v1/accounts/{opened}/statement", min_position=api.head())
    assert empty.status_code == 200 and empty.json()["entries"] == []  # known, not used yet
    assert_problem(api.get("/v1/accounts/not-a-uuid/balance"), 422, "invalid_request")


@pytest.mark.parametrize(
    ("projection", "command", "path"),
    [
        ("account_balances", "open_account", "/v1/accounts/{id}/balance"),
        ("account_statement", "open_account", "/v1/accounts/{id}/statement"),
        ("inventory_levels", "receive_stock", "/v1/stock/{id}"),
    ],
)
def test_a_404_names_the_position_it_was_read_at_not_a_later_one(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, projection: str, command: str, path: str
) -> None:
    """The account (or SKU) is written, and projected, just after the read that did not find
    it (as a concurrent writer and the runner may): the position the 404 names is the one the
    read was made at, which does not include it."""
    api = sqlite_api
    api.open_account("warm-up")
    api.command("receive_stock", {"sku": "SKU-WARM", "quantity": 1})
    assert api.get("/v1/balances", min_position=api.head()).status_code == 200
    # Every read model built to here: the write below meets no runner still building one.
    assert api.get("/v1/stock/SKU-WARM", min_position=api.head()).status_code == 200
    if command == "open_account":
        key = str(uuid.uuid4())
        arguments: dict[str, Any] = {"owner": "zoe", "currency": "EUR", "account_id": key}
    else:
        key = "SKU-LATE"
        arguments = {"sku": key, "quantity": 1}
    written: list[int] = []
    replies: list[httpx.Response] = []
    original = ReadModels._read_at
    idempotency_key = api.key()

    sending = threading.Lock()  # one write, whichever look gets here first

    def read_at(self: ReadModels, name: str, read: Any, *args: Any, **kwargs: Any) -> Any:
        found = original(self, name, read, *args, **kwargs)
        if name != projection or found[0] is not None:
            return found
        with sending:
            if written:
                return found
            for _ in range(10):  # a busy machine may answer 503: the same key again is safe
                reply = asyncio.run_coroutine_threadsafe(
                    api.send_command(command, arguments, key=idempotency_key), api.loop
                ).result(30)
                replies.append(reply)
                if reply.status_code not in (503, 409):  # 409: an attempt still in progress
                    break
                time.sleep(float(reply.headers.get("retry-after", "1")))
            if reply.status_code == 200:
                written.append(reply.json()["position"])
                original(self, projection, lambda store, version: None, written[0], 30.0)
        return found

    def position(self: ReadModels, name: str) -> int:
        return original(self, name, lambda store, version: None, None, 0.0)[1]

    monkeypatch.setattr(ReadModels, "_read_at", read_at)
    # Not the read under test: a look of the watcher that the warm-up's waiting reads
    # started, still on its way (it found nothing, as it reads no row, and wrote).
    monkeypatch.setattr(ReadModels, "position", position)
    answer = api.get(path.format(id=key))
    monkeypatch.undo()

    assert written, [(reply.status_code, reply.text) for reply in replies]
    named = assert_problem(answer, 404, "not_found")["details"]["as_of_position"]
    assert named < written[0], (named, written)
    assert api.get(path.format(id=key), min_position=written[0]).status_code == 200


# -- snapshots and cursors ------------------------------------------------------------------


def test_a_snapshot_reads_many_balances_at_one_position(api: Api) -> None:
    accounts = [api.open_account(f"owner-{i}") for i in range(5)]
    for index, account in enumerate(accounts):
        api.command("deposit", {"account_id": account, "amount": 100 * (index + 1)})
    api.command("transfer", {"source": accounts[4], "destination": accounts[0], "amount": 50})
    every = api.get("/v1/balances/snapshot", min_position=api.head()).json()
    assert every["totals"] == {"EUR": 1500}
    assert len(every["balances"]) == 5 and every["as_of_position"] == api.head()
    assert every["includes_later"] is False  # the runner's versions include none after
    some = api.get(
        "/v1/balances/snapshot", ids=f"{accounts[0]},{accounts[4]},{uuid.UUID(int=1)}"
    ).json()
    assert [b["balance"] for b in some["balances"]] == [150, 450]
    assert some["missing"] == [str(uuid.UUID(int=1))]
    assert some["totals"] == {"EUR": 600}


def test_a_snapshot_of_every_balance_is_refused_past_as_many_accounts_as_ids_may_list(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``ids`` a snapshot answers every account, which grows with the ledger: past
    ``MAX_IDS`` (1,000) accounts it is refused, saying what to ask for instead, rather than
    build and send them all, once per request, as many at once as read capacity allows."""
    monkeypatch.setattr(reads, "MAX_IDS", 3)
    accounts = [api.open_account(f"owner-{i}") for i in range(3)]
    assert len(api.get("/v1/balances/snapshot", min_position=api.head()).json()["balances"]) == 3
    accounts.append(api.open_account("owner-3"))
    answer = api.get("/v1/balances/snapshot", min_position=api.head())
    problem = assert_problem(answer, 400, "invalid_parameter")
    assert "more than 3 accounts" in problem["detail"] and "ids" in problem["detail"]
    listed = api.get("/v1/balances/snapshot", ids=",".join(accounts[:3])).json()
    assert len(listed["balances"]) == 3


def test_balances_page_by_cursor_each_exactly_once(api: Api) -> None:
    accounts = {api.open_account(f"owner-{i}") for i in range(7)}
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 3, "min_position": api.head()}
    while True:
        page = api.get("/v1/balances", **params).json()
        seen.extend(b["account_id"] for b in page["balances"])
        if page["next_cursor"] is None:
            break
        params = {"limit": 3, "cursor": page["next_cursor"]}
    assert sorted(seen) == sorted(accounts)
    assert_problem(api.get("/v1/balances", cursor="garbage"), 400, "invalid_cursor")
    assert_problem(api.get("/v1/balances", limit=0), 400, "invalid_parameter")


@pytest.mark.parametrize("after", [1, "junk", ""])
def test_a_balances_cursor_that_names_no_account_id_is_invalid_cursor(
    api: Api, after: object
) -> None:
    forged = base64.urlsafe_b64encode(orjson.dumps({"after": after})).decode().rstrip("=")
    assert_problem(api.get("/v1/balances", cursor=forged), 400, "invalid_cursor")


def test_a_statement_pages_by_cursor(api: Api) -> None:
    account = api.open_account()
    for amount in range(1, 6):
        api.command("deposit", {"account_id": account, "amount": amount})
    first = api.get(f"/v1/accounts/{account}/statement", limit=3, min_position=api.head()).json()
    assert [e["amount"] for e in first["entries"]] == [5, 4, 3]
    assert first["includes_later"] is False and first["as_of_position"] == api.head()
    rest = api.get(f"/v1/accounts/{account}/statement", limit=3, cursor=first["next_cursor"])
    assert [e["amount"] for e in rest.json()["entries"]] == [2, 1]
    assert rest.json()["next_cursor"] is None
    # A last page that is full offers no cursor either: the opening is no entry.
    whole = api.get(f"/v1/accounts/{account}/statement", limit=5).json()
    assert len(whole["entries"]) == 5 and whole["next_cursor"] is None
    too_far = base64.urlsafe_b64encode(orjson.dumps({"account": account, "before": 2**63}))
    too_far = too_far.decode()
    reply = api.get(f"/v1/accounts/{account}/statement", cursor=too_far)
    assert_problem(reply, 400, "invalid_parameter")


def test_activity_and_health(api: Api) -> None:
    account = api.open_account()
    api.command("deposit", {"account_id": account, "amount": 5})
    days = api.get("/v1/activity", days=2, min_position=api.head()).json()["days"]
    assert days[-1]["money"]["EUR"]["deposit_volume"] == 5
    health = api.run(api.client.get("/health"))  # no token needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("failure", ["out", "refused"])
def test_health_with_a_token_the_store_cannot_check_still_answers_health(
    api: Api, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A probe that sends a token (monitoring with an admin token, or a made-up one) while
    the token store is out, or refuses the server's role its table: /health answered the
    store's failure (503 unavailable, or 500) instead of each part's state. It is answered
    as for no token."""
    import psycopg

    def store_out(*args: Any, **kwargs: Any) -> Any:
        if failure == "refused":
            raise psycopg.errors.InsufficientPrivilege("permission denied for daybook_tokens")
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(api.parts.tokens, "verify", store_out)
    for secret in ("never-seen", "another"):
        reply = api.run(api.client.get("/health", headers={"Authorization": f"Bearer {secret}"}))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "ok" and "error" not in body["services"]["committer"], body


def test_health_with_a_token_the_store_never_answers_is_not_held_for_the_lookup(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token store that hangs (a connection dropped without a word): /health waited the
    lookup's whole wait (``LOOKUP_WAIT``, made an hour here), far past a probe's timeout."""
    import threading

    from daybook.infrastructure.http import auth

    monkeypatch.setattr(auth, "LOOKUP_WAIT", 3600.0)
    released = threading.Event()

    def hangs(*args: Any, **kwargs: Any) -> Any:
        released.wait(60)  # let go at the end, so the lookup's thread ends
        return None

    monkeypatch.setattr(api.parts.tokens, "verify", hangs)

    async def probe() -> httpx.Response:
        get = api.client.get("/health", headers={"Authorization": "Bearer hangs"})
        return await asyncio.wait_for(get, 30)  # a guard against a hang, not a measure

    try:
        try:
            reply = api.run(probe())
        except TimeoutError:
            pytest.fail("/health was still waiting for the token store 30 s later")
        assert reply.status_code == 200 and "error" not in reply.json()["services"]["committer"]
    finally:
        released.set()


def test_health_answers_head_as_load_balancers_probe(api: Api) -> None:
    """A load balancer's health check may probe with HEAD: answered as GET is, without the
    body (it was 405, and the service looked down)."""
    probe = api.run(api.client.head("/health"))
    assert probe.status_code == 200 and probe.content == b"", (probe.status_code, probe.text)


def test_a_days_volume_past_64_bits_is_answered_exactly(api: Api) -> None:
    """Every amount fits 64 bits, a day's volume need not: five deposits of 2**62 make one
    that JSON carries as the exact integer, not a 500."""
    for _ in range(5):
        api.command("deposit", {"account_id": api.open_account(), "amount": 2**62})
    reply = api.get("/v1/activity", days=2, min_position=api.head())
    assert reply.status_code == 200, reply.text
    assert reply.json()["days"][-1]["money"]["EUR"]["deposit_volume"] == 5 * 2**62


def test_problem_codes_describe_themselves(api: Api) -> None:
    described = api.run(api.client.get("/problems/insufficient_funds")).json()
    assert "overdraft" in described["description"]
    assert_problem(api.run(api.client.get("/problems/no_such_code")), 404, "not_found")
    assert_problem(api.run(api.client.get("/v1/nowhere")), 404, "not_found")
    assert_problem(
        api.run(api.client.get("/v1/commands/deposit", headers=api.auth("tester"))),
        405,
        "method_not_allowed",
    )


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/commands/transfer", {"POST"}),
        ("GET", "/v1/batch", {"POST"}),
        ("POST", f"/v1/accounts/{uuid.UUID(int=5)}/balance", {"GET"}),
        ("POST", "/v1/balances", {"GET"}),
        ("DELETE", "/health", {"GET", "HEAD"}),
    ],
)
def test_a_405_says_which_methods_the_path_takes(
    sqlite_api: Api, method: str, path: str, allowed: set[str]
) -> None:
    """RFC 9110: a 405 must carry Allow, listing the methods the resource takes; it carried
    none, and a client could not tell what to send instead."""
    reply = sqlite_api.run(
        sqlite_api.client.request(method, path, headers=sqlite_api.auth("tester"))
    )
    assert_problem(reply, 405, "method_not_allowed")
    assert "allow" in reply.headers, dict(reply.headers)
    assert {m.strip() for m in reply.headers["allow"].split(",")} == allowed


def test_a_bug_is_a_500_problem_without_a_traceback(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(command: object) -> None:
        raise RuntimeError("a bug, with internals: /secret/path")

    monkeypatch.setattr(sqlite_api.parts.ledger, "execute", broken)
    reply = sqlite_api.command("open_account", {"owner": "ann", "currency": "EUR"})
    body = assert_problem(reply, 500, "internal_error")
    assert "secret" not in reply.text and "RuntimeError" not in body["detail"]


def test_a_client_that_hangs_up_mid_body_is_counted_as_499_not_logged_as_a_bug(
    sqlite_api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """A client (or a proxy) that drops the connection while sending its body is no bug
    here: it was logged at ERROR with a traceback and counted as a 500."""
    api = sqlite_api
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/commands/deposit",
        "raw_path": b"/v1/commands/deposit",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"daybook"),
            (b"authorization", f"Bearer {api.secrets['tester']}".encode()),
            (b"idempotency-key", b"hang-up"),
            (b"content-type", b"application/json"),
            (b"content-length", b"100"),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"account_id":', "more_body": True},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    def counted(status: str) -> float:
        child = metrics.HTTP_REQUESTS.labels("POST", "/v1/commands/deposit", status)
        return float(child._value.get())

    before = counted("500"), counted("499")
    caplog.set_level(logging.INFO)
    api.run(api.app(scope, receive, send))  # raises nothing: there is nothing to report

    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (counted("500"), counted("499")) == (before[0], before[1] + 1)


def test_a_database_outage_is_a_503_to_retry_not_a_bug(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that does not answer (a restart, the network) is no bug in daybook: the
    request is answered 503 unavailable with Retry-After (a command retried with its key is
    replayed if it did commit), and the log has one line for it, without a traceback. Both
    were 500 internal_error with a traceback, reads and commands alike."""
    account = sqlite_api.open_account()

    async def out(command: object) -> None:
        raise psycopg.OperationalError("connection failed: Connection refused")

    def read_out(*args: object, **kwargs: object) -> None:
        raise psycopg.OperationalError("connection failed: Connection refused")

    monkeypatch.setattr(sqlite_api.parts.ledger, "execute", out)
    for views in sqlite_api.parts.pool._all:
        monkeypatch.setattr(views, "find_balance", read_out)
    with caplog.at_level(logging.WARNING, logger="daybook.http"):
        command = sqlite_api.command("deposit", {"account_id": account, "amount": 5})
        # A read waits an outage out within its timeout, trying again: here it has none.
        read = sqlite_api.get(f"/v1/accounts/{account}/balance", timeout=0)
    for reply in (command, read):
        body = assert_problem(reply, 503, "unavailable")
        assert int(reply.headers["retry-after"]) >= 1
        assert "Idempotency-Key" in body["detail"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert sum("did not answer" in r.getMessage() for r in caplog.records) == 2


def test_a_database_refusing_daybooks_login_is_a_503_and_one_line_not_a_bug(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The role's password rotated before daybook's settings were: every request needing a
    new connection was a 500 internal_error ("a bug in daybook") with a traceback per
    request. It is the operator's to mend: 503 unavailable, and one line saying what the
    server refused."""
    account = sqlite_api.open_account()
    refused = 'connection failed: FATAL:  password authentication failed for user "app"'

    async def out(command: object) -> None:
        try:
            raise psycopg.OperationalError(refused)
        except psycopg.OperationalError as error:  # as eventsourcing wraps the driver's
            raise OperationalError(str(error)) from error

    monkeypatch.setattr(sqlite_api.parts.ledger, "execute", out)
    with caplog.at_level(logging.WARNING, logger="daybook.http"):
        reply = sqlite_api.command("deposit", {"account_id": account, "amount": 5})
    assert_problem(reply, 503, "unavailable")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "password authentication failed" in line


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (psycopg.OperationalError("connection failed: Connection refused"), 503, "unavailable"),
        (ReadModelChanged("account_balances", 2, KeyError("owner")), 503, "read_model_changed"),
        (RuntimeError("a bug, with internals: /secret/path"), 500, "internal_error"),
    ],
    ids=["outage", "read_model_changed", "bug"],
)
def test_an_error_answer_is_counted_traced_and_logged_as_sent_and_stays_in_the_app(
    sqlite_api: Api,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    spans: InMemorySpanExporter,
    error: Exception,
    status: int,
    code: str,
) -> None:
    """An outage, a read model a deploy changed, or a bug, answered as a problem: the
    metrics, the access log and the server span say the status the client got (all said
    500, a 503 included), the answer carries the request's X-Request-Id and the lines
    logged about it its request_id, as every other answer's do, and the exception does not
    leave the application: the server would log it again, with its traceback, for an
    outage too. A bug's traceback is in daybook's log, once."""
    api = sqlite_api
    account = api.open_account()

    async def failing(command: object) -> None:
        raise error

    def counted() -> dict[str, float]:
        return {
            sample.labels["status"]: sample.value
            for family in metrics.HTTP_REQUESTS.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
            and (sample.labels["method"], sample.labels["route"]) == ("POST", route)
        }

    route = "/v1/commands/deposit"
    monkeypatch.setattr(api.parts.ledger, "execute", failing)
    # As uvicorn runs the app: an exception out of it would be raised here.
    strict = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.app, raise_app_exceptions=True),
        base_url="http://daybook",
    )
    before = counted()
    caplog.handler.setFormatter(JsonFormatter())  # the request's ids, as the server logs them
    caplog.set_level(logging.INFO, logger="daybook.http")
    # Only this request's lines: the account's opening was logged before, in the default
    # format, when an earlier test in the process had left the root logger at INFO.
    caplog.clear()
    spans.clear()
    try:
        reply = api.run(
            strict.post(
                route,
                json={"account_id": account, "amount": 5},
                headers={**api.auth("tester"), "Idempotency-Key": "k", "X-Request-Id": "req-7"},
            )
        )
    finally:
        api.run(strict.aclose())

    assert_problem(reply, status, code)
    assert reply.headers.get("x-request-id") == "req-7", dict(reply.headers)
    after = counted()
    assert {s: after[s] - before.get(s, 0.0) for s in after if after[s] != before.get(s)} == {
        str(status): 1.0
    }
    lines = [orjson.loads(line) for line in caplog.text.splitlines()]
    (access,) = [line for line in lines if line["logger"] == "daybook.http.access"]
    assert access["status"] == status
    (told,) = [line for line in lines if line["logger"] == "daybook.http"]
    assert told["request_id"] == "req-7"
    assert ("error" in told) == (status == 500), "a traceback only for a bug"
    (server,) = [  # daybook's own (FastAPI may make one too)
        s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.SERVER
        and s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "daybook"
    ]
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == status
    assert server.status.status_code is StatusCode.ERROR


def test_a_read_waits_an_outage_out_within_its_timeout(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read tries again, without holding a connection meanwhile, while its timeout lasts."""
    account = sqlite_api.open_account()
    views = sqlite_api.parts.pool._all
    original = type(views[0]).find_balance
    failed: list[bool] = []

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(failed) < 3:
            failed.append(True)
            raise psycopg.OperationalError("connection failed: Connection refused")
        return original(self, *args, **kwargs)

    for each in views:
        monkeypatch.setattr(each, "find_balance", flaky.__get__(each))
    reply = sqlite_api.get(
        f"/v1/accounts/{account}/balance", timeout=10, min_position=sqlite_api.head()
    )
    assert reply.status_code == 200, reply.text
    assert len(failed) == 3


def test_a_file_or_timeout_error_is_a_bug_not_an_outage(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``is_transient`` counts every OSError as the network's, but no database daybook
    needs reaches a request as a bare one: its driver raises its own errors. A file that
    is not there (a dashboard asset missing from an install) or a timeout of daybook's own
    is a bug: 500 internal_error with the traceback in the log, not 503 unavailable
    naming a database, with no traceback, that clients retry for ever."""
    from daybook.infrastructure.http import board

    def missing(name: str) -> bytes:
        raise FileNotFoundError(2, "No such file or directory", name)

    async def timed_out(command: object) -> None:
        raise TimeoutError("waited too long for something of daybook's own")

    async def submitted(commands: list[object]) -> list[BaseException]:
        return [PermissionError(13, "Permission denied", "/etc/daybook") for _ in commands]

    monkeypatch.setattr(board, "asset", missing)
    monkeypatch.setattr(sqlite_api.parts.ledger, "execute", timed_out)
    monkeypatch.setattr(sqlite_api.parts.ledger, "submit", submitted)
    opening = {"command": "open_account", "fields": {"owner": "ann", "currency": "EUR"}}
    with caplog.at_level(logging.WARNING, logger="daybook.http"):
        page = sqlite_api.run(sqlite_api.client.get("/dashboard/dashboard.js"))
        command = sqlite_api.command("open_account", {"owner": "ann", "currency": "EUR"})
        batch = sqlite_api.run(
            sqlite_api.client.post(
                "/v1/batch",
                json={"commands": [opening]},
                headers={**sqlite_api.auth("tester"), "Idempotency-Key": sqlite_api.key()},
            )
        )
    for reply in (page, command):
        assert_problem(reply, 500, "internal_error")
    assert batch.status_code == 200, batch.text
    (outcome,) = batch.json()["outcomes"]
    assert (outcome["status"], outcome["problem"]["code"]) == (500, "internal_error")
    assert len([r for r in caplog.records if r.exc_info]) == 3, "each bug's traceback is logged"


def test_a_command_after_the_ledger_closed_is_503_shutting_down(sqlite_api: Api) -> None:
    account = sqlite_api.open_account()
    sqlite_api.parts.ledger.service.committer.close()  # as the server's shutdown does
    reply = sqlite_api.command("deposit", {"account_id": account, "amount": 5})
    assert_problem(reply, 503, "shutting_down")
    assert int(reply.headers["retry-after"]) >= 1


def test_request_methods_nobody_routes_add_no_metric_series(sqlite_api: Api) -> None:
    """The method is the client's choice of text: each one measured by name would be a new
    series of the request counter and of the latency histogram, for as long as the server
    runs."""

    def series() -> set[tuple[str, ...]]:
        return {
            tuple(sorted(sample.labels.items()))
            for family in metrics.HTTP_REQUESTS.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        }

    sqlite_api.run(sqlite_api.client.request("BREW", "/health"))  # "other" exists from here
    before = series()
    for n in range(200):
        reply = sqlite_api.run(sqlite_api.client.request(f"BREW{n}", "/health"))
        assert reply.status_code == 405
        reply = sqlite_api.run(sqlite_api.client.request(f"BREW{n}", f"/nowhere/{n}"))
        assert reply.status_code == 404
    assert len(series() - before) <= 1  # at most the 404's "other" on the unmatched route
    reply = sqlite_api.run(sqlite_api.client.get("/health"))
    assert reply.status_code == 200
    sample = metrics.REGISTRY.get_sample_value(
        "daybook_http_requests_total", {"method": "GET", "route": "/health", "status": "200"}
    )
    assert sample


def test_health_is_503_when_the_request_purge_has_failed(tmp_path: Any) -> None:
    # The purge runs in the server's process: when it stops for good (here its table is
    # gone, which no retry cures), /health must say so, as it does for the projections.
    url = f"sqlite:///{tmp_path}/ledger.db"
    parts = http_parts(Settings.load(url=url, request_purge_interval=0.01), tokens=open_tokens(url))
    api = Api(parts)
    try:
        purge = parts.ledger.request_purge
        with sqlite3.connect(tmp_path / "ledger.db") as db:
            db.execute(f"ALTER TABLE {REQUESTS_TABLE} RENAME TO gone")
        deadline = time.monotonic() + 60
        while purge.health().state is not ServiceState.FAILED:
            assert time.monotonic() < deadline, purge.health()
            time.sleep(0.02)
        reply = api.run(api.client.get("/health"))
        assert reply.status_code == 503, reply.text
        assert reply.json()["status"] == "failing"
        assert reply.json()["services"]["request purge"]["state"] == "failed"
    finally:
        api.close()


def test_health_is_503_while_a_read_model_the_server_builds_is_stopped(tmp_path: Any) -> None:
    # An event its code cannot apply stops one projection version (the others go on): the
    # runner runs, and /health said ok while that read model stood still for good.
    url = f"sqlite:///{tmp_path}/ledger.db"
    good = ACCOUNT_BALANCES.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] == 13:
            raise ValueError("cannot apply a deposit of 13")
        good(event, rows)

    poisoned = dataclasses.replace(
        ACCOUNT_BALANCES, handlers={**ACCOUNT_BALANCES.handlers, DEPOSITED: deposit}
    )
    parts = http_parts(
        Settings.load(url=url), projections=[poisoned, ACCOUNT_STATEMENT], tokens=open_tokens(url)
    )
    api = Api(parts)
    api.token("tester", "read", "write", "admin")
    try:
        account = api.open_account()
        assert api.command("deposit", {"account_id": account, "amount": 13}).status_code == 200
        deadline = time.monotonic() + 60
        while (
            reply := api.run(api.client.get("/health", headers=api.auth("tester")))
        ).status_code == 200:
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.05)
        assert reply.status_code == 503, reply.text
        services = reply.json()["services"]
        assert services["projections"]["state"] == "running"
        stopped = services["projection versions"]
        assert stopped["state"] == "failed"
        assert stopped["error"].startswith("account_balances v1 stopped: event Account.Deposited")
    finally:
        api.close()


def test_the_server_records_the_expiry_of_holds_and_reservations(sqlite_api: Api) -> None:
    # Until its expiry is recorded, a hold stays in its account's state (and a reservation
    # in its SKU's): a server taking them must record their expiries, or that state grows
    # with every one that times out.
    api = sqlite_api
    payer = api.open_account("ann")
    assert api.command("deposit", {"account_id": payer, "amount": 500}).status_code == 200
    held = api.command("hold", {"account_id": payer, "amount": 200, "timeout": 1})
    assert held.status_code == 200, held.text
    hold_id = uuid.UUID(held.json()["hold_id"])
    assert api.command("receive_stock", {"sku": "KETTLE", "quantity": 3}).status_code == 200
    body = {"sku": "KETTLE", "quantity": 2, "timeout": 1}
    reserved = api.command("reserve_stock", body)
    assert reserved.status_code == 200, reserved.text
    log = api.parts.log
    assert log is not None
    deadline = time.monotonic() + 60
    while True:
        topics = [topic.rpartition(":")[2] for _, topic, *_ in log.scan(0, 1_000)]
        if {"Hold.Expired", "Inventory.ReservationExpired"} <= set(topics):
            break
        assert time.monotonic() < deadline, topics
        time.sleep(0.1)
    hold = api.run(api.parts.ledger.hold_status(hold_id))
    assert (hold.status, hold.recorded) == ("expired", True)
    health = api.run(api.client.get("/health")).json()
    assert health["services"]["expiry sweeper"]["state"] == "running", health


def test_health_is_ok_while_the_sweeper_waits_for_its_read_model(tmp_path: Any) -> None:
    # With the projections run elsewhere, the open_holds read model may not be built yet:
    # the sweeper waits for it and says so, which is no failure of the server.
    url = f"sqlite:///{tmp_path}/ledger.db"
    parts = http_parts(Settings.load(url=url), projections=None, tokens=open_tokens(url))
    api = Api(parts)
    try:
        deadline = time.monotonic() + 60
        while "waiting" not in str(parts.services["expiry sweeper"]().error):
            assert time.monotonic() < deadline, parts.services["expiry sweeper"]()
            time.sleep(0.02)
        reply = api.run(api.client.get("/health"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["services"]["expiry sweeper"]["state"] == "running"
    finally:
        api.close()


def test_health_fails_when_nobody_builds_the_sweepers_read_model(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Projections run elsewhere, yet nothing builds open_holds (a wrong read-model URL, a
    # group without it): no expiry would ever be recorded. Past its patience, /health says.
    monkeypatch.setattr("daybook.infrastructure.expiry.SWEEP_PATIENCE", 0.2)
    url = f"sqlite:///{tmp_path}/ledger.db"
    parts = http_parts(Settings.load(url=url), projections=None, tokens=open_tokens(url))
    api = Api(parts)
    try:
        deadline = time.monotonic() + 60
        while parts.services["expiry sweeper"]().state is not ServiceState.RETRYING:
            assert time.monotonic() < deadline, parts.services["expiry sweeper"]()
            time.sleep(0.02)
        api.token("operator", "admin")
        reply = api.run(api.client.get("/health", headers=api.auth("operator")))
        assert reply.status_code == 503, reply.text
        assert "nothing to sweep from" in reply.json()["services"]["expiry sweeper"]["error"]
        # Anyone may ask whether the server is up; what went wrong only an admin is told.
        api.token("reader", "read")
        for headers in ({}, api.auth("reader"), {"Authorization": "Bearer not-a-token"}):
            reply = api.run(api.client.get("/health", headers=headers))
            assert reply.status_code == 503, reply.text
            sweeper = reply.json()["services"]["expiry sweeper"]
            assert sweeper == {"state": "retrying", "restarts": 0}, sweeper
    finally:
        api.close()


def test_closing_the_parts_leaves_the_event_loop_free(tmp_path: Any) -> None:
    # Stopping the sweeper and the projections joins their threads (up to their drain
    # timeouts): the loop must go on meanwhile (the server answers the requests in hand).
    url = f"sqlite:///{tmp_path}/ledger.db"
    parts = http_parts(Settings.load(url=url), tokens=open_tokens(url))
    release = threading.Event()
    released: list[bool] = []
    parts.on_close.insert(0, lambda: released.append(release.wait(10)))
    ticks = 0

    async def scenario() -> None:
        nonlocal ticks
        closing = asyncio.ensure_future(parts.close())
        for _ in range(5):
            await asyncio.sleep(0.01)
            ticks += 1
        release.set()
        await closing

    asyncio.run(scenario())
    assert ticks == 5 and released == [True]  # the loop ran while the first part stopped


def test_parts_that_fail_to_start_leave_nothing_running(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last part fails to start: the caller gets no parts to close, so whatever had
    # started (the committer, the request purge, the projections) must be stopped already.
    before = {thread.ident for thread in threading.enumerate()}

    def broken(self: object) -> None:
        raise RuntimeError("the sweeper cannot start")

    monkeypatch.setattr("daybook.infrastructure.expiry.ExpirySweeper.start", broken)
    url = f"sqlite:///{tmp_path}/ledger.db"
    with pytest.raises(RuntimeError, match="the sweeper cannot start"):
        http_parts(Settings.load(url=url))
    deadline = time.monotonic() + 30
    while left := [t.name for t in threading.enumerate() if t.ident not in before]:
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.05)


#: Makes PostgreSQL answer every append as a full disk does (``disk_full``, its message).
_FULL_DISK = """
CREATE FUNCTION daybook_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not extend file "base/16384/16385": No space left on device'
    USING ERRCODE = 'disk_full';
END $$;
"""


def test_a_full_disk_is_a_507_that_applied_nothing_and_the_same_key_goes_through_later(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database out of disk space is neither the client's mistake nor a bug in daybook:
    a command, and each command of a batch, is answered 507 storage_full with Retry-After,
    nothing is applied, and the log has one error line for the operator, without a
    traceback; once space is freed the same Idempotency-Key goes through, once. Both were
    500 internal_error, with a traceback."""
    api = make_api(pg_url)
    try:
        account = api.open_account()
        deposits = [
            {"command": "deposit", "fields": {"account_id": account, "amount": amount}}
            for amount in (1, 2)
        ]
        with psycopg.connect(pg_url, autocommit=True) as db:
            table = events_table(db)
            db.execute(_FULL_DISK)
            db.execute(
                f"CREATE TRIGGER full_disk BEFORE INSERT ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION daybook_test_disk_full()"
            )
            with caplog.at_level(logging.WARNING, logger="daybook.http"):
                one = api.command("deposit", {"account_id": account, "amount": 5}, key="full-1")
                many = api.run(
                    api.client.post(
                        "/v1/batch",
                        json={"commands": deposits},
                        headers={**api.auth("tester"), "Idempotency-Key": "full-2"},
                    )
                )
            db.execute(f"DROP TRIGGER full_disk ON {table}")
        body = assert_problem(one, 507, "storage_full")
        assert int(one.headers["retry-after"]) >= 1 and "Idempotency-Key" in body["detail"]
        assert many.status_code == 200, many.text
        outcomes = many.json()["outcomes"]
        assert [(o["status"], o["problem"]["code"]) for o in outcomes] == [
            (507, "storage_full"),
            (507, "storage_full"),
        ]
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2 and all("out of disk space" in line for line in errors), errors

        again = api.command("deposit", {"account_id": account, "amount": 5}, key="full-1")
        assert again.status_code == 200 and again.json()["replayed"] is False, again.text
        balance = api.get(f"/v1/accounts/{account}/balance", min_position=api.head()).json()
        assert balance["balance"] == 5
    finally:
        api.close()


def test_a_command_after_the_ledger_writer_failed_is_500_not_shutting_down(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that failed on a defect takes no command until the server restarts: the
    answer says so (500, and to restart), not that the server is stopping, which it is not."""
    account = sqlite_api.open_account()
    committer = sqlite_api.parts.ledger.service.committer

    def broken(*_: Any) -> None:
        raise AssertionError("a bug in the writer")

    monkeypatch.setattr(committer, "_apply_in_hand", broken)
    opening = {"command": "open_account", "fields": {"owner": "ann", "currency": "EUR"}}
    with caplog.at_level(logging.ERROR):
        first = sqlite_api.command("deposit", {"account_id": account, "amount": 5})
        later = sqlite_api.command("deposit", {"account_id": account, "amount": 5})
        batch = sqlite_api.run(
            sqlite_api.client.post(
                "/v1/batch",
                json={"commands": [opening]},
                headers={**sqlite_api.auth("tester"), "Idempotency-Key": sqlite_api.key()},
            )
        )
    assert committer.health().state is ServiceState.FAILED
    for reply in (first, later, batch):  # the batch refused whole, as a closed ledger's is
        body = assert_problem(reply, 500, "internal_error")
        assert "restart" in body["detail"], body
