"""daybook's domain: aggregates, their rules, and the Ledger application. No I/O here."""

from daybook.domain.accounts import Account
from daybook.domain.errors import DomainError
from daybook.domain.events import Metadata
from daybook.domain.inventory import Inventory
from daybook.domain.ledger import AccountView, Ledger, Receipt, StockView

__all__ = [
    "Account",
    "AccountView",
    "DomainError",
    "Inventory",
    "Ledger",
    "Metadata",
    "Receipt",
    "StockView",
]
