"""Prometheus metrics: what every part of daybook counts, times and gauges.

Names follow Prometheus conventions (a ``daybook_`` prefix, ``_total`` for counters,
``_seconds`` for durations, base units). They are defined once, here, in daybook's own
registry (``REGISTRY``), so an embedding service decides whether to expose them (``serve``
below, ``daybook serve``'s ``/metrics``, or its own exporter reading ``REGISTRY``) and tests
can read exact values. Labels are bounded: command names, outcome codes, projection names and
versions, partitions, routes: never ids, keys or amounts.
"""

from __future__ import annotations

import contextlib
import threading
from bisect import bisect_left
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from daybook.infrastructure.compat import prometheus_client as prometheus_compat

REGISTRY = CollectorRegistry(auto_describe=True)

#: Seconds: from a tenth of a millisecond to a minute.
_LATENCY = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# -- the write side ---------------------------------------------------------------------------

COMMANDS = Counter(
    "daybook_commands_total",
    "Commands answered, by command and outcome (ok, replayed, or the refusal's code).",
    ["command", "outcome"],
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "daybook_commit_duration_seconds",
    "Time to write one batch of commands (its events and request records) and commit.",
    buckets=_LATENCY,
    registry=REGISTRY,
)
COMMIT_BATCH = Histogram(
    "daybook_commit_batch_size",
    "Commands per committed batch.",
    buckets=_SIZES,
    registry=REGISTRY,
)


class _CommandSeconds(Histogram):
    """``COMMAND_SECONDS``: adds the observations still waiting (``observe_command_seconds``)
    before it is read, so every scrape sees every command answered before it."""

    def collect(self) -> Any:
        flush_command_seconds()
        return super().collect()


