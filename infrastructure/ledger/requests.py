"""Idempotency records: what happened to each request, written with its events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from uuid import UUID


@dataclass(frozen=True)
class RequestRecord:
    """What happened to a request: written in the same transaction as its events."""

    request_id: str
    command: str
    fingerprint: str
    #: ``{"receipt": {...}}`` or ``{"error": {...}}``.
    outcome: dict[str, Any]


@dataclass(frozen=True)
class PendingRequest:
    """A request record to write; the recorder fills in the receipt's log position from the
    notification id of the event at ``last_event_index`` (known only once inserted)."""

    record: RequestRecord
    last_event_index: int | None


@runtime_checkable
class RequestLog(Protocol):
    """The part of the recorder that keeps idempotency records, and tells the ledger where
    aggregates stand after a refused write."""

    def select_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]: ...

    def latest_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        """The newest stored version of each of these aggregates (absent: none stored)."""
        ...
