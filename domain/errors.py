"""Every way a command can be refused, each with a stable code.

Callers branch on ``error.code``; people read ``str(error)``. ``error.details`` holds the
numbers that broke the rule, as JSON-friendly values, so a refusal can be recorded and
replayed exactly when the same request is retried.
"""

from __future__ import annotations

from typing import Any, ClassVar


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
        DomainError._by_code[cls.code] = cls

    def to_record(self) -> dict[str, Any]:
        """The refusal as JSON-friendly data, for the idempotency record."""
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DomainError:
        """Rebuild the exact refusal that was recorded for a request."""
        error_class = DomainError._by_code.get(record["code"], DomainError)
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


class CurrencyMismatch(DomainError):
    """A transfer between accounts of different currencies."""

    code = "currency_mismatch"


class SameAccount(DomainError):
    """A transfer from an account to itself."""

    code = "same_account"


class InsufficientFunds(DomainError):
    """A debit would take the balance below minus the overdraft limit."""

    code = "insufficient_funds"


class AccountNotFound(DomainError):
    """No account has this id."""

    code = "account_not_found"


class AccountClosed(DomainError):
    """The account is closed and refuses every command."""

    code = "account_closed"


class AccountNotEmpty(DomainError):
    """An account can only be closed at a zero balance."""

    code = "account_not_empty"


class BalanceOverflow(DomainError):
    """A credit would take the balance past 2**63-1."""

    code = "balance_overflow"


class SkuNotFound(DomainError):
    """No stock was ever received for this SKU."""

    code = "sku_not_found"


class OutOfStock(DomainError):
    """A reservation asks for more than is available."""

    code = "out_of_stock"


class StockBelowReserved(DomainError):
    """An adjustment would leave less stock on hand than is reserved."""

    code = "stock_below_reserved"


class StockOverflow(DomainError):
    """Receiving or adjusting would take on-hand stock past 2**63-1."""

    code = "stock_overflow"


class ReservationNotFound(DomainError):
    """No reservation has this id for this SKU."""

    code = "reservation_not_found"


class ReservationResolved(DomainError):
    """The reservation was already committed or released."""

    code = "reservation_resolved"


class ReservationExists(DomainError):
    """A reservation id was used twice for one SKU."""

    code = "reservation_exists"


class IdempotencyConflict(DomainError):
    """A request id was reused with a different command or payload."""

    code = "idempotency_conflict"


class ConcurrencyConflict(DomainError):
    """Other writers kept changing the same aggregates; the command was not applied."""

    code = "concurrency_conflict"
