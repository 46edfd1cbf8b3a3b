"""Read models in PostgreSQL or SQLite: the runner, queries, rebuilds, reconciliation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.location import ReadModelLocation
from daybook.infrastructure.readmodels.queries import ReadModelChanged, ReadModels, StaleRead
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.readmodels.store import ReadStoreError
from daybook.projections.model import Projection


class EmbeddedProjections(ProjectionRunner):
    """A runner in a background thread beside a ledger; ``views`` queries its tables.

    It owns its ``location``: a scratch database made for a ``memory://`` ledger is removed
    when the runner stops (query it before)."""

    def __init__(
        self,
        log: EventLog,
        location: ReadModelLocation,
        defs: Sequence[Projection],
        **options: Any,
    ) -> None:
        super().__init__(log, location.url, defs, **options)
        self.location = location
        self._views: ReadModels | None = ReadModels(location.url, log=log)

    @property
    def views(self) -> ReadModels:
        if self._views is None:
            msg = "the runner stopped and removed its scratch read models; query them before"
            raise ReadStoreError(msg)
        return self._views

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self._views is not None:
            self._views.close()
        if self.location.scratch is not None:
            # Nothing may open the database again: it would come back, empty, and stay.
            self._views = None
            self.location.close()


__all__ = [
    "EmbeddedProjections",
    "ProjectionRunner",
    "ReadModelChanged",
    "ReadModels",
    "StaleRead",
]
