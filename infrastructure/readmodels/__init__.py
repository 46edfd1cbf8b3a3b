"""Read models in PostgreSQL or SQLite: the runner, queries, rebuilds, reconciliation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.queries import ReadModels, StaleRead
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.projections.model import Projection


class EmbeddedProjections(ProjectionRunner):
    """A runner in a background thread beside a ledger; ``views`` queries its tables."""

    def __init__(self, log: EventLog, url: str, defs: Sequence[Projection], **options: Any):
        super().__init__(log, url, defs, **options)
        self.views = ReadModels(url, log=log)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self.views.close()


__all__ = [
    "EmbeddedProjections",
    "ProjectionRunner",
    "ReadModels",
    "StaleRead",
]
