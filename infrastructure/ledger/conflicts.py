"""Why a batch's write was refused by the store: three cases, each with its own remedy.

- ``VersionConflict``: another writer appended to an aggregate the batch changes (or created
  one the batch creates), or changed what its accepted commands judged of one they only read
  (closed an account). The batch was built on state that is no longer the latest: the
  commands on those aggregates are applied again on fresh state; the others are not
  affected.
- ``DuplicateRequest``: a request id of the batch was recorded meanwhile (the same request,
  retried through another writer). Looking the ids up again turns it into a replay.
- ``PositionsBehind``: the store's next position is one its log has (PostgreSQL's events
  table restored without its sequence's state). No retry cures it, and no writer is to
  blame: an operator moves the sequence past the log.
- any other ``IntegrityError``: a constraint the ledger does not know about. Applying the
  same command again would fail the same way: it is not retried.

Both are eventsourcing ``IntegrityError``s, so code that only knows that class still sees
a refused write. Nothing of a refused batch was written.
"""

from __future__ import annotations

from collections.abc import Collection
from uuid import UUID

from eventsourcing.persistence import IntegrityError

#: An aggregate a batch's commands only read, as the recorders check it at the commit: its
#: id, the version they judged, and the topics of the events that would make their judgement
#: stale (None: any). One of those recorded since is a ``VersionConflict``.
Read = tuple[UUID, int, tuple[str, ...] | None]


class VersionConflict(IntegrityError):
    """An aggregate version the batch writes exists already, or one the batch only read
    changed what its commands judged."""

    def __init__(self, message: str, *, stale: Collection[UUID] = ()) -> None:
        super().__init__(message)
        #: The aggregates found changed by another writer (filled in by the ledger).
        self.stale: frozenset[UUID] = frozenset(stale)


class DuplicateRequest(IntegrityError):
    """A request id the batch records was recorded already."""


class PositionsBehind(IntegrityError):
    """The event store's position sequence is behind its log: every write draws a position
    the log has. Taken for a version conflict, it was retried 40 times and answered
    ``concurrency_conflict`` ("other writers kept changing the same accounts") with no other
    writer anywhere."""

    code = "position_sequence_behind"
