"""daybook's adapters: event stores by URL, codecs, runners, relay, CLI."""

from infrastructure.aio import AsyncLedger
from infrastructure.bootstrap import open_async_ledger, open_ledger
from infrastructure.readmodels import StaleRead, open_read_models, run_projections

__all__ = [
    "AsyncLedger",
    "StaleRead",
    "open_async_ledger",
    "open_ledger",
    "open_read_models",
    "run_projections",
]
