"""daybook: an event-sourced ledger with CQRS projections.

This is the public face (installed as the package ``daybook``; its source is this folder, see
``package-dir`` in pyproject.toml). Everything an embedding service needs is importable from
here; the layers behind it are ``daybook.domain`` (the business, pure),
``daybook.projections`` (read-model definitions, pure) and ``daybook.infrastructure``
(the ledger service, adapters, services, CLI).
"""

from daybook.domain.accounts import (
    AccountClosed,
    AccountExists,
    AccountNotEmpty,
    AccountNotFound,
    AccountView,
    BalanceOverflow,
    CurrencyMismatch,
    InsufficientFunds,
    SameAccount,
)
from daybook.domain.commands import Command, Receipt
from daybook.domain.errors import (
    ConcurrencyConflict,
    DomainError,
    IdempotencyConflict,
    InvalidAmount,
    InvalidCurrency,
    InvalidRequest,
    InvalidSku,
    InvalidTimeout,
    UnknownOutcome,
)
from daybook.domain.holds import (
    HoldExists,
    HoldExpired,
    HoldNotExpired,
    HoldNotFound,
    HoldResolved,
    HoldView,
)
from daybook.domain.inventory import (
    OutOfStock,
    ReservationExists,
    ReservationExpired,
    ReservationNotExpired,
    ReservationNotFound,
    ReservationResolved,
    SkuNotFound,
    StockBelowReserved,
    StockOverflow,
    StockView,
)
from daybook.domain.linked import LinkedCommandFailed
from daybook.domain.orders import OrderLine, PlaceOrder
from daybook.domain.sagas import SagaExists, SagaFinished, SagaMovedOn, SagaNotFound, SagaView
from daybook.infrastructure.bootstrap import (
    open_async_ledger,
    open_event_log,
    open_ledger,
    open_read_models,
    run_projections,
)
from daybook.infrastructure.ledger.application import (
    LedgerClosed,
    LedgerForked,
    StorageFull,
    Unavailable,
)
from daybook.infrastructure.ledger.facade import AsyncLedger, Ledger
from daybook.infrastructure.preflight import PermissionDenied
from daybook.infrastructure.readmodels import ReadModelChanged, StaleRead
from daybook.infrastructure.sagas import place_order
from daybook.infrastructure.settings import Settings
from daybook.infrastructure.urls import BadURL

__version__ = "0.3.0"  # keep in step with pyproject.toml

__all__ = [
    "AccountClosed",
    "AccountExists",
    "AccountNotEmpty",
    "AccountNotFound",
    "AccountView",
    "AsyncLedger",
    "BadURL",
    "BalanceOverflow",
    "Command",
    "ConcurrencyConflict",
    "CurrencyMismatch",
    "DomainError",
    "HoldExists",
    "HoldExpired",
    "HoldNotExpired",
    "HoldNotFound",
    "HoldResolved",
    "HoldView",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidCurrency",
    "InvalidRequest",
    "InvalidSku",
    "InvalidTimeout",
    "Ledger",
    "LedgerClosed",
    "LedgerForked",
    "LinkedCommandFailed",
    "OrderLine",
    "OutOfStock",
    "PermissionDenied",
    "PlaceOrder",
    "ReadModelChanged",
    "Receipt",
    "ReservationExists",
    "ReservationExpired",
    "ReservationNotExpired",
    "ReservationNotFound",
    "ReservationResolved",
    "SagaExists",
    "SagaFinished",
    "SagaMovedOn",
    "SagaNotFound",
    "SagaView",
    "SameAccount",
    "Settings",
    "SkuNotFound",
    "StaleRead",
    "StockBelowReserved",
    "StockOverflow",
    "StockView",
    "StorageFull",
    "Unavailable",
    "UnknownOutcome",
    "open_async_ledger",
    "open_event_log",
    "open_ledger",
    "open_read_models",
    "place_order",
    "run_projections",
]
