"""The orjson transcoder and the contract mapper: events go to bytes and come back exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import given
from hypothesis import strategies as st

from daybook.domain.accounts import Account
from daybook.domain.events import LedgerAggregate, Metadata
from daybook.domain.inventory import Inventory
from daybook.domain.values import MAX_AMOUNT
from daybook.infrastructure.codec import ContractMapper, OrjsonTranscoder


class Sample(LedgerAggregate.Event):
    """A test-only event with every kind of field the codec promises to keep exact."""

    class_version = 3
    amount: int
    price: Decimal
    when: datetime
    ref: UUID
    note: str
    tags: list[str]
    extra: dict[str, int]


@pytest.fixture
def mapper() -> ContractMapper:
    return ContractMapper(transcoder=OrjsonTranscoder())


def round_trip(mapper: ContractMapper, event: Any) -> Any:
    stored = mapper.to_stored_event(event)
    assert isinstance(stored.state, bytes)
    return mapper.to_domain_event(stored)


utc_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
)
ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
metadata = st.builds(
    Metadata,
    request_id=st.none() | ids,
    correlation_id=st.none() | ids,
    causation_id=st.none() | ids,
)
amounts = st.integers(min_value=1, max_value=MAX_AMOUNT)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
common = {
    "originator_id": st.uuids(),
    "originator_version": st.integers(min_value=1, max_value=2**31),
    "timestamp": utc_datetimes,
    "meta": metadata,
}


def assert_same_event(decoded: Any, original: Any) -> None:
    assert type(decoded) is type(original)
    assert decoded == original
    assert decoded.model_dump() == original.model_dump()
    assert decoded.timestamp.utcoffset() == timedelta(0)
    assert decoded.timestamp.microsecond == original.timestamp.microsecond


@given(
    st.builds(
        Account.Opened,
        originator_topic=st.just("domain.accounts:Account"),
        owner=text,
        currency=st.sampled_from(["EUR", "USD", "JPY"]),
        overdraft_limit=st.integers(min_value=0, max_value=MAX_AMOUNT),
        **common,
    )
)
def test_account_opened_round_trips(event: Account.Opened) -> None:
    decoded = round_trip(ContractMapper(transcoder=OrjsonTranscoder()), event)
    assert_same_event(decoded, event)


@given(
    st.builds(
        Account.TransferredOut,
        amount=amounts,
        transfer_id=st.uuids(),
        counterparty=st.uuids(),
        **common,
    )
)
def test_transfers_round_trip_with_uuids(event: Account.TransferredOut) -> None:
    decoded = round_trip(ContractMapper(transcoder=OrjsonTranscoder()), event)
    assert_same_event(decoded, event)
    assert isinstance(decoded.transfer_id, UUID)
    assert isinstance(decoded.counterparty, UUID)
    assert isinstance(decoded.originator_id, UUID)


@given(
    st.builds(
        Inventory.StockAdjusted,
        delta=st.integers(min_value=-MAX_AMOUNT, max_value=MAX_AMOUNT).filter(bool),
        reason=text,
        **common,
    )
)
def test_negative_deltas_and_unicode_reasons_round_trip(event: Inventory.StockAdjusted) -> None:
    decoded = round_trip(ContractMapper(transcoder=OrjsonTranscoder()), event)
    assert_same_event(decoded, event)
    assert decoded.delta == event.delta


@given(
    st.builds(
        Sample,
        amount=st.integers(min_value=-(2**63), max_value=2**63 - 1),
        price=st.decimals(allow_nan=False, allow_infinity=False, places=4),
        when=utc_datetimes,
        ref=st.uuids(),
        note=text,
        tags=st.lists(text, max_size=5),
        extra=st.dictionaries(text, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        **common,
    )
)
def test_every_field_kind_round_trips_exactly(event: Sample) -> None:
    decoded = round_trip(ContractMapper(transcoder=OrjsonTranscoder()), event)
    assert_same_event(decoded, event)
    assert decoded.price == event.price
    assert str(decoded.price) == str(event.price)
    assert decoded.when == event.when
    assert decoded.when.microsecond == event.when.microsecond


@pytest.mark.parametrize("amount", [1, 2**31, 2**53 + 1, MAX_AMOUNT])
def test_large_amounts_keep_every_digit(mapper: ContractMapper, amount: int) -> None:
    event = Account.Deposited(
        originator_id=UUID(int=1),
        originator_version=2,
        timestamp=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        amount=amount,
    )
    decoded = round_trip(mapper, event)
    assert decoded.amount == amount
    assert type(decoded.amount) is int


def test_the_mapper_writes_the_schema_version_and_no_control_fields(
    mapper: ContractMapper,
) -> None:
    event = Account.Opened(
        originator_id=UUID(int=7),
        originator_version=1,
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
        originator_topic="daybook.domain.accounts:Account",
        owner="Zoë",
        currency="EUR",
        overdraft_limit=0,
        meta=Metadata(request_id="r-1", correlation_id="c-1", causation_id="x-1"),
    )
    stored = mapper.to_stored_event(event)
    assert stored.topic == "daybook.domain.accounts:Account.Opened"
    assert stored.originator_id == UUID(int=7)
    assert stored.originator_version == 1
    state = orjson.loads(stored.state)
    assert state["class_version"] == 2
    assert "originator_id" not in state and "originator_version" not in state
    assert state["meta"] == {
        "request_id": "r-1",
        "correlation_id": "c-1",
        "causation_id": "x-1",
        "actor": None,
    }
    assert state["owner"] == "Zoë"


def test_non_utc_timestamps_keep_their_instant(mapper: ContractMapper) -> None:
    moment = datetime(2024, 5, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2)))
    event = Account.Withdrawn(
        originator_id=UUID(int=1), originator_version=2, timestamp=moment, amount=5
    )
    decoded = round_trip(mapper, event)
    assert decoded.timestamp == moment
    assert decoded.timestamp.microsecond == 1


@pytest.mark.parametrize("amount", [2**64, -(2**63) - 1, 10**30])
def test_an_int_beyond_64_bits_is_refused_not_truncated(
    mapper: ContractMapper, amount: int
) -> None:
    event = Sample(
        originator_id=UUID(int=1),
        originator_version=1,
        timestamp=datetime(2024, 5, 1, tzinfo=UTC),
        amount=amount,
        price=Decimal("1.5"),
        when=datetime(2024, 5, 1, tzinfo=UTC),
        ref=UUID(int=2),
        note="",
        tags=[],
        extra={},
    )
    with pytest.raises(TypeError, match="64-bit"):
        mapper.to_stored_event(event)
    with pytest.raises(TypeError):
        OrjsonTranscoder().encode({"amount": amount})


@pytest.mark.parametrize("digits", ["18446744073709551617", "-9223372036854775809", "1" + "0" * 30])
def test_a_stored_int_beyond_64_bits_is_refused_not_rounded(
    mapper: ContractMapper, digits: str
) -> None:
    # orjson reads such a number as a float; the contract must refuse it, not round it.
    state = b'{"timestamp":"2024-05-01T00:00:00Z","meta":{},"amount":' + digits.encode() + b"}"
    stored = StoredEvent(
        originator_id=UUID(int=1),
        originator_version=2,
        topic="domain.accounts:Account.Deposited",
        state=state,
    )
    with pytest.raises(ValueError, match="amount"):
        mapper.to_domain_event(stored)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_the_transcoder_round_trips_json_values(value: Any) -> None:
    transcoder = OrjsonTranscoder()
    assert transcoder.decode(transcoder.encode(value)) == value


def test_the_transcoder_writes_uuids_datetimes_and_decimals_as_text() -> None:
    transcoder = OrjsonTranscoder()
    value = {
        "id": UUID("12345678-1234-5678-1234-567812345678"),
        "at": datetime(2024, 5, 1, 12, 30, 0, 250000, tzinfo=UTC),
        "price": Decimal("10.10"),
        "tags": {"b", "a"},
    }
    assert transcoder.decode(transcoder.encode(value)) == {
        "id": "12345678-1234-5678-1234-567812345678",
        "at": "2024-05-01T12:30:00.250000+00:00",
        "price": "10.10",
        "tags": ["a", "b"],
    }


def test_the_transcoder_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError):
        OrjsonTranscoder().encode({"x": object()})
