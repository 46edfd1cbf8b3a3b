"""Value checks shared by every command: amounts, currencies, SKUs, free text."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from uuid import UUID, uuid5

from daybook.domain.errors import (
    InvalidAmount,
    InvalidCurrency,
    InvalidRequest,
    InvalidSku,
    InvalidTimeout,
)

#: The largest integer a signed 64-bit column holds: the bound of every amount, count, log
#: position and sequence number daybook stores.
MAX_BIGINT = 2**63 - 1

#: Amounts and quantities are integers in 1 .. MAX_AMOUNT (fits a signed 64-bit column).
MAX_AMOUNT = MAX_BIGINT

#: Holds and reservations expire at most this many seconds after they are made (a year).
MAX_TIMEOUT = 366 * 24 * 3600

#: Active ISO 4217 currency codes (funds and precious metals included).
_ISO_4217_CODES = """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD
    BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP
    DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR
    IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD
    MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB
    PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD
    SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS
    VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA
    YER ZAR ZMW ZWG ZWL
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())

#: Unicode categories free text may not hold: controls, lone surrogates, line and paragraph
#: separators.
_NOT_TEXT = frozenset({"Cc", "Cs", "Zl", "Zp"})
#: Bidirectional embeddings, overrides and isolates: they reorder the text after them, so an
#: owner's name could show as another's wherever it is printed (a statement, the dashboard).
#: (Direction marks, which reorder nothing but the neutral characters beside them, may stay.)
REORDERING = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _not_text(char: str) -> bool:
    """Whether free text may not hold ``char`` (``_NOT_TEXT``, ``REORDERING``)."""
    return unicodedata.category(char) in _NOT_TEXT or char in REORDERING


_SKU = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
#: Parts of a SKU between slashes that a URL path would not keep as they are.
_RESOLVED_AWAY = frozenset({"", ".", ".."})
_NAMESPACE = UUID("6d2f1c44-7b35-4f0e-9a3e-3f2f6b1d0a11")


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a refusal that echoes what a caller sent, cut to ``limit``
    characters (saying how long it was): a megabyte sent is not a megabyte answered, or
    logged."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_amount(value: object, what: str = "amount") -> int:
    """Return ``value`` if it is an int in 1 .. MAX_AMOUNT, else refuse it."""
    # type() rather than isinstance(): bool is a subclass of int and must be refused.
    if type(value) is not int:
        raise InvalidAmount(
            f"{what} must be a whole number of minor units (int), got {type(value).__name__} "
            f"{shown(value)}",
            value=shown(value),
        )
    if not 0 < value <= MAX_AMOUNT:
        raise InvalidAmount(
            f"{what} must be between 1 and {MAX_AMOUNT}, got {value}", value=str(value)
        )
    return value


def check_delta(value: object, what: str = "adjustment") -> int:
    """A signed stock correction: a non-zero int whose size fits in 63 bits."""
    if type(value) is not int:
        raise InvalidAmount(
            f"{what} must be a whole number of units (int), got {type(value).__name__} "
            f"{shown(value)}",
            value=shown(value),
        )
    if value == 0 or abs(value) > MAX_AMOUNT:
        raise InvalidAmount(
            f"{what} must be non-zero and at most {MAX_AMOUNT} in size, got {value}",
            value=str(value),
        )
    return value


def check_limit(value: object, what: str = "overdraft_limit") -> int:
    """An overdraft limit: an int in 0 .. MAX_AMOUNT."""
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
        raise InvalidAmount(
            f"{what} must be an int between 0 and {MAX_AMOUNT}, got {shown(value)}",
            value=shown(value),
        )
    return value


def check_timeout(value: object, what: str = "timeout") -> int:
    """A timeout: whole seconds in 1 .. MAX_TIMEOUT (no floats: time in the write path is
    exact)."""
    if type(value) is not int or not 0 < value <= MAX_TIMEOUT:
        raise InvalidTimeout(
            f"{what} must be a whole number of seconds (int) between 1 and {MAX_TIMEOUT}, "
            f"got {type(value).__name__} {shown(value)}",
            value=shown(value),
        )
    return value


