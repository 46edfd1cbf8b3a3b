"""The composition root: the one place where URLs become wired objects."""

from __future__ import annotations

from domain.ledger import Ledger
from infrastructure.urls import DEFAULT_URL, event_store_env


def open_ledger(url: str = DEFAULT_URL) -> Ledger:
    """A ``Ledger`` on the event store at ``url`` (tables are created if missing)."""
    return Ledger(env=event_store_env(url))
