"""Event store backends: eventsourcing's recorders, extended with idempotency records.

Each backend's recorder writes a command batch's events and its request records in one
transaction, and fills each receipt's log position from the notification ids the insert
assigned; so a crash can never leave a request recorded without its events, or events
without the record that makes a retry replay them instead of applying them again. In the
same transaction each checks that the aggregates the batch's commands only read (``reads``,
with the versions they were judged at) have recorded none of the events that would change
that judgement since (an account closed; ``changes_for_readers``), and refuses the batch
with a ``VersionConflict`` otherwise, as it does when an aggregate the batch changes has
moved on.

Records expire (see ``daybook.infrastructure.ledger.requests``): lookups ignore expired
ones, a caller-chosen id whose record expired may be recorded again (its old row is
replaced in the same transaction), and ``purge_requests`` deletes expired rows in bounded
batches, each its own short transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson

from daybook.infrastructure.ledger.requests import (
    DEFAULT_RETENTION,
    GENERATED_RETENTION,
    Expiry,
    PendingRequest,
    RequestRecord,
)

REQUESTS_TABLE = "daybook_requests"

#: Expiry given to records written before records expired: one default retention window
#: from the upgrade.
UPGRADE_RETENTION = DEFAULT_RETENTION


def default_expiry() -> Expiry:
    """For a write that names no expiry (not the ledger's own): the default windows, on the
    system clock."""
    now = time.time()
    return Expiry(now, now + UPGRADE_RETENTION, now + GENERATED_RETENTION)


def completed(pending: PendingRequest, notification_ids: Sequence[int]) -> RequestRecord:
    """The record with its receipt's position filled in."""
    record = pending.record
    if pending.last_event_index is None:
        return record
    receipt = dict(record.outcome["receipt"], position=notification_ids[pending.last_event_index])
    return replace(record, outcome={"receipt": receipt})


def encode_outcome(record: RequestRecord) -> bytes:
    return orjson.dumps(record.outcome)


def decode_record(
    request_id: str, command: str, fingerprint: str, outcome: Any, caller: Any = True
) -> RequestRecord:
    if isinstance(outcome, (bytes, bytearray, memoryview, str)):
        outcome = orjson.loads(bytes(outcome) if not isinstance(outcome, str) else outcome)
    return RequestRecord(request_id, command, fingerprint, outcome, bool(caller))
