"""daybook's adapters: event stores by URL, codecs, runners, relay, CLI."""

from infrastructure.aio import AsyncLedger
from infrastructure.bootstrap import open_async_ledger, open_ledger

__all__ = ["AsyncLedger", "open_async_ledger", "open_ledger"]
