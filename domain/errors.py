"""Refusals: the base class, and the rules every command shares, each with a stable code.

Callers branch on ``error.code``; people read ``str(error)``. ``error.details`` holds the
numbers that broke the rule, as JSON-friendly values, so a refusal can be recorded and
replayed exactly when the same request is retried.

A rule that belongs to one aggregate is refused by an error defined beside it (account rules
in ``accounts``, stock rules in ``inventory``); every subclass registers its code here, so a
recorded refusal is rebuilt as the same class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


def same_class(known: type, new: type) -> bool:
    """Whether ``new`` is ``known`` defined again (its module run again: a reload), rather
    than another class of the same name elsewhere."""
    return (known.__module__, known.__qualname__) == (new.__module__, new.__qualname__)


#: Codes daybook answers with that are no command's refusal (an outage, a read not reached
#: yet, the HTTP face's own), by who answers them: no refusal may take one (a client would
#: take a business refusal for an outage, and retry it for ever). See ``reserve_codes``.
_NOT_REFUSALS: dict[str, str] = {}


def reserve_codes(codes: Iterable[str], owner: str) -> None:
    """Keep ``codes`` from refusals; a refusal class that took one already is refused now."""
    for code in codes:
        known = DomainError._by_code.get(code)
        if known is not None and not known.__dict__.get("_stand_in"):
            msg = (
                f"refusal code {code!r} of {known.__module__}.{known.__qualname__} is "
                f"{owner}'s, not a refusal's; give the refusal a code of its own"
            )
            raise TypeError(msg)
        _NOT_REFUSALS.setdefault(code, owner)


class DomainError(Exception):
    """A command was refused; nothing was written."""

    code: ClassVar[str] = "domain_error"
    _by_code: ClassVar[dict[str, type[DomainError]]] = {}

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            return  # its parent's code, which keeps naming the parent
        owner = _NOT_REFUSALS.get(cls.code)
        if owner is not None:
            msg = (
                f"refusal code {cls.code!r} is {owner}'s, not a refusal's (a client would "
                f"take the refusal for it); give {cls.__module__}.{cls.__qualname__} a code "
                "of its own"
            )
            raise TypeError(msg)
        known = DomainError._by_code.get(cls.code)
        if known is not None and issubclass(cls, known) and not same_class(known, cls):
            return  # its parent's code, repeated: it keeps naming the parent
        if known is not None and not same_class(known, cls) and not known.__dict__.get("_stand_in"):
            # A replayed refusal is rebuilt as the class of its code: another class taking
            # the code would turn daybook's refusals into a service's (``except
            # InsufficientFunds`` then missing them), or the other way round.
            msg = (
                f"refusal code {cls.code!r} is taken by {known.__module__}.{known.__qualname__};"
                f" give {cls.__module__}.{cls.__qualname__} a code of its own"
            )
            raise TypeError(msg)
        DomainError._by_code[cls.code] = cls

    def to_record(self) -> dict[str, Any]:
        """The refusal as JSON-friendly data, for the idempotency record."""
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DomainError:
        """Rebuild the exact refusal that was recorded for a request. A code no class of
        this process defines (a refusal of an embedding service's own command, recorded by
        a process that imports it, replayed by one that does not) keeps its code: a
        ``DomainError`` subclass is made for it, once."""
        code = record["code"]
        error_class = DomainError._by_code.get(code)
        if error_class is None:
            # A stand-in: the class that defines the code, imported later, replaces it.
            error_class = type(
                f"Recorded_{code}", (DomainError,), {"code": code, "_stand_in": True}
            )
        return error_class(record["message"], **record.get("details", {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidAmount(DomainError):
    """An amount or quantity is not an integer in 1 .. 2**63-1."""

    code = "invalid_amount"


class InvalidCurrency(DomainError):
    """A currency is not an ISO 4217 code."""

    code = "invalid_currency"


class InvalidRequest(DomainError):
    """A field other than an amount is malformed (owner, request id, reason...)."""

    code = "invalid_request"


class InvalidSku(DomainError):
    """A SKU is empty, too long, or has characters outside [A-Za-z0-9._:/-]."""

    code = "invalid_sku"


class IdTaken(DomainError):
    """A new aggregate's id (caller-chosen, or derived from a SKU, an order id, a reservation
    id...) names a record of another kind already: no retry could create it there."""

    code = "id_taken"


class IdempotencyConflict(DomainError):
    """A request id was reused with a different command or payload."""

    code = "idempotency_conflict"


class ConcurrencyConflict(DomainError):
    """Other writers kept changing the same aggregates; the command was not applied."""

    code = "concurrency_conflict"


class UnknownOutcome(DomainError):
    """This very command may have been applied before (its answer was lost in an outage)
    and the ledger can no longer tell: it was not run again."""

    code = "outcome_unknown"


class InvalidTimeout(DomainError):
    """A timeout is not a whole number of seconds in range."""

    code = "invalid_timeout"
