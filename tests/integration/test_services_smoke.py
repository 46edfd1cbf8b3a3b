"""Smoke tests for the real services of scripts/services.py (PostgreSQL and the Kafka broker).

Kept fast: the Kafka test reads with a partition-assigned consumer (no consumer
group), because every group join on Tansu costs a fixed ~3 s rebalance delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from scripts import services


@pytest.mark.postgres
def test_database_is_created_empty_usable_and_dropped(pg_admin_url: str) -> None:
    name = f"smoke_{uuid.uuid4().hex[:12]}"
    url = services.create_database(pg_admin_url, name)
    try:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t VALUES (1, 'one')")
            conn.commit()
            assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("one",)
        # Creating again replaces it with an empty database, even while a session is open.
        holder = psycopg.connect(url)
        try:
            assert services.create_database(pg_admin_url, name) == url
        finally:
            holder.close()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('public.t')").fetchone() == (None,)
    finally:
        services.drop_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        assert row == (0,)


def _pytest_temp_root(factory: pytest.TempPathFactory) -> list[Path]:
    """The directories pytest makes private (0700) when a run starts: its base temp and, by
    default, the per-user root above it (``pytest-of-<user>``)."""
    base = factory.getbasetemp()
    return [base, base.parent] if base.parent.name.startswith("pytest-of-") else [base]


@pytest.mark.postgres
def test_server_survives_another_run_making_the_pytest_temp_root_private(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(services.DATABASE_URL_ENV, raising=False)  # this tests our own server
    server = services.start_postgres()
    private = _pytest_temp_root(tmp_path_factory)
    modes = {directory: directory.stat().st_mode for directory in private}
    try:
        for directory in private:
            directory.chmod(0o700)  # what pytest does to its temp root when another run starts
        # The checkpointer opens pg_control by its absolute path, so a server whose data sits
        # below a directory it can no longer traverse dies at the next checkpoint; CHECKPOINT
        # and DROP DATABASE (which forces one) bring that moment forward.
        with psycopg.connect(server.url, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute("CHECKPOINT")
        url = services.create_database(server.url, "after_private_root")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("after_private_root",)
        services.drop_database(server.url, "after_private_root")
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.running
    finally:
        for directory, mode in modes.items():
            directory.chmod(mode)
        server.stop()


@pytest.mark.postgres
def test_the_server_has_a_directory_of_its_own_that_stop_removes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(services.DATABASE_URL_ENV, raising=False)
    server = services.start_postgres()
    directory = server.directory
    assert directory is not None and server.data_dir is not None and server.log_path is not None
    assert server.data_dir.parent == directory == server.log_path.parent
    # Not durable: in memory when there is room (a durable one's, below, never is).
    assert str(directory.parent) == (
        services._server_parent(durable=False) or tempfile.gettempdir()
    )
    with psycopg.connect(server.url) as conn:
        assert conn.execute("SHOW autovacuum").fetchone() == ("off",)
    runs_as = pwd.getpwnam(services.PG_SYSTEM_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
    assert {path.stat().st_uid for path in (directory, server.data_dir, server.log_path)} == {
        runs_as
    }
    server.stop()
    assert not directory.exists()
    server.stop()  # idempotent


@pytest.mark.postgres
def test_a_server_that_exited_says_so_with_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(services.DATABASE_URL_ENV, raising=False)
    server = services.start_postgres()
    try:
        assert server.exit_report() is None
        assert server.data_dir is not None
        postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        while server.running:  # the kill is asynchronous; pytest-timeout bounds this wait
            time.sleep(0.01)
        report = server.exit_report()
        assert report is not None
        assert f"{server.url} exited with status {-signal.SIGKILL}" in report
        assert "database system is ready to accept connections" in report  # the log's tail
    finally:
        directory = server.directory
        server.stop()
    assert directory is not None and not directory.exists()


def test_creating_the_system_user_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[list[str]] = []
    entry = pwd.struct_passwd(("someone", "x", 990, 990, "", "/", "/usr/sbin/nologin"))

    def getpwnam(name: str) -> pwd.struct_passwd:
        if not created:
            raise KeyError(name)
        return entry

    def run(command: list[str], **kwargs: object) -> None:
        created.append(command)

    monkeypatch.setattr(services.pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(services.subprocess, "run", run)
    with pytest.warns(
        UserWarning, match="creating the system user 'someone'.*refuses to run as root"
    ):
        assert services._ensure_system_user("someone") == entry
    assert created and created[0][0] == "useradd" and created[0][-1] == "someone"


async def _roundtrip(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k1")
        await producer.send_and_wait(topic, b"world", key=b"k2")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[tuple[bytes | None, bytes | None]] = []
        while len(got) < 2:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            got += [(m.key, m.value) for m in batch.get(tp, [])]
        return got
    finally:
        await consumer.stop()


@pytest.mark.kafka
def test_broker_round_trips_a_message(kafka_bootstrap: str) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:12]}"
    got = asyncio.run(asyncio.wait_for(_roundtrip(kafka_bootstrap, topic), timeout=30))
    assert got == [(b"k1", b"hello"), (b"k2", b"world")]


@contextlib.contextmanager
def ports_taken_first(monkeypatch: pytest.MonkeyPatch, server_port: int) -> Iterator[list[int]]:
    """``free_port`` answers two taken ports first: one a plain socket holds, then
    ``server_port`` (another server's); then real ones. Yields the two."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = [held.getsockname()[1], server_port]
        queue = iter(taken)
        real = services.free_port
        monkeypatch.setattr(services, "free_port", lambda: next(queue, None) or real())
        yield taken


@contextlib.contextmanager
def another_server(session: Any, start: Callable[[], Any]) -> Iterator[Any]:
    """A running server of the session's kind on a known port: the session's own, or, when
    that one is external (maybe elsewhere), one started for the test and stopped after."""
    other = session if not session.external else start()
    try:
        yield other
    finally:
        if other is not session:
            other.stop()


@pytest.mark.postgres
def test_a_postgres_whose_port_was_taken_starts_on_another(
    pg_server: services.PostgresHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between finding a port free and binding it, another process can take it: a plain
    socket (postgres then exits, "Address already in use"), or another test process's
    server, which answers on that port as if it were this one. The server is started again
    on another port each time, and the URL is this server's."""
    monkeypatch.delenv(services.DATABASE_URL_ENV, raising=False)
    with (
        another_server(pg_server, services.start_postgres) as other,
        ports_taken_first(monkeypatch, int(urlsplit(other.url).port or 0)) as taken,
    ):
        handle = services.start_postgres()
    try:
        assert urlsplit(handle.url).port not in taken
        assert handle.data_dir is not None and handle.log_path is not None
        with psycopg.connect(handle.url) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None and Path(row[0]).resolve() == handle.data_dir.resolve()
        assert "Address already in use" in handle.log_path.read_text()
    finally:
        handle.stop()


def test_a_broker_whose_port_was_taken_starts_on_another(
    kafka: services.KafkaHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for PostgreSQL: a held socket (Tansu logs AddrInUse and ends), then another test
    process's broker (which answers the readiness check itself)."""
    monkeypatch.delenv(services.KAFKA_BOOTSTRAP_ENV, raising=False)
    with (
        another_server(kafka, lambda: services.start_kafka(tmp_path / "other")) as other,
        ports_taken_first(monkeypatch, other.port) as taken,
    ):
        handle = services.start_kafka(tmp_path / "broker")
    try:
        assert handle.port not in taken
        assert handle.pid is not None and services._listens(handle.pid, handle.port)
        assert handle.log_path is not None
        assert "AddrInUse" in handle.log_path.read_text()
    finally:
        handle.stop()


@pytest.mark.postgres
def test_benchmarks_get_a_durable_server_whatever_the_tests_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``$DAYBOOK_TEST_DATABASE_URL`` names the tests' server (often one with fsync off);
    the benchmarks' is ``$DAYBOOK_BENCH_DATABASE_URL`` or else a durable one of their own,
    as they print and the README says."""
    tests_server = "postgresql://postgres@127.0.0.1:9/the_tests_server"
    monkeypatch.setenv(services.DATABASE_URL_ENV, tests_server)
    monkeypatch.delenv("DAYBOOK_BENCH_DATABASE_URL", raising=False)
    with services.bench_postgres() as admin_url:
        assert admin_url != tests_server
        with psycopg.connect(admin_url) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
            data = conn.execute("SHOW data_directory").fetchone()
        # On disk, whatever room there is in memory: its data must outlive the machine.
        assert data is not None and not Path(data[0]).is_relative_to(services.MEMORY_DIR)


def test_a_new_server_removes_what_killed_test_processes_left_in_memory(tmp_path: Path) -> None:
    """A test process killed with SIGKILL leaves its server's directory behind (the server
    stops on its parent-death signal; nobody removes it): in memory it would hold RAM until
    the machine restarts. The next server made there removes those whose server is gone,
    and leaves one running, or one just being made, alone."""
    old = time.time() - services.STALE_AFTER_SECONDS - 60

    def server_dir(name: str, pid: int | None, mtime: float | None) -> Path:
        directory = tmp_path / name
        (directory / "pgdata").mkdir(parents=True)
        if pid is not None:
            (directory / "pgdata" / "postmaster.pid").write_text(f"{pid}\n/data\n")
        if mtime is not None:
            os.utime(directory, (mtime, mtime))
        return directory

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = server_dir("daybook-postgres-left", None, old)
    crashed = server_dir("daybook-standby-crashed", dead.pid, old)
    running = server_dir("daybook-postgres-running", os.getpid(), old)
    being_made = server_dir("daybook-postgres-new", None, None)
    someone_elses = server_dir("other-thing", None, old)
    assert sorted(services.sweep_stale_servers(tmp_path)) == sorted([left, crashed])
    assert [p.exists() for p in (left, crashed, running, being_made, someone_elses)] == [
        False, False, True, True, True
    ]  # fmt: skip
