"""daybook: an event-sourced ledger with CQRS projections.

This is the public face (installed as the package ``daybook``; its source is this folder, see
``package-dir`` in pyproject.toml). Everything an embedding service needs is importable from
here; the layers behind it are ``daybook.domain`` (the business, pure),
``daybook.projections`` (read-model definitions, pure) and ``daybook.infrastructure``
(the ledger service, adapters, services, CLI).
"""

from daybook.domain import errors
from daybook.domain.errors import DomainError
from daybook.domain.ledger import AccountView, Ledger, Receipt, StockView
from daybook.infrastructure.aio import AsyncLedger
from daybook.infrastructure.bootstrap import open_async_ledger, open_ledger
from daybook.infrastructure.readmodels import StaleRead, open_read_models, run_projections

__all__ = [
    "AccountView",
    "AsyncLedger",
    "DomainError",
    "Ledger",
    "Receipt",
    "StaleRead",
    "StockView",
    "errors",
    "open_async_ledger",
    "open_ledger",
    "open_read_models",
    "run_projections",
]
