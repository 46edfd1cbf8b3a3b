"""daybook's application layer and adapters: the ledger service, event stores by URL, codecs,
read-model runners, the relay and stream workers, the CLI."""
