"""Envelopes say which schema their payload is at, and workers upcast older ones.

The relay and the workers are deployed separately, so during an upgrade one may run older
code than the other. An envelope a relay with older code published carries the payload of an
event as that code read it (``Account.Opened`` version 1: no ``overdraft_limit``), and a
worker must upcast it as the mapper upcasts a stored event; an event written by newer code
than the relay's is published as written, under its own schema, so that no worker upcasts
what is already upcast. Envelopes of a relay that named no payload schema are taken as they
come: their ``schema`` named the relay code's version even for a newer payload.
"""

from __future__ import annotations

from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import Notification
from eventsourcing.utils import TopicError

from daybook.domain.accounts import Account
from daybook.infrastructure.codec import ContractMapper, OrjsonTranscoder
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.relay import plan_messages
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES
from daybook.projections.model import LogEvent, MemoryRows

ACCOUNT = UUID(int=7)
TOPIC = "daybook.domain.accounts:Account.Opened"
CREATED = {"originator_topic": "daybook.domain.accounts:Account"}
HEADER = {
    "aggregate_id": str(ACCOUNT),
    "aggregate_version": 1,
    "position": 1,
    "prev": 0,
    "occurred_at": "2026-01-31T09:15:00.123456+00:00",
    "metadata": {},
}


def published(schema: int, payload: dict[str, object], *, named: bool = True) -> bytes:
    return orjson.dumps(
        {"v": envelope.ENVELOPE_VERSION, "type": TOPIC, "schema": schema, **HEADER,
         "payload": payload, **({"payload_schema": schema} if named else {})}
    )  # fmt: skip


def stored_opened(state: dict[str, object]) -> Notification:
    head = {"timestamp": HEADER["occurred_at"], "meta": {}, **CREATED}
    return Notification(
        id=1,
        originator_id=ACCOUNT,
        originator_version=1,
        topic=TOPIC,
        state=orjson.dumps({**head, **state}),
    )


def test_a_worker_upcasts_a_payload_an_older_relay_published() -> None:
    sent = {**CREATED, "owner": "olga", "currency": "EUR"}
    message = envelope.decode(published(1, sent))

    state = message.to_state()
    assert state["overdraft_limit"] == 0
    assert message.to_domain_event().overdraft_limit == 0
    assert message.payload == sent  # the message itself is left as it came
    rows = MemoryRows(ACCOUNT_BALANCES)
    ACCOUNT_BALANCES.apply(LogEvent.from_state(1, message.type, state), rows)
    assert rows.get(BALANCES.name, (str(ACCOUNT),)) is not None


def test_a_current_payload_reaches_the_worker_as_published() -> None:
    payload = {**CREATED, "owner": "olga", "currency": "EUR", "overdraft_limit": 50}
    assert envelope.decode(published(2, payload)).to_state()["overdraft_limit"] == 50


def test_the_relay_names_the_schema_of_what_it_publishes() -> None:
    mapper = ContractMapper(OrjsonTranscoder())
    assert Account.Opened.class_version == 2
    old = stored_opened({"owner": "olga", "currency": "EUR"})
    # Written by newer code than this (a version 3 with a field this code does not know).
    newer = stored_opened(
        {"owner": "nina", "currency": "EUR", "overdraft_limit": 5, "label": "n", "class_version": 3}
    )

    planned, _ = plan_messages([old, newer], (0,), mapper.decode_versioned)
    first, second = (envelope.decode(value) for _, key, value in planned if key is not None)

    assert (first.payload_schema, first.payload["overdraft_limit"]) == (2, 0)  # upcast here
    assert (second.payload_schema, second.payload["label"]) == (3, "n")  # as written
    assert second.to_state()["overdraft_limit"] == 5


def test_a_payload_whose_schema_is_not_named_is_taken_as_it_came() -> None:
    """A relay of an older daybook named its own code's version in ``schema``, also for a
    payload newer code wrote: upcasting it again would overwrite the newer fields."""
    payload = {**CREATED, "owner": "olga", "currency": "EUR", "overdraft_limit": 50}
    message = envelope.decode(published(1, payload, named=False))
    assert message.payload_schema is None
    assert message.to_state()["overdraft_limit"] == 50


def test_the_relay_publishes_an_event_type_only_newer_code_defines_as_written() -> None:
    """A rolling deploy: newer code adds an aggregate ("Extending daybook") and writes its
    first event beside this relay, which has no class for it. The relay stopped there for
    good (``TopicError``), and with it every stream worker downstream; it must publish the
    event as written, under its own schema, as it does an event newer code wrote at a
    newer version. (A type this code does define, under a topic it cannot resolve, is
    still refused.)"""
    mapper = ContractMapper(OrjsonTranscoder())
    state = {"timestamp": HEADER["occurred_at"], "meta": {}, "code": "WELCOME", "value": 10,
             "originator_topic": "shop.coupons:Coupon", "class_version": 2}  # fmt: skip
    coupon = Notification(
        id=1, originator_id=ACCOUNT, originator_version=1,
        topic="shop.coupons:Coupon.Issued", state=orjson.dumps(state),
    )  # fmt: skip
    planned, _ = plan_messages([coupon], (0,), mapper.decode_versioned)
    (message,) = (envelope.decode(value) for _, key, value in planned if key is not None)
    assert (message.type, message.payload_schema) == ("shop.coupons:Coupon.Issued", 2)
    assert (message.payload["code"], message.payload["value"]) == ("WELCOME", 10)
    moved = Notification(
        id=2, originator_id=ACCOUNT, originator_version=2,
        topic="somewhere.else:Account.Opened", state=orjson.dumps(state),
    )  # fmt: skip
    with pytest.raises(TopicError):
        plan_messages([moved], (1,), mapper.decode_versioned)
