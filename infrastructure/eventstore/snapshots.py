"""The snapshot store: an aggregate's latest snapshot, unless its contract no longer trusts
the schema version it was taken at.

A snapshot is only a saving on replay. When older code is found to have got an aggregate's
state wrong (read an event as meaning what it did not), its snapshots carry the mistake, and
no upcast can right it: the events it came from are gone from the snapshot. The contract
then names the first version it trusts (``LedgerSnapshot.replay_below``), and a snapshot
stored at an older one is not read: the aggregate is replayed from its events, until its
next snapshot replaces that one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, cast
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import AggregateRecorder, EventStore, StoredEvent
from eventsourcing.utils import resolve_topic

from daybook.infrastructure.codec import ContractMapper

log = logging.getLogger("daybook.snapshots")


class Snapshots(EventStore[UUID]):
    """eventsourcing's snapshot store, skipping snapshots their contract no longer trusts,
    and one of a version the log does not hold (``log``: the events' recorder)."""

    def __init__(self, *args: Any, log: AggregateRecorder | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def get(
        self,
        originator_id: UUID,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Iterator[DomainEventProtocol[UUID]]:
        mapper = cast(ContractMapper, self.mapper)
        for stored in self.recorder.select_events(
            originator_id, gt=gt, lte=lte, desc=desc, limit=limit
        ):
            # Only the latest snapshot is kept: one skipped leaves none, so the repository
            # replays every event.
            try:
                trusted: int = getattr(resolve_topic(stored.topic), "replay_below", 1)
                if trusted > 1 and mapper.stored_version(stored) < trusted:
                    continue
                snapshot = mapper.to_domain_event(stored)
            except Exception:
                # A snapshot is only a saving on replay: one that cannot be read back (a
                # damaged row, a contract it does not meet) is skipped, not fatal to its
                # aggregate. Its next snapshot replaces it.
                log.warning(
                    "the snapshot of %s at version %s cannot be read; replaying its events",
                    stored.originator_id,
                    stored.originator_version,
                    exc_info=True,
                )
                continue
            # (Outside the ``try``: a store that does not answer is an outage, not a reason
            # to replay.)
            version = stored.originator_version
            if self.log is not None:
                held = self.log.select_events(originator_id, gt=version - 1, lte=version, limit=1)
                if not held or not _taken_from(mapper, snapshot, held[0]):
                    # The events table restored without the snapshots: the log does not hold
                    # the version it was taken at, or holds another event there (written
                    # since the restore). It would show state the log never had, and the
                    # next command would write past a gap in its versions.
                    log.warning(
                        "the snapshot of %s at version %s is not of the events the log holds"
                        " (ahead of them, or of events a restore replaced); replaying its"
                        " events",
                        stored.originator_id,
                        version,
                    )
                    continue
            yield snapshot


def _taken_from(mapper: ContractMapper, snapshot: object, event: StoredEvent) -> bool:
    """Whether ``snapshot`` was taken from ``event`` (the stored event at its version): the
    aggregate's ``modified_on`` it keeps is that event's time. An event written at that
    version since a restore has another time."""
    taken = getattr(snapshot, "modified_on", None)
    if taken is None:  # a contract that keeps no time: the version alone, as before
        return True
    try:
        return bool(getattr(mapper.to_domain_event(event), "timestamp", None) == taken)
    except Exception:  # an event it cannot read: the replay says why, not the snapshot
        return False