COMMAND_SECONDS = _CommandSeconds(
    "daybook_command_duration_seconds",
    "Time from a command's submission to its answer (receipt or refusal).",
    ["command"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
ADMISSION_DEPTH = Gauge(
    "daybook_admission_queue_depth",
    "Requests admitted and not yet answered, by door (command, read).",
    ["door"],
    registry=REGISTRY,
)

# -- the read side ----------------------------------------------------------------------------

PROJECTION_LAG_EVENTS = Gauge(
    "daybook_projection_lag_events",
    "Events in the log not yet applied to a projection version (positions, not gaps).",
    ["projection", "version"],
    registry=REGISTRY,
)
PROJECTION_LAG_SECONDS = Gauge(
    "daybook_projection_lag_seconds",
    "Age of the oldest event not yet applied to a projection version (0 when caught up).",
    ["projection", "version"],
    registry=REGISTRY,
)
PROJECTION_APPLIED = Counter(
    "daybook_projection_applied_events_total",
    "Events applied to a projection version.",
    ["projection", "version"],
    registry=REGISTRY,
)
PROJECTION_PARKED = Gauge(
    "daybook_projection_parked_events",
    "Events a projection version parked (unresolved dead letters).",
    ["projection", "version"],
    registry=REGISTRY,
)
CONVERGENCE_SECONDS = Histogram(
    "daybook_convergence_seconds",
    "From an event's time (its command's commit) to the commit of the read-model rows that "
    "reflect it.",
    ["projection"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
RECONCILER_RUNS = Counter(
    "daybook_reconciler_runs_total",
    "Reconciliation runs, by projection and result (clean, drift, repaired, or failed: a log "
    "that could not be folded, or a run that failed for a reason no retry cures; an outage "
    "is not counted).",
    ["projection", "result"],
    registry=REGISTRY,
)
RECONCILER_DRIFT = Counter(
    "daybook_reconciler_drift_rows_total",
    "Rows found to differ from a replay of the log, and whether they were repaired.",
    ["projection", "repaired"],
    registry=REGISTRY,
)

# -- streaming --------------------------------------------------------------------------------

RELAY_PUBLISHED = Counter(
    "daybook_relay_published_events_total",
    "Events the relay published and the broker acknowledged.",
    ["topic"],
    registry=REGISTRY,
)
RELAY_LAG_EVENTS = Gauge(
    "daybook_relay_lag_events",
    "Log events not yet published by the relay.",
    ["topic"],
    registry=REGISTRY,
)
WORKER_LAG_EVENTS = Gauge(
    "daybook_worker_partition_lag_events",
    "Messages of a partition fetched and not yet applied by this worker.",
    ["group", "partition"],
    registry=REGISTRY,
)

# -- holds and sagas --------------------------------------------------------------------------

HOLDS_OPEN = Gauge("daybook_holds_open", "Holds not yet resolved.", registry=REGISTRY)
HOLDS_EXPIRED = Counter(
    "daybook_holds_expired_total", "Holds that expired (swept).", registry=REGISTRY
)
SAGAS = Gauge("daybook_sagas", "Sagas by state.", ["state"], registry=REGISTRY)
SAGA_COMPENSATIONS = Counter(
    "daybook_saga_compensations_total", "Compensations run, by step.", ["step"], registry=REGISTRY
)
SAGA_DEADLINES = Counter(
    "daybook_saga_deadlines_fired_total", "Saga deadlines that fired.", registry=REGISTRY
)
CIRCUIT_STATE = Gauge(
    "daybook_circuit_breaker_state",
    "Circuit breaker per remote dependency: 0 closed, 1 half-open, 2 open.",
    ["dependency"],
    registry=REGISTRY,
)

# -- services and HTTP ------------------------------------------------------------------------

SERVICE_UP = Gauge(
    "daybook_service_up",
    "1 while a long-running part is running (or retrying), 0 once stopped or failed.",
    ["service"],
    registry=REGISTRY,
)
WAITING_AT_START = Gauge(
    "daybook_waiting_at_start",
    "1 while this process checks, and waits for, the servers it needs before starting "
    "(see --startup-wait), else 0.",
    registry=REGISTRY,
)
SERVICE_RETRYING = Gauge(
    "daybook_service_retrying",
    "1 while a long-running part waits out a failure (an outage, a lock held elsewhere) "
    "and retries, with nothing going through; 0 otherwise.",
    ["service"],
    registry=REGISTRY,
)
SERVICE_RESTARTS = Counter(
    "daybook_service_restarts_total",
    "Restarts of a long-running part after transient failures.",
    ["service"],
    registry=REGISTRY,
)


def forget_service(name: str) -> None:
    """Drop the series of a service this process no longer has (a committer replaced by
    another): its 0 would say, for the life of the process, that something is down."""
    for family in (SERVICE_UP, SERVICE_RETRYING, SERVICE_RESTARTS):
        with contextlib.suppress(KeyError):
            family.remove(name)


HTTP_REQUESTS = Counter(
    "daybook_http_requests_total",
    "HTTP requests, by method, route template and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "daybook_http_request_duration_seconds",
    "HTTP request duration, by method and route template.",
    ["method", "route"],
    buckets=_LATENCY,
    registry=REGISTRY,
)


@contextmanager
def timed(histogram: Any) -> Iterator[None]:
    """Observe the duration of the block in ``histogram`` (a histogram or a labelled one)."""
    started = perf_counter()
    try:
        yield
    finally:
        histogram.observe(perf_counter() - started)


def observe_many(histogram: Any, amounts: Sequence[float]) -> None:
    """Observe each of ``amounts`` in ``histogram`` (one labelled histogram), as many calls
    of ``observe`` would, at the cost of one per bucket touched rather than one per amount
    (convergence is observed for every event of every batch). Reaches into
    ``prometheus_client``'s histogram through ``compat.prometheus_client`` (tests hold the
    result equal to ``observe``'s) and falls back to ``observe`` if it cannot."""
    parts = prometheus_compat.histogram_parts(histogram)
    if parts is None:
        for amount in amounts:
            histogram.observe(amount)
        return
    bounds, buckets, total = parts
    # ``observe`` counts an amount in the first bucket whose bound is >= it.
    tally = Tally(bisect_left(bounds, amount) for amount in amounts)
    for index, count in tally.items():
        buckets[index].inc(count)
    total.inc(sum(amounts))


#: Command latencies not yet added to ``COMMAND_SECONDS``: (command name, seconds). Every
#: command is timed, and ``observe`` takes the histogram's locks twice per call; these are
#: added in bulk (``observe_many``: a lock per bucket touched), when enough wait or when the
#: histogram is read. A deque: ``append`` and ``popleft`` are atomic, so callers on any
#: thread add to it without a lock, and none is lost while it is emptied.
_PENDING_COMMAND_SECONDS: deque[tuple[str, float]] = deque()
_PENDING_LOCK = threading.Lock()
#: How many latencies wait at most (a read adds them at once, however few).
_PENDING_LIMIT = 256


def observe_command_seconds(name: str, seconds: float) -> None:
    """Observe one command's latency in ``COMMAND_SECONDS`` (labelled ``name``)."""
    _PENDING_COMMAND_SECONDS.append((name, seconds))
    if len(_PENDING_COMMAND_SECONDS) >= _PENDING_LIMIT:
        flush_command_seconds()


def flush_command_seconds() -> None:
    """Add the waiting command latencies to ``COMMAND_SECONDS`` (under a lock, so a reader
    flushing at the same time waits for them to be in)."""
    pending = _PENDING_COMMAND_SECONDS
    if not pending:
        return
    with _PENDING_LOCK:
        by_name: dict[str, list[float]] = {}
        for _ in range(len(pending)):
            name, seconds = pending.popleft()
            by_name.setdefault(name, []).append(seconds)
        for name, amounts in by_name.items():
            observe_many(COMMAND_SECONDS.labels(name), amounts)


def exposition() -> bytes:
    """The metrics in Prometheus' text format (what ``/metrics`` answers)."""
    return bytes(generate_latest(REGISTRY))


class MetricsServer:
    """``/metrics`` on a port of its own, for processes without an HTTP API
    (``daybook project --metrics-port``, ``relay``, ``worker``)."""

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        self.port = port
        self.address = address
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server, self._thread = start_http_server(
            self.port, addr=self.address, registry=REGISTRY
        )
        self.port = self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
