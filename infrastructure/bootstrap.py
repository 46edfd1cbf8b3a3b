"""The composition root: the one place where settings become wired objects.

Every entry point (the Python API, the CLI, the services) builds what it needs here, from a
``Settings`` (arguments, then ``DAYBOOK_*`` variables, then defaults). URLs travel as given.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import InfrastructureFactory, Mapper
from eventsourcing.utils import Environment

from daybook import projections as definitions
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.ledger.application import LedgerService
from daybook.infrastructure.ledger.cache import install_aggregate_cache
from daybook.infrastructure.ledger.facade import AsyncLedger, Ledger
from daybook.infrastructure.ledger.group_commit import GroupCommitter
from daybook.infrastructure.preflight import permission_denied
from daybook.infrastructure.readmodels import EmbeddedProjections, ReadModels
from daybook.infrastructure.readmodels.location import ReadModelLocation
from daybook.infrastructure.settings import BadSettings, Settings
from daybook.infrastructure.transient import denied, may_only_read
from daybook.infrastructure.urls import event_store_env, read_only_env, scheme, sqlite_file
from daybook.projections.model import Projection

#: What time it is (timezone-aware, UTC).
Clock = Callable[[], datetime]


def settings_for(
    url: str | None = None, settings: Settings | None = None, **given: Any
) -> Settings:
    """``settings`` with ``url`` (and other ``given`` values) in place, or fresh settings."""
    if settings is None:
        env = dict(os.environ)
        if url is not None and url.startswith("memory:"):
            # A memory ledger is a scratch one, never the ledger whose read models
            # $DAYBOOK_READMODELS_URL holds: it keeps its own out of them (in a temporary
            # file), as the demo does. Any other URL takes the variable, as the CLI does.
            env.pop("DAYBOOK_READMODELS_URL", None)
        return Settings.load(env, url=url, **given)
    changes = {name: value for name, value in {"url": url, **given}.items() if value is not None}
    # Made anew, not ``model_copy(update=...)``, which checks nothing: a value given beside
    # the settings is checked (and converted) as the same value in the settings would be.
    return Settings(**{**settings.model_dump(), **changes}) if changes else settings


def ledger_service(
    settings: Settings, *, clock: Clock | None = None, purge: bool = True
) -> LedgerService:
    """The write side's application service on ``settings.url`` (tables created if missing),
    with its request purge service running unless ``purge`` is False or the settings turn
    it off. ``clock`` tells it the time (default: the system's, in UTC): holds and
    reservations expire by it, and request records are kept by it."""
    env = event_store_env(settings.url)
    env["AGGREGATE_CACHE_MAXSIZE"] = str(settings.cache_size)
    try:
        service = LedgerService(
            env=env,
            clock=clock,
            retention=settings.request_retention.total_seconds(),
            committer=GroupCommitter if settings.group_commit else None,
        )
    except Exception as error:
        if not denied(error):
            raise
        # Without this, eventsourcing's uncoded ProgrammingError: nothing to branch on.
        raise permission_denied(settings.url, error) from error
    service.snapshot_interval = settings.snapshot_interval
    install_aggregate_cache(service)
    service.request_purge.interval = settings.request_purge_interval.total_seconds()
    if purge and service.request_purge.interval > 0:
        service.request_purge.start()
    return service


def open_ledger(
    url: str | None = None,
    *,
    group_commit: bool | None = None,
    settings: Settings | None = None,
    clock: Clock | None = None,
) -> Ledger:
    """A blocking ``Ledger`` on the event store at ``url`` (default: ``$DAYBOOK_URL``, else
    the embedded SQLite file). With ``group_commit`` (the default), concurrent commands from
    many threads share transactions; without it, each command commits alone. ``clock``: see
    ``ledger_service`` (tests move it)."""
    chosen = settings_for(url, settings, group_commit=group_commit)
    return Ledger(ledger_service(chosen, clock=clock), chosen)


def open_async_ledger(
    url: str | None = None, *, settings: Settings | None = None, clock: Clock | None = None
) -> AsyncLedger:
    """An asyncio ``AsyncLedger`` on the event store at ``url`` (always group commit)."""
    chosen = settings_for(url, settings)
    if not chosen.group_commit:
        # The asyncio ledger's commands reach the store only through the group committer:
        # say that the setting ($DAYBOOK_GROUP_COMMIT=0, as for `daybook serve`) is not
        # taken, rather than batch in silence.
        logging.getLogger("daybook.ledger").warning(
            "group_commit=False ($DAYBOOK_GROUP_COMMIT=0) is ignored here: an asyncio "
            "ledger (daybook serve) always batches commands into shared transactions"
        )
        chosen = settings_for(None, chosen, group_commit=True)
    return AsyncLedger(ledger_service(chosen, clock=clock), chosen)


def open_event_log(
    url: str | None = None, *, settings: Settings | None = None, existing: bool = True
) -> EventLog:
    """The event log at ``url``, read-only (the relay, the runner, the reconciler read it).
    A SQLite file must be there already (``BadURL`` otherwise), unless ``existing`` is
    False: for the services that may start before any ledger has written (the projection
    runner, the continuous reconciler, the relay), which make it as a ledger would."""
    chosen = settings_for(url, settings)
    env = Environment(LedgerService.name, event_store_env(chosen.url, existing=existing))
    factory = InfrastructureFactory.construct(env)
    try:
        recorder = factory.application_recorder()  # creates the tables if missing, as a ledger does
    except Exception as error:
        # A connection that may only read (a replica, a role given SELECT): the tables are
        # the writers' to make; reading needs none of that.
        factory.close()
        if not may_only_read(error):
            raise
        factory = InfrastructureFactory.construct(
            Environment(LedgerService.name, {**event_store_env(chosen.url), "CREATE_TABLE": "no"})
        )
        try:
            recorder = factory.application_recorder()
        except BaseException:
            factory.close()
            raise
    mapper: Mapper[UUID] = factory.mapper(transcoder=factory.transcoder())
    return EventLog(recorder, mapper, on_close=factory.close)


@contextlib.contextmanager
def read_only_recorder(settings: Settings) -> Iterator[Any]:
    """The event store's recorder on connections that cannot write: nothing is created,
    migrated or changed, whatever is (or is not) in the database (``urls.read_only_env``).
    Closed on leaving the block."""
    factory = InfrastructureFactory.construct(
        Environment(LedgerService.name, read_only_env(settings.url))
    )
    try:
        yield factory.application_recorder()
    finally:
        factory.close()


def projection_runner(
    settings: Settings, *, projections: Sequence[Projection] = definitions.ALL, **options: Any
) -> EmbeddedProjections:
    """The projection runner as a process runs it (``daybook project``): the log read on
    connections of its own, the read models where the settings say; not started."""
    location = ReadModelLocation(settings.url, settings.readmodels_url)
    try:
        log = open_event_log(settings=settings, existing=False)
    except BaseException:
        location.close()
        raise
    return EmbeddedProjections(log, location, projections, **options)


def continuous_reconciler(
    settings: Settings, *, projections: Sequence[Projection] = definitions.ALL, **options: Any
) -> ContinuousReconciler:
    """The continuous reconciler (``daybook reconcile --continuous``); ``close`` it when done."""
    from daybook.infrastructure.readmodels.reconciler import ContinuousReconciler

    location = ReadModelLocation(settings.url, settings.readmodels_url)
    try:
        log = open_event_log(settings=settings, existing=False)
    except BaseException:
        location.close()
        raise

    def close() -> None:
        log.close()
        location.close()

    return ContinuousReconciler(log, location.url, projections, on_close=close, **options)


def outbox_relay(settings: Settings, **options: Any) -> Relay:
    """The outbox relay for ``settings`` (``daybook relay``); ``close`` it when done."""
    from daybook.infrastructure.streaming.relay import Relay, RelayConfig  # see the end

    config = RelayConfig(
        store_url=settings.url,
        broker_url=settings.broker_url,
        topic=settings.topic,
        partitions=settings.partitions,
        **({"request_timeout": settings.relay_request_timeout} | options),
    )
    return Relay(config, open_event_log(settings=settings, existing=False), owns_log=True)


def stream_worker_config(settings: Settings, **options: Any) -> WorkerConfig:
    """What a stream worker runs on (``daybook worker``)."""
    from daybook.infrastructure.streaming.app import WorkerConfig  # see the end

    return WorkerConfig(
        store_url=settings.url,
        broker_url=settings.broker_url,
        topic=settings.topic,
        partitions=settings.partitions,
        group=settings.group,
        readmodels_url=settings.readmodels_url,
        **options,
    )


def payment_gateway(settings: Settings) -> HttpPaymentGateway:
    """The payment gateway at ``settings.gateway_url`` (the httpx adapter)."""
    from daybook.infrastructure.gateway.http import HttpPaymentGateway

    if not settings.gateway_url:
        msg = "no payment gateway is configured: pass --gateway or set $DAYBOOK_GATEWAY_URL"
        raise BadSettings(msg)
    return HttpPaymentGateway(settings.gateway_url)


def saga_processor(
    ledger: Ledger,
    views: ReadModels,
    gateway: PaymentGateway | None = None,
    **options: Any,
) -> SagaProcessor:
    """The saga processor for ``ledger`` (sagas found in ``views``, the read models), calling
    ``gateway`` (default: the one the ledger's settings name); not started."""
    from daybook.domain.orders import PAYMENTS
    from daybook.infrastructure.sagas.processor import SagaProcessor

    port = gateway if gateway is not None else payment_gateway(ledger.settings)
    return SagaProcessor(ledger, views, {PAYMENTS: port}, **options)


def expiry_sweeper(ledger: Ledger, views: ReadModels, **options: Any) -> ExpirySweeper:
    """The sweeper that records expired holds and reservations; not started."""
    from daybook.infrastructure.expiry import ExpirySweeper

    return ExpirySweeper(ledger, views, **options)


def event_log_of(ledger: Ledger | AsyncLedger) -> EventLog:
    """A read-only view of a ledger's own log, on the ledger's connections."""
    service = ledger.service
    return EventLog(service.recorder, service.mapper, guard=service.refuse_if_forked)


def open_read_models(
    url: str | None = None, *, log: EventLog | None = None, settings: Settings | None = None
) -> ReadModels:
    """Queries on the read models at ``url`` (default: ``$DAYBOOK_READMODELS_URL``, else the
    event store's database). Pass the event ``log`` when it lives elsewhere, so answers can
    report their lag. A SQLite file must be there already (``BadURL`` otherwise): it is the
    projection runner's to make."""
    chosen = url or settings_for(None, settings).readmodels
    if scheme(chosen) == "sqlite":
        sqlite_file(chosen, existing=True)
    return ReadModels(chosen, log=log)


def run_projections(
    ledger: Ledger,
    url: str | None = None,
    *,
    projections: Sequence[Projection] = definitions.ALL,
    start: bool = True,
    **options: Any,
) -> EmbeddedProjections:
    """Keep read models up to date in a background thread beside ``ledger`` (use as a context
    manager); ``runner.views`` queries them. ``start=False``: no thread, in a ``with`` block
    too; the caller applies the log itself (``step``, ``run_until_caught_up``). ``url`` is
    the read-model database; by default the ledger's settings say (``readmodels_url``, else
    the event store's own database; for a ``memory://`` event store, a temporary SQLite file
    the runner removes when it stops)."""
    location = ReadModelLocation(ledger.settings.url, url or ledger.settings.readmodels_url)
    try:
        runner = EmbeddedProjections(event_log_of(ledger), location, projections, **options)
    except BaseException:
        location.close()
        raise
    runner.start_on_enter = start
    if start:
        runner.start()
    return runner


def http_parts(
    settings: Settings,
    options: HttpOptions | None = None,
    *,
    projections: Sequence[Projection] | None = definitions.ALL,
    tokens: TokenStore | None = None,
    sweep: bool = True,
) -> HttpParts:
    """What ``daybook serve`` serves: the asyncio ledger, a pool of read-model connections,
    the token store (in the event store's database), the projection runner unless
    ``projections`` is None (another process runs them), and the expiry sweeper if
    ``sweep``, started. ``services`` holds the health of each part running in the process
    besides the committer (the request purge, the sweeper, the projections)."""
    from daybook.infrastructure.http.app import HttpOptions, HttpParts  # see the end
    from daybook.infrastructure.http.reads import ReadPool
    from daybook.infrastructure.http.tokens import open_tokens

    chosen = options or HttpOptions()
    ledger = open_async_ledger(settings=settings)
    # What has started so far, stopped in reverse should a later part fail to start: a
    # caller that gets no parts has nothing to close them with.
    started: list[Callable[[], None]] = [ledger.service.close]
    try:
        log = event_log_of(ledger)
        location = ReadModelLocation(settings.url, settings.readmodels_url)
        started.append(location.close)
        runner = None
        if projections is not None:
            runner = EmbeddedProjections(log, location, projections)
            runner.start()
            started.append(runner.stop)
        views = [ReadModels(location.url, log=log) for _ in range(chosen.read_connections)]
        started.extend(view.close for view in views)
        if tokens is None:
            tokens = open_tokens(settings.url)
            started.append(tokens.close)
        parts = HttpParts(ledger, ReadPool(views), tokens, chosen)
        parts.log, parts.readmodels_url = log, location.url
        # The request purge runs in this process too: a purge that stopped for good is a
        # failed part, in /health like the others.
        parts.services["request purge"] = ledger.request_purge.health
        if sweep:
            # Holds and reservations the server takes must have their expiries recorded:
            # until then each stays in its account's or SKU's state (and snapshots). The
            # sweeper is safe beside others (each expiry is recorded once; a second is
            # refused, skipped).
            from daybook.infrastructure.expiry import SWEEP_PATIENCE

            # Waiting for its read model is normal while this process builds it; when
            # another process should, a sweeper that finds nothing for long says so.
            sweeper = expiry_sweeper(
                Ledger(ledger.service, settings),
                ReadModels(location.url, log=log),
                patience=None if runner is not None else SWEEP_PATIENCE,
            )
            started.append(sweeper.views.close)
            sweeper.start()
            started.append(sweeper.stop)
            parts.services["expiry sweeper"] = sweeper.health
            parts.on_close.append(sweeper.stop)
            parts.on_close.append(sweeper.views.close)
    except BaseException:
        for stop in reversed(started):
            with contextlib.suppress(Exception):
                stop()
        raise
    if runner is not None:
        parts.services["projections"] = runner.health
        parts.services["projection versions"] = runner.versions_health
        parts.on_close.append(runner.stop)
    else:
        parts.on_close.append(location.close)
    return parts


# The streaming parts (aiokafka, faust) are imported where they are built, not above:
# importing faust costs most of a second, and `import daybook` should not pay it.
# The HTTP parts (FastAPI) likewise.
if TYPE_CHECKING:
    from daybook.infrastructure.expiry import ExpirySweeper
    from daybook.infrastructure.gateway import PaymentGateway
    from daybook.infrastructure.gateway.http import HttpPaymentGateway
    from daybook.infrastructure.http.app import HttpOptions, HttpParts
    from daybook.infrastructure.http.tokens import TokenStore
    from daybook.infrastructure.readmodels.reconciler import ContinuousReconciler
    from daybook.infrastructure.sagas.processor import SagaProcessor
    from daybook.infrastructure.streaming.app import WorkerConfig
    from daybook.infrastructure.streaming.relay import Relay

__all__: Sequence[str] = [
    "continuous_reconciler",
    "event_log_of",
    "expiry_sweeper",
    "http_parts",
    "ledger_service",
    "open_async_ledger",
    "open_event_log",
    "open_ledger",
    "open_read_models",
    "outbox_relay",
    "payment_gateway",
    "projection_runner",
    "read_only_recorder",
    "run_projections",
    "saga_processor",
    "settings_for",
    "stream_worker_config",
]
