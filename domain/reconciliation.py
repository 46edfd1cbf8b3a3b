"""Reconciliation decisions: what a comparison with a remote found about one of its records
(a charge, by idempotency key), and what was done about it. Each decision is an event whose
metadata says who decided, why and when, so the log explains every refund it did not ask
for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any
from uuid import NAMESPACE_URL, UUID, uuid5

from pydantic import Field

from daybook.domain.commands import Aggregates, Check, Command, Text, find_to_create
from daybook.domain.errors import DomainError
from daybook.domain.events import LedgerAggregate
from daybook.domain.sagas import DecisionMetadata, decided
from daybook.domain.values import check_text

#: The longest remote key recorded: payment APIs take idempotency keys of up to 255
#: characters, and the gateway's account holds other systems' charges as well as ours.
MAX_REMOTE_KEY = 255


def check_remote_key(value: object, what: str) -> str:
    """A remote record's key (a charge's idempotency key): text of at most 255 characters."""
    return check_text(value, what, MAX_REMOTE_KEY)


RemoteKey = Annotated[str, Check(check_remote_key)]


class FindingRecorded(DomainError):
    """The remote record holds this finding and action already (each is recorded once)."""

    code = "finding_recorded"


class RemoteRecord(LedgerAggregate):
    """The reconciliation history of one remote record."""

    key_name = "key"

    if TYPE_CHECKING:
        key: str
        findings: int
        #: The (finding, action) pairs recorded: each is recorded once, however long the
        #: finding stays unresolved (a request id alone is forgotten after the retention
        #: window). Rebuilt from the ``Decided`` events: a record an earlier version wrote
        #: answers the same.
        recorded: set[tuple[str, str]]

    class Opened(LedgerAggregate.Created):
        key: str

        def apply(self, record: RemoteRecord) -> None:
            record.key = self.key
            record.findings = 0
            record.recorded = set()

    class Decided(LedgerAggregate.Event):
        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)
        finding: str
        action: str
        detail: str

        def apply(self, record: RemoteRecord) -> None:
            record.findings += 1
            record.recorded.add((self.finding, self.action))

    @classmethod
    def id_for(cls, key: Any) -> UUID:
        return uuid5(NAMESPACE_URL, f"daybook:remote-record:{key}")

    def has_recorded(self, finding: str, action: str) -> bool:
        return (finding, action) in self.recorded

    def view(self) -> dict[str, Any]:
        return {"key": self.key, "findings": self.findings}


class RecordReconciliation(Command):
    """Record what reconciliation found about a remote record and what it did: once per
    finding and action (recorded before, with whatever detail: ``finding_recorded``)."""

    generated_method = False
    public = False

    key: RemoteKey
    finding: Text
    action: Text
    detail: Text
    decided_by: Text = "reconciler"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        record = find_to_create(aggregates, RemoteRecord, self.key)
        if record is not None and record.has_recorded(self.finding, self.action):
            # Refused rather than answered with nothing written: a command's receipt is
            # its last event.
            raise FindingRecorded(
                f"{self.finding} ({self.action}) is recorded for {self.key!r} already",
                key=self.key,
                finding=self.finding,
                action=self.action,
            )
        if record is None:
            record = aggregates.add(
                RemoteRecord._create(
                    RemoteRecord.Opened, id=RemoteRecord.id_for(self.key), key=self.key
                )
            )
        if aggregates.now is None:
            msg = "a reconciliation was recorded without the ledger's clock"
            raise RuntimeError(msg)
        record.trigger_event(
            RemoteRecord.Decided,
            finding=self.finding,
            action=self.action,
            detail=self.detail,
            meta=decided(self.decided_by, f"{self.finding}: {self.detail}", aggregates.now),
        )
        return {}
