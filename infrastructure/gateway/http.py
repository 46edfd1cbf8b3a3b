"""The payment gateway over HTTP, with httpx (the adapter behind the ``PaymentGateway`` port).

The wire protocol is the fake gateway's (``fake.py``), shaped like common payment APIs:

    POST /charges        {"key", "amount", "currency", "customer", "reference"}
                         200 succeeded, 402 declined (the same answer again for the same key)
    GET  /charges/{key}  200 the charge, 404 none under that key
    GET  /charges?after=KEY&limit=N
                         200 {"charges": [...]}: keys after KEY (by code point), in order
    POST /refunds        {"key"}  200 {"status": "refunded" | "nothing_to_refund"}

Failures are sorted by what is known about the request: not sent, or turned away for now
before processing (``Unavailable``: 503, 429 and the other "try later" answers); possibly
processed (``OutcomeUnknown``: a timeout after sending, a 5xx, an answer that cannot be read);
refused for good (``Refused``: any other 4xx). Nothing else leaves this adapter: a saga
processor must be able to decide about every answer a gateway can give.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson

from daybook.infrastructure.compat.httpx import deadline as call_deadline
from daybook.infrastructure.compat.httpx import deadline_client
from daybook.infrastructure.gateway import (
    Charge,
    ChargeStatus,
    GatewayError,
    OutcomeUnknown,
    Refund,
    Refused,
    Unavailable,
)
from daybook.infrastructure.nesting import json_text, nested_deeper_than

T = TypeVar("T")

#: What reading an answer's JSON can raise when the answer is not what the protocol says:
#: not JSON, a field missing or of another type, an amount no integer can be (JSON's 1e999
#: reads as infinity: ``OverflowError``), nesting deeper than the reader goes.
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, RecursionError)

#: Answers that say "not now": the request was not processed, and may be later (a timeout
#: before the whole request arrived, a request with the same key in progress, too early,
#: too many requests).
_TRY_LATER = frozenset({408, 409, 425, 429, 503})

#: The largest answer read (bytes, after decompression): a listing of a thousand charges is
#: far below it. Read whole, a gateway's or a proxy's runaway answer took all the memory.
MAX_ANSWER = 16 * 1024 * 1024

#: The seconds a page of a listing may take to arrive whole (``HttpPaymentGateway.charges``).
LISTING_DEADLINE = 60.0


class HttpPaymentGateway:
    """A ``PaymentGateway`` at ``base_url``; thread-safe (one pooled httpx client)."""

    def __init__(
        self, base_url: str, *, timeout: float = 2.0, deadline: float | None = None
    ) -> None:
        self.base_url = base_url
        #: How long a whole call may take (``timeout`` bounds each connect, write and read:
        #: a body trickled a byte at a time held a call for as long as it went on).
        self.deadline = 2 * timeout if deadline is None else deadline
        self._client = deadline_client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def charge(
        self, key: str, *, amount: int, currency: str, customer: str, reference: str
    ) -> Charge:
        body = {
            "key": key,
            "amount": amount,
            "currency": currency,
            "customer": customer,
            "reference": reference,
        }
        response = self._send("POST", "/charges", json=body)
        if response.status_code in (200, 402):
            return _read(response, _charge_of(key))
        raise _unexpected(response)

    def lookup(self, key: str) -> Charge | None:
        response = self._send("GET", f"/charges/{quote(key, safe='')}")
        if response.status_code == 404:
            return None
        if response.status_code == 200:
            return _read(response, _charge_of(key))
        raise _unexpected(response)

    def refund(self, key: str) -> Refund:
        response = self._send("POST", "/refunds", json={"key": key})
        if response.status_code == 200:
            return _read(response, lambda data: _refund(key, data))
        raise _unexpected(response)

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        # A page of a thousand charges may come slowly: no look-up stands behind a listing
        # cut short (a reconciliation would stop at that page every run), so it gets longer.
        response = self._send(
            "GET",
            "/charges",
            params={"after": after, "limit": limit},
            deadline=max(self.deadline, LISTING_DEADLINE),
        )
        if response.status_code == 200:
            return _read(response, lambda data: [_listed(item) for item in data["charges"]])
        raise _unexpected(response)

    def _send(
        self, method: str, path: str, *, deadline: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = self._request(method, path, deadline or self.deadline, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # Never reached the remote.
            raise Unavailable(f"{method} {path}: {type(error).__name__}: {error}") from error
        except httpx.HTTPError as error:
            # Sent, perhaps processed: a read timeout, a connection dropped mid-answer, a
            # body that says it is compressed and is not (``DecodingError``, not a transport
            # error), too many redirects.
            raise OutcomeUnknown(f"{method} {path}: {type(error).__name__}: {error}") from error
        if response.status_code in _TRY_LATER:
            raise Unavailable(
                f"{method} {path}: the gateway answered {response.status_code}"
                f" (not processed; try later): {_excerpt(response)}",
                _retry_after(response),
            )
        return response

    def _request(self, method: str, path: str, deadline: float, **kwargs: Any) -> httpx.Response:
        """The answer, whole (status line, headers and body) within ``deadline`` seconds of
        the request (``compat.httpx.deadline``: every connect, read and write waits at most
        what is left), and at most ``MAX_ANSWER`` bytes of body."""
        request = self._client.build_request(method, path, **kwargs)
        with call_deadline(deadline):
            response = self._client.send(request, stream=True)
            try:
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise _Cut(f"{method} {path}: an answer of more than {MAX_ANSWER} bytes")
            finally:
                response.close()
        # The answer as read (decoded): without the headers that describe the encoded body.
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=request
        )

    def close(self) -> None:
        self._client.close()


class _Cut(httpx.HTTPError):
    """An answer given up on (too large): sent, perhaps processed."""


def _charge(data: dict[str, Any]) -> Charge:
    status = ChargeStatus(data["status"])
    if status is ChargeStatus.OTHER:
        raise ValueError("'other' is not a status a gateway answers")
    amount = data["amount"]
    refunded = data.get("refunded")
    if refunded is None:  # absent, or null: not refunded
        refunded = False
    # Integers of the minor unit, and a boolean: 100.9 read as 100, "100" and true as
    # numbers, and "false" as refunded.
    if type(amount) is not int:
        raise TypeError(f"an amount must be an integer, got {amount!r}")
    if type(refunded) is not bool:
        raise TypeError(f"refunded must be true or false, got {refunded!r}")
    return Charge(
        key=str(data["key"]),
        status=status,
        amount=amount,
        currency=str(data["currency"]),
        charge_id=_short_text(data, "charge_id"),
        decline_code=_short_text(data, "decline_code"),
        refunded=refunded,
    )


#: The longest charge id or decline code taken: both go into the order's saga events.
MAX_TEXT = 255


def _short_text(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or (type(value) is str and len(value) <= MAX_TEXT):
        return value
    raise ValueError(
        f"{name} must be text of at most {MAX_TEXT} characters, got {_cut(repr(value))}"
    )


def _charge_of(key: str) -> Callable[[Any], Charge]:
    """``_charge``, for an answer about ``key``: a charge under another key (a cache or a
    proxy mixing answers up) says nothing of this one, and completed an order."""

    def parse(data: Any) -> Charge:
        charge = _charge(data)
        if charge.key != key:
            raise ValueError(f"asked about {key!r}, answered about {charge.key!r}")
        return charge

    return parse


def _listed(item: dict[str, Any]) -> Charge:
    """A charge of a listing. One this adapter cannot read, but whose key it can, is
    ``OTHER`` (the account may hold other systems' charges, in states of their own): one
    such charge must not make the rest of the listing unreadable."""
    key = item["key"]
    if not isinstance(key, str):
        raise TypeError(f"a listed charge's key must be text, got {key!r}")
    try:
        return _charge(item)
    except _UNREADABLE as error:
        try:
            shown = _cut(orjson.dumps(item, default=str).decode())
        except orjson.JSONEncodeError:  # nested deeper than orjson writes
            shown = "(nested too deep to show)"
        return Charge(
            key=key, status=ChargeStatus.OTHER, amount=0, currency="", detail=f"{error}: {shown}"
        )


def _refund(key: str, data: dict[str, Any]) -> Refund:
    status = str(data["status"])
    if status not in ("refunded", "nothing_to_refund"):
        raise ValueError(f"unknown refund status {status!r}")
    return Refund(key, status, int(data.get("amount", 0)))


#: How deep an answer the standard library's reader is given (see ``_json``): half the
#: interpreter's recursion limit, the other half left for the code around it.
_MAX_NESTING = 500


def _json(body: bytes) -> Any:
    """The answer's JSON, read by the standard library's reader (it reads what a gateway may
    send and orjson refuses: a byte order mark, UTF-16, integers past 64 bits kept exact,
    and ``NaN`` or ``1e999``, which make only their charge unreadable, not a whole listing:
    ``_listed``). That reader recurses with the answer's nesting, down to the interpreter's
    limit, and any finalizer the collector ran meanwhile found no stack left: an answer
    nested deeper than ``_MAX_NESTING`` is refused first (``daybook.infrastructure.nesting``)."""
    text = json_text(body)
    if nested_deeper_than(text, _MAX_NESTING):
        raise ValueError(f"nested more than {_MAX_NESTING} levels")
    return json.loads(text)


def _read(response: httpx.Response, parse: Callable[[Any], T]) -> T:
    """``parse`` of the answer's JSON body. An answer that cannot be read (not JSON, a field
    missing, a status this adapter does not know) may still mean the request was processed:
    ``OutcomeUnknown``, so that the caller looks the key up."""
    try:
        return parse(_json(response.content))
    except _UNREADABLE as error:
        msg = (
            f"{response.request.method} {response.request.url.path}: the gateway's answer"
            f" ({response.status_code}) could not be read ({type(error).__name__}: {error}):"
            f" {_excerpt(response)}"
        )
        raise OutcomeUnknown(msg) from error


#: The longest wait a ``Retry-After`` is taken at (seconds).
_MAX_RETRY_AFTER = 3600.0


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date)."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _excerpt(response: httpx.Response) -> str:
    """The start of the answer's body, for a message (a gateway may answer a whole page)."""
    return _cut(response.text)


def _cut(text: str) -> str:
    """``text`` as a message shows it: its first 200 characters."""
    return text if len(text) <= 200 else f"{text[:200]}..."


def _unexpected(response: httpx.Response) -> GatewayError:
    if response.status_code >= 500:
        # The server failed while handling it: it may have done part of the work.
        return OutcomeUnknown(f"the gateway answered {response.status_code}: {_excerpt(response)}")
    if 400 <= response.status_code < 500:
        return Refused(
            f"the gateway refused the request ({response.status_code}): {_excerpt(response)}"
        )
    # 1xx, 3xx, or a 2xx this protocol does not use: nothing says what happened.
    return OutcomeUnknown(
        f"the gateway answered {response.status_code}, which this protocol does not use:"
        f" {_excerpt(response)}"
    )
