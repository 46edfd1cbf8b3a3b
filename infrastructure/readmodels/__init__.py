"""Read models in PostgreSQL or SQLite: the runner, queries, rebuilds, reconciliation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daybook import projections
from daybook.domain.ledger import Ledger
from daybook.infrastructure.readmodels.location import ReadModelLocation
from daybook.infrastructure.readmodels.queries import ReadModels, StaleRead, open_read_models
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.readmodels.store import ReadStoreError
from daybook.projections.model import Projection


class EmbeddedProjections(ProjectionRunner):
    """A runner in a background thread beside a ``Ledger``; ``views`` queries its tables.

    It owns its ``location``: a scratch database made for a ``memory://`` ledger is removed
    when the runner stops (query it before)."""

    def __init__(
        self,
        ledger: Ledger,
        location: ReadModelLocation,
        defs: Sequence[Projection],
        **options: Any,
    ) -> None:
        super().__init__(ledger, location.url, defs, **options)
        self.location = location
        self._views: ReadModels | None = ReadModels(location.url, ledger=ledger)

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


def run_projections(
    ledger: Ledger,
    url: str | None = None,
    *,
    projections: Sequence[Projection] = projections.ALL,
    start: bool = True,
    **options: Any,
) -> EmbeddedProjections:
    """Keep read models up to date in a background thread (use as a context manager).

    ``url`` is the read-model database; by default the event store's own database (for a
    ``memory://`` event store, a temporary SQLite file that the runner removes when it stops).
    """
    location = ReadModelLocation(events_url_of(ledger), url)
    try:
        runner = EmbeddedProjections(ledger, location, projections, **options)
    except BaseException:
        location.close()
        raise
    if start:
        runner.start()
    return runner


def events_url_of(ledger: Ledger) -> str:
    """The URL of the event store a ledger was opened on (from its environment)."""
    env = ledger.env
    module = env.get("PERSISTENCE_MODULE", "")
    if "postgres" in module:
        password = f":{env['POSTGRES_PASSWORD']}" if env.get("POSTGRES_PASSWORD") else ""
        return (
            f"postgresql://{env.get('POSTGRES_USER', 'postgres')}{password}@"
            f"{env['POSTGRES_HOST']}:{env.get('POSTGRES_PORT', '5432')}/{env['POSTGRES_DBNAME']}"
        )
    if "sqlite" in module:
        name = env["SQLITE_DBNAME"]
        if ":memory:" not in name and "mode=memory" not in name:
            return f"sqlite:///{name}"
    return "memory://"


__all__ = [
    "EmbeddedProjections",
    "ProjectionRunner",
    "ReadModels",
    "StaleRead",
    "events_url_of",
    "open_read_models",
    "run_projections",
]
