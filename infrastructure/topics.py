"""Topics stored before daybook installed as one package.

Every stored event names its class by topic (``module:qualname``), and every aggregate's
first event names the aggregate class. daybook 0.1 installed its layers as top-level
packages, so its events were stored as ``domain.accounts:Account.Opened``; they now live in
``daybook.domain``. Each topic 0.1 could write is registered, exactly, with the class that
replaced it, so old logs (and old messages on the events topic) still load. Exact topics
rather than the whole ``domain`` package: an embedding service may have a ``domain`` package
of its own, whose topics must keep resolving to its own classes.
"""

from __future__ import annotations

import functools

from eventsourcing.utils import get_topic, register_topic

from daybook.domain.accounts import Account
from daybook.domain.events import LedgerAggregate
from daybook.domain.inventory import Inventory

_BEFORE_0_2 = {
    "domain.accounts:Account": Account,
    "domain.accounts:Account.Opened": Account.Opened,
    "domain.accounts:Account.Deposited": Account.Deposited,
    "domain.accounts:Account.Withdrawn": Account.Withdrawn,
    "domain.accounts:Account.TransferredOut": Account.TransferredOut,
    "domain.accounts:Account.TransferredIn": Account.TransferredIn,
    "domain.accounts:Account.Closed": Account.Closed,
    "domain.inventory:Inventory": Inventory,
    "domain.inventory:Inventory.Created": Inventory.Created,
    "domain.inventory:Inventory.StockReceived": Inventory.StockReceived,
    "domain.inventory:Inventory.StockAdjusted": Inventory.StockAdjusted,
    "domain.inventory:Inventory.StockReserved": Inventory.StockReserved,
    "domain.inventory:Inventory.ReservationCommitted": Inventory.ReservationCommitted,
    "domain.inventory:Inventory.ReservationReleased": Inventory.ReservationReleased,
}

for _topic, _class in _BEFORE_0_2.items():
    register_topic(_topic, _class)


@functools.cache
def reader_topics(kind: type[LedgerAggregate]) -> tuple[str, ...] | None:
    """The stored topics of the events that change what a command judges of an aggregate
    of ``kind`` it only reads (``LedgerAggregate.changes_for_readers``), under this
    daybook's names and those older ones stored them under; None: any event."""
    names = kind.changes_for_readers
    if names is None:
        return None
    events = [getattr(kind, name) for name in names]
    old = {topic for topic, known in _BEFORE_0_2.items() if known in events}
    return tuple(sorted({get_topic(event) for event in events} | old))
