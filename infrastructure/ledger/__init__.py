"""The application layer of the write side: the ledger service (unit of work, idempotency,
retries), its committers (one at a time, or group commit), the aggregate cache, and the
blocking and asyncio faces callers use."""
