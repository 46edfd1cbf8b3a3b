"""Read-model definitions: how each event changes rows. Pure; runner-agnostic.

A ``Projection`` names its tables and maps event types to handlers; a handler is a pure
function of a ``LogEvent`` (which carries its log position) over an abstract ``Rows`` store.
Runners (the in-process runner in ``infrastructure.readmodels``, the faust workers) supply the
store, batching and tracking; ``replay`` builds the same rows in memory.
"""

from daybook.projections.accounts import ACCOUNT_BALANCES, ACCOUNT_STATEMENT
from daybook.projections.activity import DAILY_ACTIVITY
from daybook.projections.holds import OPEN_HOLDS_PROJECTION
from daybook.projections.inventory import INVENTORY_LEVELS
from daybook.projections.model import (
    Column,
    Key,
    LogEvent,
    MemoryRows,
    Projection,
    Row,
    Rows,
    Table,
    Value,
    event_type,
    replay,
)
from daybook.projections.sagas import SAGA_LIST

#: The projections daybook runs by default, at their current versions.
ALL: tuple[Projection, ...] = (
    ACCOUNT_BALANCES,
    ACCOUNT_STATEMENT,
    INVENTORY_LEVELS,
    DAILY_ACTIVITY,
    OPEN_HOLDS_PROJECTION,
    SAGA_LIST,
)


def by_name(name: str, projections: tuple[Projection, ...] = ALL) -> Projection:
    """The projection called ``name``; the message lists the known names."""
    for projection in projections:
        if projection.name == name:
            return projection
    known = ", ".join(p.name for p in projections)
    msg = f"no projection is called {name!r}; known: {known}"
    raise KeyError(msg)


__all__ = [
    "ACCOUNT_BALANCES",
    "ACCOUNT_STATEMENT",
    "ALL",
    "DAILY_ACTIVITY",
    "INVENTORY_LEVELS",
    "OPEN_HOLDS_PROJECTION",
    "SAGA_LIST",
    "Column",
    "Key",
    "LogEvent",
    "MemoryRows",
    "Projection",
    "Row",
    "Rows",
    "Table",
    "Value",
    "by_name",
    "event_type",
    "replay",
]
