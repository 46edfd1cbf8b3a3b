"""Event store backends: eventsourcing's recorders, extended with idempotency records.

Each backend's recorder writes a command batch's events and its request records in one
transaction, and fills each receipt's log position from the notification ids the insert
assigned; so a crash can never leave a request recorded without its events, or events
without the record that makes a retry replay them instead of applying them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from daybook.infrastructure.ledger.requests import PendingRequest, RequestRecord

REQUESTS_TABLE = "daybook_requests"


def completed(pending: PendingRequest, notification_ids: Sequence[int]) -> RequestRecord:
    """The record with its receipt's position filled in."""
    record = pending.record
    if pending.last_event_index is None:
        return record
    receipt = dict(record.outcome["receipt"], position=notification_ids[pending.last_event_index])
    return RequestRecord(
        record.request_id, record.command, record.fingerprint, {"receipt": receipt}
    )


def encode_outcome(record: RequestRecord) -> bytes:
    return orjson.dumps(record.outcome)


def decode_record(request_id: str, command: str, fingerprint: str, outcome: Any) -> RequestRecord:
    if isinstance(outcome, (bytes, bytearray, memoryview, str)):
        outcome = orjson.loads(bytes(outcome) if not isinstance(outcome, str) else outcome)
    return RequestRecord(request_id, command, fingerprint, outcome)
