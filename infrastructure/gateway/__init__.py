"""The payment gateway port: what a saga's remote payment steps call, and what they may get.

Every call carries an idempotency key: a repeated ``charge`` with the same key is answered
with the original result, never charged twice. A failed call says which of two things is
known: ``Unavailable`` (the request was not processed: safe to try again),
``OutcomeUnknown`` (it may have been: look the key up before deciding anything), or
``Refused`` (the remote answered that it will not process it as asked: asking again the same
way gets the same answer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class ChargeStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    #: Listed (``charges``) in a state daybook does not know, or unreadable: another
    #: system's charge in the same account, say (``Charge.detail`` says what was listed).
    #: ``charge`` and ``lookup`` never answer it: an answer they cannot read is
    #: ``OutcomeUnknown``.
    OTHER = "other"


@dataclass(frozen=True)
class Charge:
    """The remote's record of a charge (by its idempotency key)."""

    key: str
    status: ChargeStatus
    amount: int
    currency: str
    charge_id: str | None = None
    decline_code: str | None = None
    refunded: bool = False
    #: For a charge listed as ``OTHER``: what the listing said of it.
    detail: str | None = None

    def is_for(self, amount: int, currency: str) -> bool:
        """Whether this is a charge of ``amount`` in ``currency`` (an ISO code, upper case
        as daybook keeps it; some gateways write it in lower case: the same currency)."""
        return (self.amount, self.currency.upper()) == (amount, currency)


@dataclass(frozen=True)
class Refund:
    key: str
    #: ``refunded``: the charge was refunded (now or before); ``nothing_to_refund``: there is
    #: no successful charge under the key (and none will be accepted after this).
    status: str
    amount: int = 0


class GatewayError(Exception):
    """A call that did not get an answer. ``retry_after``: the seconds the remote asked to
    be left alone before the next try (``Retry-After``), if it said (only an ``Unavailable``
    can carry one)."""

    retry_after: float | None = None


class Unavailable(GatewayError):
    """The request was not processed (refused connection, the remote said so)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutcomeUnknown(GatewayError):
    """The request may or may not have been processed (a timeout after sending, a dropped
    connection): the caller must look the key up, never guess."""


class Refused(GatewayError):
    """The remote answered, and refused the request without processing it (a bad request,
    credentials it does not accept): the same request would be refused again."""


class PaymentGateway(Protocol):
    """The port: implemented by ``HttpPaymentGateway`` (httpx), served for tests and the
    demo by ``FakeGatewayServer``."""

    def charge(
        self, key: str, *, amount: int, currency: str, customer: str, reference: str
    ) -> Charge: ...

    def lookup(self, key: str) -> Charge | None: ...

    def refund(self, key: str) -> Refund: ...

    def charges(self, after: str = "", limit: int = 1000) -> list[Charge]:
        """The charges whose key sorts after ``after`` (by code point), in that order, at most
        ``limit`` of them: reconciliation pages through every charge the remote holds."""
        ...


__all__ = [
    "Charge",
    "ChargeStatus",
    "GatewayError",
    "OutcomeUnknown",
    "PaymentGateway",
    "Refund",
    "Refused",
    "Unavailable",
]