def check_currency(value: object, what: str = "currency") -> str:
    """An active ISO 4217 code, upper case, such as 'EUR'."""
    if not isinstance(value, str) or value not in ISO_4217:
        raise InvalidCurrency(
            f"{what} must be an ISO 4217 code such as 'EUR' or 'USD', got {shown(value)}",
            value=shown(value),
        )
    return value


def as_text(message: str, max_length: int = 200) -> str:
    """``message`` (text someone else chose: a remote's error, an exception's) as free text
    ``check_text`` takes: on one line, what it refuses replaced by U+FFFD, cut to
    ``max_length``."""
    line = " ".join(message.split())
    kept = "".join("\ufffd" if _not_text(c) else c for c in line)
    kept = kept[:max_length]
    return kept if _shows_something(kept) else "(no message)"


def _shows_something(value: str) -> bool:
    """Whether ``value`` has a character a reader sees: not only spaces and invisible format
    characters (zero-width spaces and joiners, a byte order mark, direction marks)."""
    return any(not c.isspace() and unicodedata.category(c) != "Cf" for c in value)


def check_sku(value: object, what: str = "SKU") -> str:
    """A SKU: 1 to 64 characters from A-Z a-z 0-9 . _ : / -. (A new one is checked further
    by ``check_new_sku``.)"""
    if not isinstance(value, str) or not _SKU.fullmatch(value):
        raise InvalidSku(
            f"{what} must be 1-64 characters of letters, digits and . _ : / -, got {shown(value)}",
            value=shown(value),
        )
    return value


def check_new_sku(value: str) -> str:
    """A SKU stock is first received for: ``check_sku``'s, with no empty, "." or ".." part
    between slashes, which a URL's path resolves away (GET /v1/stock/A/../B reads B). Only
    new SKUs are held to it: one received before the rule stays usable, its stock and its
    open reservations (the expiry sweeper, an order's steps) included."""
    if not _RESOLVED_AWAY.isdisjoint(value.split("/")):
        raise InvalidSku(
            f"a new SKU may not have an empty, '.' or '..' part between slashes (a URL would "
            f"read it as another), got {shown(value)}",
            value=shown(value),
        )
    return value


def check_instant(value: object, what: str) -> datetime:
    """A moment: a ``datetime`` with a time zone. A naive one written to the log could not
    be compared with the aware times every process judges by, for good."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidRequest(
            f"{what} must be a datetime with a time zone, got {shown(value)}", field=what
        )
    return value


def check_text(value: object, what: str, max_length: int = 200) -> str:
    """Free text such as an owner name or a reason: non-blank, bounded, on one line, no
    control chars (DEL and the C1 range as well as those below space: a terminal acts on
    them), no bidirectional overrides (``REORDERING``), and no lone surrogates (a Python
    string may hold them; UTF-8, and so the event store, cannot)."""
    if (
        not isinstance(value, str)
        or not _shows_something(value)
        or len(value) > max_length
        or any(_not_text(c) for c in value)
    ):
        raise InvalidRequest(
            f"{what} must be non-blank text of at most {max_length} characters on one "
            "line, without control characters, bidirectional overrides (U+202A-U+202E, "
            f"U+2066-U+2069) or lone surrogates, got {shown(value)}",
            field=what,
        )
    return value


#: The longest request id (and correlation, causation or reservation id).
MAX_REQUEST_TEXT = 200


def check_request_text(value: object, what: str) -> str:
    """A request, correlation or causation id, or a reservation id: 1-200 printable
    characters chosen by the caller."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_REQUEST_TEXT
        or not value.isprintable()
    ):
        raise InvalidRequest(
            f"{what} must be 1-200 printable characters, got {shown(value)}", field=what
        )
    return value


def check_uuid(value: object, what: str) -> UUID:
    """An aggregate id: a UUID, or its string form."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise InvalidRequest(f"{what} must be a UUID, got {shown(value)}", field=what)


def inventory_id(sku: str) -> UUID:
    """The id of a SKU's Inventory aggregate: derived, so no lookup table is needed."""
    return uuid5(_NAMESPACE, f"sku:{sku}")
