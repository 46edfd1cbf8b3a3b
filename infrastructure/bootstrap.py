"""The composition root: the one place where URLs become wired objects."""

from __future__ import annotations

from daybook.domain.ledger import Ledger
from daybook.infrastructure.aggregate_cache import install_aggregate_cache
from daybook.infrastructure.aio import AsyncLedger
from daybook.infrastructure.group_commit import GroupCommitter
from daybook.infrastructure.urls import DEFAULT_URL, event_store_env


def open_ledger(url: str = DEFAULT_URL, *, group_commit: bool = True) -> Ledger:
    """A ``Ledger`` on the event store at ``url`` (tables are created if missing).

    With ``group_commit`` (the default), concurrent commands from many threads share
    transactions; without it, each command commits alone.
    """
    ledger = Ledger(env=event_store_env(url))
    install_aggregate_cache(ledger)
    if group_commit:
        ledger.install_committer(GroupCommitter)
    return ledger


def open_async_ledger(url: str = DEFAULT_URL) -> AsyncLedger:
    """An asyncio ``AsyncLedger`` on the event store at ``url`` (always group commit)."""
    return AsyncLedger(open_ledger(url))
