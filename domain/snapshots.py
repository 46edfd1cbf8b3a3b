"""Snapshots: an aggregate's state at one version, so that loading it need not replay its
whole history.

A snapshot is a contract like an event: a pydantic model whose fields are the aggregate's
state, validated when taken and when read back, with a ``class_version`` and
``upcast_vN_vN+1`` functions when its shape changes (and ``replay_below`` when snapshots
older code took are wrong: they are not read). ``take`` refuses an aggregate whose state
has an attribute the contract does not carry (it would be lost on load): give the snapshot
the new field and a higher version in the same change that gives the aggregate its state.

Each snapshot class names the aggregate it is for (``of``); ``snapshot_class`` finds it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Self
from uuid import UUID

from eventsourcing.utils import get_topic

from daybook.domain.accounts import Account
from daybook.domain.events import DomainEvent, LedgerAggregate
from daybook.domain.inventory import Inventory

#: What every aggregate's state holds besides its own fields (eventsourcing's bookkeeping).
_BASE = frozenset({"_id", "_version", "_created_on", "_modified_on", "_pending_events"})
#: Set on a copy by the ledger while it judges a command or a read, never part of the state.
_TRANSIENT = frozenset({"as_of"})
_SNAPSHOTS: dict[type[LedgerAggregate], type[LedgerSnapshot]] = {}


class SnapshotMismatch(TypeError):
    """An aggregate's state and its snapshot contract do not have the same fields."""


class LedgerSnapshot(DomainEvent):
    """Base of snapshot contracts: when and where the aggregate was, then its fields."""

    #: The aggregate class this snapshot is for.
    of: ClassVar[type[LedgerAggregate]]
    #: The first schema version whose snapshots are read. One taken at an older version is
    #: not: its aggregate is replayed from its events. For when older code got the state
    #: wrong, which no upcast can right.
    replay_below: ClassVar[int] = 1

    created_on: datetime
    modified_on: datetime

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        of = cls.__dict__.get("of")
        if of is not None:
            _SNAPSHOTS[of] = cls

    @classmethod
    def _own_fields(cls) -> frozenset[str]:
        return frozenset(cls.model_fields) - frozenset(LedgerSnapshot.model_fields)

    @classmethod
    def take(cls, aggregate: LedgerAggregate) -> Self:
        """A snapshot of ``aggregate`` as it is (its pending events are not part of it)."""
        state = vars(aggregate)
        own = state.keys() - _BASE - _TRANSIENT
        wanted = cls._own_fields()
        if own != wanted:
            missing, extra = sorted(own - wanted), sorted(wanted - own)
            msg = f"{cls.__name__} does not match {type(aggregate).__name__}'s state:"
            if missing:
                msg += f" the aggregate has {', '.join(missing)}, which the snapshot lacks"
            if extra:
                msg += f" the snapshot has {', '.join(extra)}, which the aggregate lacks"
            raise SnapshotMismatch(msg)
        return cls(
            originator_id=aggregate.id,
            originator_version=aggregate.version,
            timestamp=cls.create_timestamp(),
            created_on=aggregate.created_on,
            modified_on=aggregate.modified_on,
            **{name: state[name] for name in wanted},
        )

    @staticmethod
    def create_timestamp() -> datetime:
        return LedgerAggregate.Event.create_timestamp()

    @property
    def topic(self) -> str:
        """The aggregate's topic (eventsourcing's snapshot protocol names one)."""
        return get_topic(self.of)

    def mutate(self, _: None) -> LedgerAggregate:
        """The aggregate this snapshot was taken of (containers copied: the snapshot stays
        as it was)."""
        aggregate = object.__new__(self.of)
        state: dict[str, Any] = {
            "_id": self.originator_id,
            "_version": self.originator_version,
            "_created_on": self.created_on,
            "_modified_on": self.modified_on,
            "_pending_events": [],
        }
        for name in self._own_fields():
            value = getattr(self, name)
            state[name] = value.copy() if isinstance(value, dict | list | set) else value
        aggregate.__dict__ = state
        return aggregate


def snapshot_class(kind: type[LedgerAggregate]) -> type[LedgerSnapshot] | None:
    """The snapshot contract for aggregates of ``kind``, if it has one."""
    return _SNAPSHOTS.get(kind)


class AccountSnapshot(LedgerSnapshot):
    """An ``Account`` at one version."""

    of: ClassVar[type[LedgerAggregate]] = Account

    owner: str
    currency: str
    overdraft_limit: int
    balance: int
    status: str
    holds: dict[UUID, tuple[int, datetime]]


class InventorySnapshot(LedgerSnapshot):
    """An ``Inventory`` (one SKU's stock) at one version: open reservations only, like the
    aggregate (see ``Inventory``). Version 2 has version 1's fields; version 1 snapshots
    were taken by code that read a ``StockReserved`` of version 2 stored without
    ``claimed`` as claimed, and may lack its id in ``unclaimed``: they are not read."""

    of: ClassVar[type[LedgerAggregate]] = Inventory
    class_version = 2
    replay_below = 2

    sku: str
    on_hand: int
    reserved: int
    reservations: dict[str, int]
    expiring: dict[str, datetime]
    unclaimed: set[str]

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        """The same fields: a version 1 snapshot still decodes (the store does not read it,
        ``replay_below``; a tool may)."""


__all__ = [
    "AccountSnapshot",
    "InventorySnapshot",
    "LedgerSnapshot",
    "SnapshotMismatch",
    "snapshot_class",
]
