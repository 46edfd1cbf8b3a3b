"""Where each projection stands: version, position, lag, state, dead letters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.checkpoints import parked_counts, past_the_log, version_label
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconciler import ReconcileRun, last_runs
from daybook.infrastructure.readmodels.store import ReadStoreError


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    active: bool
    state: VersionState
    position: int
    head: int
    lag_events: int
    #: Age of the oldest event not yet applied (0 when caught up).
    lag_seconds: float
    dead_letters: int
    error: str | None
    #: ``runner`` or ``stream:GROUP``.
    owner: str = "runner"
    #: Events after ``position`` are partly applied too (a stream partition ahead).
    includes_later: bool = False
    #: Why a follower cannot follow this version.
    note: str | None = None
    #: The continuous reconciler's last run on this version.
    reconciled: ReconcileRun | None = None


def projection_status(log: EventLog, url: str) -> list[VersionStatus]:
    """Every known projection version, newest first within each projection."""
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        # Status only reads: on a replica or as a role that may only read, it goes on with
        # the catalog a writer made (none yet: no version to show).
        made = catalog.ensure_where_writable()
        try:
            with store.transaction(write=False):
                if not made and not store.has_column("daybook_read_models", "name"):
                    return []
                records = catalog.versions()
                checkpoints = {(r.name, r.version): catalog.checkpoint(r) for r in records}
                active = catalog.active_versions()
                parked = DeadLetters(store).unresolved()
                # A stream group parks in a table of its own, and goes on: the letters it
                # left out of a version are that version's parked events.
                streamed = [r for r in records if r.stream is not None]
                counts = parked_counts(store) if streamed else {}
                for r in streamed:
                    assert r.stream is not None
                    group, topic, _ = r.stream
                    label = version_label(r.name, r.version)
                    left_out = counts.get((group, topic, label), 0)
                    left_out += counts.get((group, topic, "*"), 0)
                    if left_out:
                        key = (r.name, r.version)
                        parked[key] = parked.get(key, 0) + left_out
        except Exception as error:
            if made or not (store.is_missing_column(error) or store.is_missing_table(error)):
                raise
            msg = (
                "the read-model catalog was made by an older daybook, and this connection "
                "may only read, so it cannot bring it up to date: run this daybook's "
                "`daybook project` (or any writer of the read models) once, then ask again"
            )
            raise ReadStoreError(msg) from error
        runs = last_runs(store)
        head = log.head()
        now = datetime.now(UTC)
        result = []
        for record in sorted(records, key=lambda r: (r.name, -r.version)):
            checkpoint = checkpoints[(record.name, record.version)]
            position = checkpoint.position
            lag = max(0, head - position)
            note = record.note
            if position > head and record.state is not VersionState.RETIRED:
                note = past_the_log(position, head)
            lag_seconds = 0.0
            if lag and record.state is not VersionState.RETIRED:
                pending = log.read(position, 1)
                if pending:
                    lag_seconds = max(0.0, (now - pending[0].timestamp).total_seconds())
            result.append(
                VersionStatus(
                    record.name,
                    record.version,
                    active.get(record.name) == record.version,
                    record.state,
                    position,
                    head,
                    lag,
                    lag_seconds,
                    parked.get((record.name, record.version), 0),
                    record.error,
                    record.owner,
                    checkpoint.includes_later,
                    note,
                    runs.get((record.name, record.version)),
                )
            )
        return result
    finally:
        store.close()
