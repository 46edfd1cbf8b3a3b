"""The dashboard: ``/`` of ``daybook serve``, so people can see the system converge.

The page and its script and style ship in the package (``http/dashboard/``: no CDN, no build
step) and poll ``/v1/dashboard`` (read scope), which gathers what the page shows in one
answer: the log head; write throughput, commit latency and refusals (from the metrics);
projections (owner from the read-model catalog: the runner or ``stream:GROUP``; state,
position, lag, parked events; the continuous reconciler's last run, from
``daybook_reconcile_runs``); sagas by state and the stuck ones; holds expiring soonest; and
the reconciler's recent decisions: the rows it repaired (``daybook_reconcile_log``). ``POST
/v1/projections/{name}/resume`` (admin scope) replays a projection's parked events.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
from fastapi import Depends, FastAPI
from starlette.responses import Response

from daybook import projections as definitions
from daybook.domain.values import shown
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.http.auth import Authenticator
from daybook.infrastructure.http.problems import Problem
from daybook.infrastructure.http.reads import ReadPool
from daybook.infrastructure.http.tokens import Token
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels import ReadModels, StaleRead
from daybook.infrastructure.readmodels.catalog import IllegalTransition, VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile_log import recent_repairs
from daybook.infrastructure.readmodels.reconciler import ReconcileRun
from daybook.infrastructure.readmodels.status import projection_status
from daybook.infrastructure.sagas.processor import saga_counts

_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: The page's own headers: it runs only its own script and style, talks only to its own
#: origin, and no other site may frame it (it takes a token; an admin one replays).
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_OUTCOMES_OK = frozenset({"ok", "replayed"})
#: The outcome of a command that failed rather than being answered (``outcome_label``).
_FAILED = "error"
#: Reconciler repairs the dashboard lists.
DECISIONS = 20
#: Stuck sagas the dashboard lists (the newest first).
STUCK_SHOWN = 20


def asset(name: str) -> bytes:
    return (resources.files("daybook.infrastructure.http") / "dashboard" / name).read_bytes()


@dataclass
class Throughput:
    """Commands per second, from the commands counter sampled at each dashboard poll (a
    bounded window: the last minute)."""

    window: float = 60.0
    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def observe(self, now: float, total: float) -> float:
        self.samples.append((now, total))
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        first_time, first_total = self.samples[0]
        elapsed = now - first_time
        return (total - first_total) / elapsed if elapsed > 0 else 0.0


def _command_totals() -> tuple[float, float, float]:
    """(all commands answered, refused ones, failed ones), from the metrics registry: a
    refusal is the ledger's answer to what was asked (its code); a failure is none (an
    outage past its budget, a defect: ``error``), and is not counted as a refusal."""
    total = refused = failed = 0.0
    for family in metrics.COMMANDS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
                outcome = sample.labels.get("outcome")
                if outcome == _FAILED:
                    failed += sample.value
                elif outcome not in _OUTCOMES_OK:
                    refused += sample.value
    return total, refused, failed


def _buckets(histogram: Any) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, ``(le, count)`` in bound order."""
    buckets: list[tuple[float, float]] = []
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    return buckets


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of the observations cumulative ``buckets`` count, interpolated
    within its bucket (as PromQL's histogram_quantile does); None without any."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


#: A baseline older than this many windows is of a gap in the polls, not about the last minute.
STALE_WINDOWS = 5


@dataclass
class RecentLatency:
    """Quantiles of a histogram's observations of about the last minute (as PromQL's
    ``histogram_quantile(q, rate(...[1m]))``), from its buckets sampled at each dashboard
    poll: the counts since the server started would hide commits that became slow a
    minute ago behind the hours of fast ones before. Bounded: the samples of the window,
    and the one before it (the baseline)."""

    window: float = 60.0
    samples: deque[tuple[float, list[tuple[float, float]]]] = field(default_factory=deque)

    def observe(self, now: float, histogram: Any) -> tuple[float | None, float | None]:
        buckets = _buckets(histogram)
        self.samples.append((now, buckets))
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        if now - self.samples[0][0] > STALE_WINDOWS * self.window:
            # Nobody polled for a long while (the page just opened, during an incident
            # say): the last sample before the gap would stretch "the last minute" over
            # the whole gap, its fast commits hiding the slow ones. Start a window anew.
            while len(self.samples) > 1:
                self.samples.popleft()
        if len(self.samples) == 1:  # the first poll: nothing of a recent window known yet
            return None, None
        base = dict(self.samples[0][1])
        recent = [(bound, count - base.get(bound, 0.0)) for bound, count in buckets]
        return _quantile(recent, 0.5), _quantile(recent, 0.99)


def _last_reconcile(run: ReconcileRun | None) -> dict[str, Any] | None:
    """A reconciler run as the page shows it: ``result`` is ``clean``, ``drift`` (found, not
    repaired), ``repaired`` or ``failed``."""
    if run is None:
        return None
    if run.error:
        result = "failed"
    elif run.drifted:
        result = "repaired" if run.repaired else "drift"
    else:
        result = "clean"
    return {
        "result": result,
        "position": run.position,
        "drift": run.drifted,
        "at": run.finished_at,
        "drifts": run.drifts[:5],
        "error": run.error,
    }


@dataclass
class Dashboard:
    pool: ReadPool
    auth: Authenticator
    log: EventLog
    readmodels_url: str
    throughput: Throughput = field(default_factory=Throughput)
    latency: RecentLatency = field(default_factory=RecentLatency)
    #: The view being gathered, which the polls that arrive meanwhile share: one at a time,
    #: however many are sent (each takes a read-model connection of its own and a thread
    #: of the event loop's default pool, which the write routes' key checks use too).
    _gathering: asyncio.Future[dict[str, Any]] | None = field(default=None, repr=False)

    def install(self, app: FastAPI) -> None:
        # Counted against the token's rate, as every other read is.
        reader = Depends(self.auth.require("read"))
        admin = Depends(self.auth.require("admin"))

        @app.get("/", include_in_schema=False)
        async def index() -> Response:
            return Response(
                asset("index.html"), media_type=_ASSETS["index.html"], headers=_PAGE_HEADERS
            )

        @app.get("/dashboard/{name}", include_in_schema=False)
        async def static(name: str) -> Response:
            if name not in _ASSETS:
                raise Problem("not_found", f"the dashboard has no file {shown(name)}")
            return Response(asset(name), media_type=_ASSETS[name], headers=_PAGE_HEADERS)

        @app.get("/v1/dashboard", tags=["service"], summary="What the dashboard shows")
        async def dashboard(_: Token = reader) -> Response:
            view = await self.shared_view()
            return Response(orjson.dumps(view), media_type="application/json")

        @app.post(
            "/v1/projections/{name}/resume",
            tags=["service"],
            summary="Replay a stopped projection's parked events (admin)",
        )
        async def resume(name: str, _: Token = admin) -> Response:
            return await asyncio.to_thread(self.resume, name)

    async def shared_view(self) -> dict[str, Any]:
        """``view()``, gathered in a thread; a poll that arrives while one is being gathered
        waits for it rather than start another."""
        if self._gathering is None or self._gathering.done():
            gathering = asyncio.ensure_future(asyncio.to_thread(self.view))
            # Its outcome is read even when every poll waiting for it has given up.
            gathering.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._gathering = gathering
        return await asyncio.shield(self._gathering)

    def view(self) -> dict[str, Any]:
        total, refused, failed = _command_totals()
        now = time.monotonic()
        rate = self.throughput.observe(now, total)
        commit_p50, commit_p99 = self.latency.observe(now, metrics.COMMIT_SECONDS)
        return {
            "head": self.log.head(),
            "writes": {
                "rate": rate,
                "commit_p50": commit_p50,
                "commit_p99": commit_p99,
                "refused": int(refused),
                "failed": int(failed),
            },
            "projections": self._projections(),
            "sagas": self._sagas(),
            "holds": self._holds(),
            "decisions": self._decisions(),
        }

    def _projections(self) -> list[dict[str, Any]]:
        return [
            {
                "name": status.name,
                "version": status.version,
                "owner": status.owner,
                "state": status.state.value,
                "serving": status.active,
                "position": status.position,
                "lag_events": status.lag_events,
                "lag_seconds": status.lag_seconds,
                "parked": status.dead_letters,
                "last_reconcile": _last_reconcile(status.reconciled),
                "error": status.error,
            }
            for status in projection_status(self.log, self.readmodels_url)
        ]

    def _decisions(self) -> list[dict[str, Any]]:
        store = open_store(self.readmodels_url)
        try:
            repairs = recent_repairs(store, DECISIONS)
        finally:
            store.close()
        return [
            {
                "at": repair.repaired_at,
                "projection": f"{repair.name} v{repair.version}",
                "position": repair.position,
                "table": repair.table,
                "row": ", ".join(str(value) for value in repair.key),
                "change": repair.change,
            }
            for repair in repairs
        ]

    def _views(self) -> ReadModels:
        return self.pool.any()

    def _sagas(self) -> dict[str, Any]:
        # Finished sagas stay in the read model (a row per order, for months): the counts
        # are a row per state, and only the stuck sagas are read, at most STUCK_SHOWN.
        now = datetime.now(UTC).isoformat(timespec="microseconds")  # as rows store times
        views = self._views()
        try:
            counts = saga_counts(views)
            stuck = views.rows(
                definitions.SAGA_LIST,
                "sagas",
                where="state = 'needs_attention' OR (state = 'running' AND deadline_at < %s)",
                params=[now],
                order="updated_at DESC",
                limit=STUCK_SHOWN,
                timeout=0.0,
            )
        except StaleRead:
            return {"counts": {}, "stuck": []}
        keys = ("saga_id", "state", "step", "last_error")
        return {
            "counts": {state: count for state, count in counts.items() if count},
            "stuck": [
                {**{key: row[key] for key in keys}, "deadline": row["deadline_at"]}
                for row in stuck.value
            ],
        }

    def _holds(self) -> list[dict[str, Any]]:
        try:
            answer = self._views().rows(
                definitions.OPEN_HOLDS_PROJECTION,
                "open_holds",
                order="expires_at",
                limit=10,
                timeout=0.0,
            )
        except StaleRead:
            return []
        keys = ("hold_id", "account_id", "amount", "currency", "expires_at")
        return [{key: row[key] for key in keys} for row in answer.value]

    def resume(self, name: str) -> Response:
        try:
            projection = definitions.by_name(name)
        except KeyError:
            known = ", ".join(p.name for p in definitions.ALL)
            raise Problem(
                "not_found", f"no projection is called {shown(name)}; known: {known}"
            ) from None
        store = open_store(self.readmodels_url)
        try:
            catalog = VersionCatalog(store)
            catalog.ensure()
            catalog.resume(projection.name, projection.version)
        except IllegalTransition as refused:
            # The code the README's table gives (it answered invalid_request).
            raise Problem(refused.code, f"{name} v{projection.version}: {refused}") from None
        except LookupError as refused:
            raise Problem("invalid_request", f"{name} v{projection.version}: {refused}") from None
        finally:
            store.close()
        body = {"projection": name, "version": projection.version, "resumed": True}
        return Response(orjson.dumps(body), media_type="application/json")
