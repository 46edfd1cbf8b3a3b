"""daybook's domain: aggregates, their rules, and the Ledger application. No I/O here."""

from domain.accounts import Account
from domain.errors import DomainError
from domain.events import Metadata
from domain.inventory import Inventory
from domain.ledger import AccountView, Ledger, Receipt, StockView

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
