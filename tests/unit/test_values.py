"""Value checks: what a command accepts before any business rule is consulted."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daybook.domain.errors import (
    DomainError,
    InvalidAmount,
    InvalidCurrency,
    InvalidRequest,
    InvalidSku,
)
from daybook.domain.values import (
    MAX_AMOUNT,
    as_text,
    check_amount,
    check_currency,
    check_delta,
    check_limit,
    check_new_sku,
    check_sku,
    check_text,
    check_uuid,
    inventory_id,
)


class IntSubclass(int):
    """An int in disguise: refused like bool, because only a plain int is an amount."""


def test_max_amount_fits_a_signed_64_bit_column() -> None:
    assert MAX_AMOUNT == 2**63 - 1


@given(st.integers(min_value=1, max_value=MAX_AMOUNT))
def test_every_int_from_one_to_the_maximum_is_an_amount(value: int) -> None:
    assert check_amount(value) == value


@pytest.mark.parametrize("value", [1, 2, 10_000, MAX_AMOUNT])
def test_amount_boundaries_inside(value: int) -> None:
    assert check_amount(value) is value


@pytest.mark.parametrize(
    "value",
    [
        1.0,
        1.5,
        0.1 + 0.2,
        float("nan"),
        float("inf"),
        True,
        False,
        "100",
        "",
        b"1",
        None,
        Decimal("1"),
        Decimal("10.50"),
        Fraction(1, 1),
        complex(1, 0),
        [1],
        IntSubclass(5),
    ],
    ids=repr,
)
def test_non_int_amounts_are_refused_naming_the_type(value: object) -> None:
    with pytest.raises(InvalidAmount) as caught:
        check_amount(value)
    assert caught.value.code == "invalid_amount"
    assert isinstance(caught.value, DomainError)
    assert type(value).__name__ in str(caught.value)


@pytest.mark.parametrize("value", [0, -1, -10_000, MAX_AMOUNT + 1, 2**64, 10**30, -(2**63)])
def test_out_of_range_amounts_are_refused_with_the_number(value: int) -> None:
    with pytest.raises(InvalidAmount) as caught:
        check_amount(value)
    assert caught.value.code == "invalid_amount"
    assert str(value) in str(caught.value)
    assert str(MAX_AMOUNT) in str(caught.value)


@given(st.integers().filter(lambda v: not 1 <= v <= MAX_AMOUNT))
def test_every_int_outside_the_range_is_refused(value: int) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(value)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_no_float_is_ever_an_amount(value: float) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(value)


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_no_decimal_is_ever_an_amount(value: Decimal) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(value)


def test_amount_message_names_the_field() -> None:
    with pytest.raises(InvalidAmount, match="quantity"):
        check_amount(0, "quantity")


@pytest.mark.parametrize("value", [1, -1, 42, -42, MAX_AMOUNT, -MAX_AMOUNT])
def test_deltas_are_signed_non_zero_ints(value: int) -> None:
    assert check_delta(value) == value


@pytest.mark.parametrize(
    "value",
    [0, MAX_AMOUNT + 1, -(2**63), 2**64, 1.0, -1.0, True, "3", None, Decimal(2)],
    ids=repr,
)
def test_bad_deltas_are_invalid_amounts(value: object) -> None:
    with pytest.raises(InvalidAmount) as caught:
        check_delta(value)
    assert caught.value.code == "invalid_amount"
    assert repr(value) in str(caught.value) or str(value) in str(caught.value)


@pytest.mark.parametrize("value", [0, 1, 500, MAX_AMOUNT])
def test_overdraft_limit_may_be_zero(value: int) -> None:
    assert check_limit(value) == value


@pytest.mark.parametrize(
    "value", [-1, MAX_AMOUNT + 1, 1.0, True, False, "0", None, Decimal(0)], ids=repr
)
def test_bad_overdraft_limits_are_invalid_amounts(value: object) -> None:
    with pytest.raises(InvalidAmount) as caught:
        check_limit(value)
    assert caught.value.code == "invalid_amount"
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("code", ["EUR", "USD", "JPY", "GBP", "CHF", "XAU", "BHD"])
def test_iso_4217_codes_are_currencies(code: str) -> None:
    assert check_currency(code) == code


@pytest.mark.parametrize(
    "value",
    ["eur", "Eur", "EU", "EURO", "", " EUR", "EUR ", "XXX", "ABC", "€", 978, None, b"EUR"],
    ids=repr,
)
def test_other_currencies_are_refused(value: object) -> None:
    with pytest.raises(InvalidCurrency) as caught:
        check_currency(value)
    assert caught.value.code == "invalid_currency"
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize("sku", ["SKU-1", "a", "A" * 64, "shoe.42_red:EU/L-1", "0", "x-y_z.w:v/u"])
def test_skus(sku: str) -> None:
    assert check_sku(sku) == sku


@pytest.mark.parametrize(
    "sku",
    ["", "A" * 65, "SKU 1", "SKU\n", "ski€", "a;b", "a*b", "sku#1", None, 42, b"SKU"],
    ids=repr,
)
def test_bad_skus_are_refused(sku: object) -> None:
    with pytest.raises(InvalidSku) as caught:
        check_sku(sku)
    assert caught.value.code == "invalid_sku"
    assert repr(sku) in str(caught.value)


@given(st.from_regex(r"[A-Za-z0-9._:/-]{1,64}", fullmatch=True))
def test_every_sku_of_the_alphabet_is_accepted(sku: str) -> None:
    assert check_sku(sku) == sku


# Path segments a URL would resolve away (/v1/stock/A/../B is /v1/stock/B to every client), or
# that no URL keeps apart: empty, "." and "..".
@pytest.mark.parametrize("sku", ["..", ".", "A/../B", "A/./B", "../A", "A/..", "/A", "A/", "A//B"])
def test_a_new_sku_a_url_would_change_is_refused(sku: str) -> None:
    assert check_sku(sku) == sku  # one received before the rule stays usable
    with pytest.raises(InvalidSku) as caught:
        check_new_sku(sku)
    assert caught.value.code == "invalid_sku"


@given(st.from_regex(r"[A-Za-z0-9._:/-]{1,64}", fullmatch=True))
def test_a_new_sku_is_accepted_unless_a_url_would_change_it(sku: str) -> None:
    if any(segment in ("", ".", "..") for segment in sku.split("/")):
        with pytest.raises(InvalidSku):
            check_new_sku(sku)
    else:
        assert check_new_sku(sku) == sku


def test_inventory_id_is_derived_from_the_sku() -> None:
    assert inventory_id("SKU-1") == inventory_id("SKU-1")
    assert inventory_id("SKU-1") != inventory_id("SKU-2")
    assert inventory_id("SKU-1") != inventory_id("sku-1")
    assert isinstance(inventory_id("SKU-1"), UUID)


@pytest.mark.parametrize("text", ["alice", "Zoë Ångström", "a" * 200, "stock count 2024-05"])
def test_text(text: str) -> None:
    assert check_text(text, "owner") == text


@pytest.mark.parametrize(
    "text",
    [
        *("", "   ", "\t", "a\nb", "a\x00", "a\x7f", "a\x9b[2J", "a\u2028b", "a" * 201, None, 7),
        # Bidirectional overrides, embeddings and isolates: "ann\u202elee" shows as "anneel".
        *(f"ann{c}lee" for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"),
    ],
    ids=repr,
)
def test_bad_text_is_an_invalid_request(text: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_text(text, "owner")
    assert caught.value.code == "invalid_request"
    assert "owner" in str(caught.value)
    assert "200" in str(caught.value)


def test_uuid_accepts_uuids_and_their_text() -> None:
    value = uuid4()
    assert check_uuid(value, "account_id") == value
    assert check_uuid(str(value), "account_id") == value


@pytest.mark.parametrize("value", ["", "not-a-uuid", "1234", 5, None, b"\x00" * 16], ids=repr)
def test_bad_uuids_are_invalid_requests(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_uuid(value, "account_id")
    assert caught.value.code == "invalid_request"
    assert "account_id" in str(caught.value)


@pytest.mark.parametrize(
    "message",
    ["busy\x7f", "a\x9bb", "lone \ud800", "two\nlines\u2028", "x" * 500, " \t ", "a\u202eb"],
)
def test_any_message_made_text_is_taken_as_free_text(message: str) -> None:
    """A remote's error text, recorded with a saga's retry or a reconciliation, is made
    into text ``check_text`` takes, whatever it holds."""
    assert check_text(as_text(message), "error") == as_text(message)


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (check_text, "x" * 1_000_000),
        (check_sku, "S" * 500_000),
        (check_uuid, "u" * 300_000),
        (check_amount, "9" * 200_000),
        (check_currency, ["EUR"] * 50_000),
    ],
)
def test_a_refusal_echoes_a_huge_value_cut_short(check: Any, value: object) -> None:
    """A refusal echoed what was sent, whole: a megabyte owner name came back (and went
    into logs) as a megabyte message, twice (message and details)."""
    with pytest.raises(DomainError) as refused:
        check(value, "field")
    said = refused.value.message + str(refused.value.details)
    assert len(said) < 600, len(said)
    assert f"({len(repr(value))} characters)" in refused.value.message


def test_a_recorded_refusal_whose_class_this_process_lacks_replays_with_its_code() -> None:
    """A refusal of an embedding service's own command, recorded by a process that imports
    it and replayed by one that does not, kept its message but came back as
    ``domain_error``: a client that branches on the code saw another answer on retry."""
    from daybook.domain.errors import DomainError

    record = {
        "code": "loyalty_points_exhausted",
        "message": "no points left",
        "details": {"left": 0},
    }
    first = DomainError.from_record(record)
    assert isinstance(first, DomainError)
    assert (first.code, str(first), first.details) == (
        "loyalty_points_exhausted",
        "no points left",
        {"left": 0},
    )
    assert first.to_record() == record
    again = DomainError.from_record(record)
    assert type(again) is type(first)  # one class per code, made once
    assert DomainError.from_record({"code": "insufficient_funds", "message": "m"}).code == (
        "insufficient_funds"
    )


@pytest.mark.parametrize("text", ["\u200b", "\ufeff", "\u200b\u200d\u2060", "\u200f"], ids=repr)
def test_text_made_only_of_invisible_format_characters_is_blank(text: str) -> None:
    """An owner (a reason, any free text) of zero-width spaces and joiners, a byte order
    mark or a direction mark shows as nothing wherever it is printed: blank, as spaces are.
    Text with something to see around them stays valid."""
    with pytest.raises(InvalidRequest):
        check_text(text, "owner")
    assert check_text(f"ann{text}lee", "owner") == f"ann{text}lee"
