"""The payment gateway over HTTP, with httpx (the adapter behind the ``PaymentGateway`` port).

The wire protocol is the fake gateway's (``fake.py``), shaped like common payment APIs:

    POST /charges        {"key", "amount", "currency", "customer", "reference"}
                         200 succeeded, 402 declined (the same answer again for the same key)
    GET  /charges/{key}  200 the charge, 404 none under that key
    GET  /charges?after=KEY&limit=N
                         200 {"charges": [...]}: keys after KEY (by code point), in order
    POST /refunds        {"key"}  200 {"status": "refunded" | "nothing_to_refund"}

Failures are sorted by what is known about the request: not sent or refused before
processing (``Unavailable``), or possibly processed (``OutcomeUnknown``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from daybook.infrastructure.gateway import (
    Charge,
    ChargeStatus,
    GatewayError,
    OutcomeUnknown,
    Refund,
    Unavailable,
)


class HttpPaymentGateway:
    """A ``PaymentGateway`` at ``base_url``; thread-safe (one pooled httpx client)."""

    def __init__(self, base_url: str, *, timeout: float = 2.0) -> None:
        self.base_url = base_url
        self._client = httpx.Client(
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
            return _charge(response.json())
        raise _unexpected(response)

    def lookup(self, key: str) -> Charge | None:
        response = self._send("GET", f"/charges/{quote(key, safe='')}")
        if response.status_code == 404:
            return None
        if response.status_code == 200:
            return _charge(response.json())
        raise _unexpected(response)

    def refund(self, key: str) -> Refund:
        response = self._send("POST", "/refunds", json={"key": key})
        if response.status_code == 200:
            data = response.json()
            return Refund(key, str(data["status"]), int(data.get("amount", 0)))
        raise _unexpected(response)

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        response = self._send("GET", "/charges", params={"after": after, "limit": limit})
        if response.status_code == 200:
            return [_charge(item) for item in response.json()["charges"]]
        raise _unexpected(response)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # Never reached the remote.
            raise Unavailable(f"{method} {path}: {type(error).__name__}: {error}") from error
        except httpx.TransportError as error:
            # Sent, perhaps processed: a read timeout, a connection dropped mid-answer.
            raise OutcomeUnknown(f"{method} {path}: {type(error).__name__}: {error}") from error
        if response.status_code == 503:
            raise Unavailable(f"{method} {path}: the gateway answered 503")
        return response

    def close(self) -> None:
        self._client.close()


def _charge(data: dict[str, Any]) -> Charge:
    return Charge(
        key=str(data["key"]),
        status=ChargeStatus(data["status"]),
        amount=int(data["amount"]),
        currency=str(data["currency"]),
        charge_id=data.get("charge_id"),
        decline_code=data.get("decline_code"),
        refunded=bool(data.get("refunded", False)),
    )


def _unexpected(response: httpx.Response) -> GatewayError:
    if response.status_code >= 500:
        # The server failed while handling it: it may have done part of the work.
        return OutcomeUnknown(f"the gateway answered {response.status_code}: {response.text}")
    msg = f"the gateway refused the request ({response.status_code}): {response.text}"
    raise ValueError(msg)
