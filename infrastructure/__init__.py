"""daybook's adapters: event stores by URL, codecs, runners, relay, CLI."""

from infrastructure.bootstrap import open_ledger

__all__ = ["open_ledger"]
