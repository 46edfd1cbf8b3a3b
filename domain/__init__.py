"""daybook's domain: aggregates, their rules, events and commands. The business, pure: no
I/O, threads, sleeps or persistence here."""

from daybook.domain.accounts import Account, AccountView
from daybook.domain.commands import Aggregates, Command, Receipt, command_named, registered
from daybook.domain.errors import DomainError
from daybook.domain.events import LedgerAggregate, Metadata
from daybook.domain.holds import Hold, HoldView
from daybook.domain.inventory import Inventory, StockView
from daybook.domain.linked import Atomic
from daybook.domain.orders import OrderLine, PlaceOrder
from daybook.domain.reconciliation import RemoteRecord
from daybook.domain.sagas import Saga, SagaDefinition, SagaView

__all__ = [
    "Account",
    "AccountView",
    "Aggregates",
    "Atomic",
    "Command",
    "DomainError",
    "Hold",
    "HoldView",
    "Inventory",
    "LedgerAggregate",
    "Metadata",
    "OrderLine",
    "PlaceOrder",
    "Receipt",
    "RemoteRecord",
    "Saga",
    "SagaDefinition",
    "SagaView",
    "StockView",
    "command_named",
    "registered",
]
