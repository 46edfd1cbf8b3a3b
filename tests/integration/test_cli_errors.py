"""Every way a person can hold the command line wrong ends as one line on stderr and a
non-zero exit, never a traceback (one test per case that used to print one)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from daybook import open_ledger, run_projections
from daybook.infrastructure import preflight
from daybook.infrastructure.cli import EXIT_BROKEN_PIPE, main
from daybook.infrastructure.preflight import Unusable
from daybook.infrastructure.urls import BadURL
from daybook.projections.accounts import ACCOUNT_BALANCES, OPENED
from daybook.projections.model import LogEvent, Rows
from scripts import services
from scripts.outage import Outage

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nothing listens on (a database that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2, *, by_exit: bool = False
) -> str:
    """Run ``daybook argv``; assert it exits ``code`` (returned by ``main``, or with
    ``by_exit`` raised as argparse's ``SystemExit``) with one line on stderr; that line."""
    if by_exit:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == code
    else:
        assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def daybook(*args: str, **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "daybook.infrastructure.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        preexec_fn=services.sigint_as_default,  # Ctrl-C reaches it as it would a user's
        **popen,
    )


@pytest.fixture
def ledger_file(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        ledger.open_account("ann", "EUR")
    return url


def reader_gone(*args: str) -> tuple[int, str]:
    """Run ``daybook args`` with its stdout a pipe whose reader closed at once (``| head``
    that has read enough); its exit code and stderr."""
    proc = daybook(*args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def assert_broken_pipe(code: int, err: str) -> None:
    assert code == EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip() == (
        "daybook: the output was closed before everything was written (broken pipe)"
    )


# -- output closed early: `| head` ----------------------------------------------------------


def test_demo_into_a_closed_pipe() -> None:
    assert_broken_pipe(*reader_gone("demo", "--url", "memory://", "--commands", "5"))


def test_stream_status_into_a_closed_pipe(pg_url: str) -> None:
    assert_broken_pipe(*reader_gone("stream", "status", "--url", pg_url))


def test_reconcile_into_a_closed_pipe(ledger_file: str) -> None:
    assert_broken_pipe(*reader_gone("reconcile", "--url", ledger_file))


# -- URLs that cannot work ------------------------------------------------------------------


def test_sqlite_path_under_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line(capsys, ["projections", "status", "--url", "sqlite:////dev/null/x.db"])
    assert "'/dev/null' is not a folder" in line


@pytest.mark.parametrize("url", ["postgresql://[::1/ledger", "postgresql://u:pw@[::1/ledger"])
def test_a_url_that_cannot_be_split_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    line = one_line(capsys, ["balance", "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b", "--url", url])
    assert "store URL 'postgresql://...'" in line and "Invalid IPv6 URL" in line
    assert "Value error" not in line and "pw" not in line


def test_readmodels_in_memory_are_refused(
    capsys: pytest.CaptureFixture[str], ledger_file: str
) -> None:
    argv = ["projections", "status", "--url", ledger_file, "--readmodels-url", "memory://"]
    line = one_line(capsys, argv)
    assert "read-model database URL 'memory://': this command needs sqlite:// or" in line


def test_readmodels_on_a_server_that_is_down(
    capsys: pytest.CaptureFixture[str], ledger_file: str
) -> None:
    url = f"postgresql://127.0.0.1:{closed_port()}/x"
    argv = ["projections", "status", "--url", ledger_file, "--readmodels-url", url]
    assert "read-model database at" in one_line(capsys, argv)


def test_a_file_that_is_not_a_database(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("shopping list\n")
    line = one_line(capsys, ["projections", "status", "--url", f"sqlite:///{tmp_path}/notes.db"])
    assert "is not a SQLite database" in line


@pytest.mark.parametrize(
    "url", ["sqlite:///{tmp}/ledger.db", "memory://", "sqlite:///.daybook/daybook.db"]
)
def test_relay_needs_postgresql(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # The embedded default's path, given as --url with no $DAYBOOK_URL, is still a URL given.
    monkeypatch.delenv("DAYBOOK_URL", raising=False)
    line = one_line(capsys, ["relay", "--url", url.format(tmp=tmp_path)])
    assert "this command needs postgresql://" in line
    assert not (tmp_path / "ledger.db").exists()  # refused before anything was created


def test_relay_without_a_url_says_it_needs_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAYBOOK_URL", raising=False)
    assert "this command needs --url" in one_line(capsys, ["relay"])


def test_stream_status_refuses_sqlite(capsys: pytest.CaptureFixture[str], ledger_file: str) -> None:
    line = one_line(capsys, ["stream", "status", "--url", ledger_file])
    assert "this command needs postgresql://" in line


def test_worker_on_sqlite(capsys: pytest.CaptureFixture[str], ledger_file: str) -> None:
    assert "needs postgresql://" in one_line(capsys, ["worker", "--url", ledger_file])


def test_worker_with_no_broker(capsys: pytest.CaptureFixture[str], pg_url: str) -> None:
    """With no startup wait, a service refuses at once, in one line (by default it would
    wait for the broker: see the next test)."""
    broker = f"kafka://127.0.0.1:{closed_port()}"
    line = one_line(capsys, ["worker", "--url", pg_url, "--broker", broker, "--startup-wait", "0"])
    assert "no Kafka broker answers" in line and "connection refused" in line


@pytest.fixture
def greeting_port() -> Iterator[int]:
    """A port whose server speaks first (as SSH, SMTP or MySQL do), then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                with connection:
                    connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize("stranger", ["PostgreSQL", "SSH"])
def test_a_broker_url_naming_another_servers_port_is_refused_at_once(
    request: pytest.FixtureRequest, pg_url: str, stranger: str
) -> None:
    """A broker URL with the database's port (or some other server's) is a mistake no wait
    cures: the worker says what answers there, and ends at once rather than wait for a
    broker that will never start there."""
    if stranger == "PostgreSQL":
        port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
        answer = "it answered like a PostgreSQL server"
    else:
        port = request.getfixturevalue("greeting_port")
        answer = "it answered 'SSH-2.0-'"
    worker = daybook(
        "worker", "--url", pg_url, "--broker", f"kafka://127.0.0.1:{port}", "--startup-wait", "60"
    )
    _, err = worker.communicate(timeout=120)
    text = err.decode()
    assert worker.returncode == 2, text
    assert "waiting at start" not in text and "Traceback" not in text
    assert f"127.0.0.1:{port}: answers, but not as a Kafka broker ({answer})" in text
    assert "is that the broker's port?" in text


def test_a_service_waits_for_a_broker_that_is_down_then_gives_up_at_its_startup_wait(
    pg_url: str,
) -> None:
    broker = f"kafka://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    worker = daybook("worker", "--url", pg_url, "--broker", broker, "--startup-wait", "1.5")
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 2
    assert time.monotonic() - started >= 1.5  # it waited, rather than refuse at once
    lines = err.decode().strip().splitlines()
    assert "Traceback" not in err.decode()
    assert "waiting at start: no Kafka broker answers" in lines[0]
    assert "no Kafka broker answers" in lines[-1] and "gave up after " in lines[-1]
    assert lines[-1].endswith("the startup wait is 1.5 s)")


def _stderr_line(process: subprocess.Popen[bytes], words: str, timeout: float = 60) -> list[str]:
    """Read ``process``'s stderr until a line holds ``words``; the lines read."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline().decode()
        assert line, f"ended before saying {words!r}: {lines}"
        lines.append(line)
        if words in line:
            return lines
    raise AssertionError(f"never said {words!r}: {lines}")


def test_a_service_waiting_at_start_stops_cleanly_on_sigterm() -> None:
    project = daybook("project", "--url", f"postgresql://127.0.0.1:{closed_port()}/x")
    _stderr_line(project, "waiting at start")
    project.send_signal(signal.SIGTERM)
    _, rest = project.communicate(timeout=30)
    assert project.returncode == 0
    assert "stopped while waiting at start (signal 15)" in rest.decode()
    assert "Traceback" not in rest.decode()


def test_a_service_waiting_at_start_serves_its_metrics_saying_so() -> None:
    """A probe pointed at the metrics port sees the service from its first second, and
    sees that it waits (an orchestrator would otherwise count it dead and restart it)."""
    project = daybook(
        "project", "--url", f"postgresql://127.0.0.1:{closed_port()}/x", "--metrics-port", "0"
    )
    try:
        said = _stderr_line(project, "waiting at start")
        (line,) = [line for line in said if "metrics at http://" in line]
        url = line.split("metrics at ", 1)[1].split()[0]
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        assert "daybook_waiting_at_start 1.0" in text.splitlines()
    finally:
        project.send_signal(signal.SIGTERM)
        project.communicate(timeout=30)
    assert project.returncode == 0


def test_ctrl_c_while_a_broker_keeps_the_check_waiting_ends_cleanly(pg_url: str) -> None:
    """A broker port that accepts and never answers holds the Kafka check for its timeout;
    Ctrl-C there ends the command at once, with its one line and nothing from asyncio."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        broker = f"kafka://127.0.0.1:{silent.getsockname()[1]}"
        worker = daybook("worker", "--url", pg_url, "--broker", broker, "--startup-wait", "0")
        deadline = time.monotonic() + 30
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # inside the check's metadata request
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
    finally:
        silent.close()
        for connection in held:
            connection.close()
    assert worker.returncode == 130
    assert err.decode().strip().splitlines() == ["daybook: interrupted"], err.decode()


def test_a_service_refuses_at_once_what_no_wait_cures(pg_url: str) -> None:
    """A database that does not exist: no waiting, whatever the startup wait."""
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    serve = daybook("serve", "--url", missing, "--port", str(closed_port()))
    _, err = serve.communicate(timeout=60)
    assert serve.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "the database does not exist" in lines[0], lines


def test_a_startup_wait_it_cannot_use_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    one_line(capsys, ["project", "--startup-wait", "-1"], by_exit=True)
    line = one_line(capsys, ["reconcile", "--url", pg_url, "--startup-wait", "5"])
    assert "--startup-wait is for --continuous" in line
    line = one_line(capsys, ["relay", "--url", pg_url, "--rewind", "--startup-wait", "5"])
    assert "--startup-wait is for the running relay" in line
    # A process of its own: a service sets up logging first, for this process.
    monkeypatch.setenv("DAYBOOK_STARTUP_WAIT", "soon")
    project = daybook("project", "--url", f"postgresql://127.0.0.1:{closed_port()}/x")
    _, err = project.communicate(timeout=60)
    assert project.returncode == 2
    assert err.decode().strip().splitlines() == [
        "daybook: $DAYBOOK_STARTUP_WAIT: expected a number of seconds, got 'soon'"
    ]


@pytest.mark.parametrize(
    "argv", [["projections", "resume", "account_balances"], ["stream", "status"]]
)
def test_while_the_database_is_down(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    line = one_line(capsys, [*argv, "--url", f"postgresql://127.0.0.1:{closed_port()}/daybook"])
    assert "connection refused" in line


def test_refused_and_unknown_host_read_differently(capsys: pytest.CaptureFixture[str]) -> None:
    status = ["projections", "status", "--url"]
    refused = one_line(capsys, [*status, f"postgresql://u:pw@127.0.0.1:{closed_port()}/x"])
    unknown = one_line(capsys, [*status, "postgresql://u:pw@no-such-host.invalid/x"])
    assert "connection refused" in refused and "unknown host" in unknown
    assert "pw" not in refused + unknown  # a password never reaches a message


def test_what_the_preflight_checks_call_transient(pg_url: str) -> None:
    """A closed port or an absent broker or gateway may come back; a missing database or a
    malformed URL will not."""

    def refusal(check: Callable[[str], None], url: str) -> Unusable:
        with pytest.raises(Unusable) as refused:
            check(url)
        return refused.value

    closed = closed_port()
    assert refusal(preflight.check_postgres, f"postgresql://u@127.0.0.1:{closed}/x").transient
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    assert not refusal(preflight.check_postgres, missing).transient
    assert refusal(preflight.check_broker, f"kafka://127.0.0.1:{closed}").transient
    assert not refusal(preflight.check_broker, "kafka://no-port").transient
    # A port that takes connections and drops them (a broker starting up, a proxy in front
    # of one that is down) is no broker yet.
    with Outage("127.0.0.1", closed) as silent:
        half = refusal(preflight.check_broker, f"kafka://127.0.0.1:{silent.port}")
    assert half.transient and "accepts connections but gives no Kafka answer" in str(half)
    assert refusal(preflight.check_gateway, f"http://127.0.0.1:{closed}/").transient
    assert not refusal(preflight.check_gateway, "ftp://gateway").transient


def test_a_database_that_does_not_exist(capsys: pytest.CaptureFixture[str], pg_url: str) -> None:
    url = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    assert "the database does not exist" in one_line(
        capsys, ["projections", "status", "--url", url]
    )


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_an_event_store_whose_default_isolation_is_stricter_is_written_read_committed(
    capsys: pytest.CaptureFixture[str], pg_admin_url: str, isolation: str
) -> None:
    """A commit checks the accounts its commands only read (closed meanwhile?) under the
    lock every writer takes, and must see what committed while it waited; under REPEATABLE
    READ its snapshot would predate the wait. daybook's sessions run READ COMMITTED whatever
    the database's default (or the URL's options) say, rather than refusing the database."""
    import psycopg

    name = "daybook_" + isolation.replace(" ", "_")
    url = services.create_database(pg_admin_url, name)
    try:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = '{isolation}'")
        with psycopg.connect(url) as conn:
            assert conn.execute("SHOW transaction_isolation").fetchone() == (isolation,)
        assert main(["projections", "status", "--url", url]) == 0
        capsys.readouterr()
        given = f"{url}?options=-c%20default_transaction_isolation%3Dserializable"
        for where in (url, given):
            with open_ledger(where) as ledger:
                ledger.open_account("ann", "EUR")
                with ledger.service.recorder.datastore.transaction() as cursor:
                    cursor.execute("SHOW transaction_isolation")
                    assert cursor.fetchone() == {"transaction_isolation": "read committed"}
    finally:
        services.drop_database(pg_admin_url, name)


def test_ctrl_c_during_the_demo(tmp_path: Path) -> None:
    proc = daybook(
        "demo",
        "--url",
        f"sqlite:///{tmp_path}/demo.db",
        "--commands",
        "100000",
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"daybook demo on")  # the clients are starting
    time.sleep(0.5)  # let them get going (not a threshold: any moment of the run will do)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # (nothing to kill unless it timed out: then not left running)
    assert proc.returncode == 130
    assert err.decode().strip() == "daybook: interrupted"


# -- paths and stores that would have been created or read as empty -------------------------


def test_sqlite_folder_missing_is_refused_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/nonexistent/dir/x.db"
    assert "does not exist" in one_line(capsys, ["demo", "--url", url])
    with pytest.raises(BadURL, match="does not exist"):
        open_ledger(url)  # the Python API refuses it too
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("argv", [["projections", "status"], ["reconcile"]])
def test_reading_commands_refuse_a_missing_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    line = one_line(capsys, [*argv, "--url", f"sqlite:///{tmp_path}/typo.db"])
    assert "there is no database at" in line
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["project"],
        ["projections", "status"],
        ["projections", "rebuild", "account_balances"],
        ["projections", "resume", "account_balances"],
        ["reconcile"],
        ["balance", "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b"],
        ["stock", "SKU-1"],
        ["statement", "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b"],
        ["serve"],
        ["tokens", "list"],
        ["tokens", "create", "x", "--scope", "read"],
    ],
)
def test_memory_is_refused_where_it_cannot_work(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    line = one_line(capsys, [*argv, "--url", "memory://"])
    assert "memory:// lives inside one process" in line


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "wrong"),
    [
        (["demo", "--clients", "0"], "--clients: must be at least 1, got 0"),
        (["demo", "--commands", "-5"], "--commands: must be at least 1, got -5"),
        (["demo", "--clients", "many"], "--clients: expected a whole number, got 'many'"),
        # What int() and float() read but a person would not write: digit separators, a
        # plus sign, spaces, other scripts' digits, exponents and special values.
        (["demo", "--clients", "1_0"], "--clients: expected a whole number, got '1_0'"),
        (["demo", "--clients", "+5"], "--clients: expected a whole number, got '+5'"),
        (["demo", "--clients", " 3"], "--clients: expected a whole number, got ' 3'"),
        (["demo", "--clients", "\u0663"], "--clients: expected a whole number"),
        (["project", "--poll-interval", "1_0"], "--poll-interval: expected a number of seconds"),
        (["project", "--poll-interval", "nan"], "--poll-interval: expected a number of seconds"),
        (["project", "--poll-interval", "1e3"], "--poll-interval: expected a number of seconds"),
        (["tokens", "create", "x", "--scope", "read", "--rate", "inf"], "expected requests per"),
        (["project", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["project", "--poll-interval", "0"], "--poll-interval: must be more than 0 seconds"),
        (["relay", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["relay", "--partitions", "0"], "--partitions: must be at least 1, got 0"),
        (["worker", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["projections", "rebuild", "account_balances", "--batch-size", "0"], "at least 1"),
        (["statement", "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b", "--limit", "0"], "at least 1"),
        (["serve", "--port", "70000"], "--port: must be at most 65535, got 70000"),
        (["serve", "--read-connections", "0"], "--read-connections: must be at least 1"),
        (["serve", "--token-cache-seconds", "-1"], "must be more than 0 seconds"),
        # Past what a 64-bit column holds: SQLite would raise OverflowError on them.
        (
            ["statement", "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b", "--before", str(2**63)],
            f"--before: must be at most {2**63 - 1}",
        ),
        (["requests", "purge", "--batch-size", "1" + "0" * 20], "--batch-size: expected a whole"),
        (["tokens", "create", "x", "--scope", "read", "--rate", "0"], "--rate: must be above 0"),
        (
            ["statement", "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b", "--limit", "10001"],
            "--limit: must be at most 10000",
        ),
    ],
)
def test_numbers_are_checked(
    capsys: pytest.CaptureFixture[str], argv: list[str], wrong: str
) -> None:
    assert wrong in one_line(capsys, argv, by_exit=True)


# -- topics and consumer groups ------------------------------------------------------------

_TOPIC = "a topic name is 1-236 characters of a-z, A-Z, 0-9, '.', '_' and '-'"
_GROUP = "a consumer group id is 1-229 characters of a-z, A-Z, 0-9, '.', '_' and '-'"


@pytest.mark.parametrize(
    ("argv", "wrong"),
    [
        # `--group "$GROUP"` with the variable unset: faust's traceback, from the worker.
        (["worker", "--group", ""], f"--group: {_GROUP}, got ''"),
        (["worker", "--group", "views 2"], f"--group: {_GROUP}, got 'views 2'"),
        (["worker", "--group", "g" * 230], f"--group: {_GROUP}, got 'ggg"),
        (["worker", "--topic", ""], f"--topic: {_TOPIC}, and not '.' or '..', got ''"),
        (["relay", "--topic", ".."], f"--topic: {_TOPIC}, and not '.' or '..', got '..'"),
        (["relay", "--topic", "daybook/events"], f"--topic: {_TOPIC}"),
        # Its dead letters go to TOPIC.dead-letters, itself at most 249 characters.
        (["relay", "--topic", "t" * 237], f"--topic: {_TOPIC}"),
        (["stream", "status", "--group", ""], f"--group: {_GROUP}, got ''"),
        (["stream", "status", "--topic", "é"], f"--topic: {_TOPIC}"),
        (["projections", "handover", "sagas", "--to", "runner", "--topic", ""], "--topic: a topic"),
    ],
)
def test_topics_and_groups_are_checked(
    capsys: pytest.CaptureFixture[str], argv: list[str], wrong: str
) -> None:
    """Refused as the options are read: the services would otherwise wait (for ever, by
    default) for the database named here, which is down."""
    if argv[0] in ("worker", "relay"):
        argv = [*argv, "--startup-wait", "0"]
    assert wrong in one_line(capsys, [*argv, "--url", "postgresql://127.0.0.1:1/x"], by_exit=True)


@pytest.mark.parametrize(
    ("variable", "value", "wrong"),
    [
        ("DAYBOOK_GROUP", "views 2", f"group (or $DAYBOOK_GROUP): {_GROUP}, got 'views 2'"),
        ("DAYBOOK_TOPIC", "..", f"topic (or $DAYBOOK_TOPIC): {_TOPIC}, and not '.' or '..'"),
    ],
)
def test_a_topic_or_group_from_the_environment_is_checked_as_the_option_is(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    wrong: str,
) -> None:
    monkeypatch.setenv(variable, value)
    argv = ["stream", "status", "--url", f"postgresql://127.0.0.1:{closed_port()}/x"]
    assert wrong in one_line(capsys, argv)
    # An option given instead is what counts: the command goes on, to the database.
    assert "connection refused" in one_line(capsys, [*argv, "--group", "g", "--topic", "t"])


@pytest.mark.parametrize(
    ("query", "where"),
    [
        ("connect_timeout=99999999999", "--url"),
        ("keepalives_idle=99999999999", "--url"),
        ("tcp_user_timeout=2147483648", "DAYBOOK_URL"),
    ],
)
def test_a_libpq_number_out_of_range_in_a_url_is_one_line_without_a_traceback(
    pg_url: str, query: str, where: str
) -> None:
    """On a server that answers: the number used to reach libpq or psycopg's pool, and
    ended as a traceback, an outage's words, or a silent default."""
    parts = urlsplit(pg_url)
    secret = parts.password or "S3cretPW"  # the test server trusts: any password will do
    where_to = f"{parts.username}:{secret}@{parts.hostname}:{parts.port}"
    url = urlunsplit(parts._replace(netloc=where_to))
    url = f"{url}{'&' if '?' in url else '?'}{query}"
    argv = ["balance", "00000000-0000-0000-0000-000000000001"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if where == "--url":
        argv += ["--url", url]
    else:
        env["DAYBOOK_URL"] = url
    done = subprocess.run(
        [sys.executable, "-m", "daybook.infrastructure.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    name = query.partition("=")[0]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"?{name}= takes a whole number from" in done.stderr, done.stderr
    assert "2147483647" in done.stderr
    assert secret not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["balance", "nope"],
        ["statement", "nope"],
        ["sagas", "show", "nope"],
        ["sagas", "cancel", "nope", "--reason", "x"],
        ["sagas", "retry", "nope", "--reason", "x"],
    ],
)
def test_ids_are_checked_in_the_same_words(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert "id must be a UUID, got 'nope'" in one_line(capsys, argv, by_exit=True)


def test_a_handover_to_stream_workers_on_sqlite_is_refused_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], ledger_file: str
) -> None:
    """The workers keep read models on PostgreSQL only: a version handed to a group on
    SQLite would have no writer at all."""
    from daybook import projections
    from daybook.infrastructure.bootstrap import event_log_of
    from daybook.infrastructure.readmodels.runner import ProjectionRunner

    with open_ledger(ledger_file) as ledger:
        runner = ProjectionRunner(event_log_of(ledger), ledger_file, projections.ALL)
        runner.run_until_caught_up()
        runner.stop()
    assert main(["projections", "status", "--url", ledger_file]) == 0
    before = capsys.readouterr().out
    line = one_line(
        capsys, ["projections", "handover", "account_balances", "--to", "stream:g", "--url",
                 ledger_file], code=1,
    )  # fmt: skip
    assert "PostgreSQL only" in line and "keep them with the runner" in line
    assert main(["projections", "status", "--url", ledger_file]) == 0
    assert capsys.readouterr().out == before


@pytest.mark.parametrize(
    ("owner", "wrong"),
    [
        ("bogus", "--to: expected runner or stream:GROUP, got 'bogus'"),
        ("Runner", "--to: expected runner or stream:GROUP, got 'Runner'"),
        ("stream:", "--to: expected runner or stream:GROUP (a consumer group id is 1-229"),
        ("stream:views 2", "--to: expected runner or stream:GROUP (a consumer group id is"),
    ],
)
def test_a_handover_to_an_owner_that_cannot_be_is_a_bad_option_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], ledger_file: str, owner: str, wrong: str
) -> None:
    """It was refused by the handover itself, exit 1 as for a refusal of a valid request."""
    path = Path(urlsplit(ledger_file).path)
    before = path.read_bytes()
    argv = ["projections", "handover", "account_balances", "--to", owner, "--url", ledger_file]
    assert wrong in one_line(capsys, argv, by_exit=True)
    assert path.read_bytes() == before


def test_a_handover_on_a_mistyped_path_is_refused_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["projections", "handover", "account_balances", "--to", "runner", "--url",
            f"sqlite:///{tmp_path}/typo.db"]  # fmt: skip
    assert "there is no database at" in one_line(capsys, argv)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["has space", ".dot-first", "x" * 65, "é"])
def test_a_token_name_it_cannot_take_is_refused_before_a_database_is_made(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    argv = ["tokens", "create", name, "--scope", "read", "--url", f"sqlite:///{tmp_path}/new.db"]
    assert "a token name is 1-64 letters" in one_line(capsys, argv, by_exit=True)
    assert list(tmp_path.iterdir()) == []


def test_pacing_a_single_reconcile_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], ledger_file: str
) -> None:
    for pace in (["--every-events", "5"], ["--every-seconds", "5"]):
        line = one_line(capsys, ["reconcile", *pace, "--url", ledger_file])
        assert "add --continuous" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["projections", "resume", "account_balances"],
        ["projections", "drop", "account_balances", "7"],
        ["reconcile", "account_balances"],
    ],
)
def test_a_projection_version_nobody_built_is_refused_with_its_stable_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    """As every other refusal of these commands: a script tells "never built" from a
    failure by the code, not the English."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    open_ledger(url).close()
    line = one_line(capsys, [*argv, "--url", url], code=1)
    assert line.startswith("daybook: refused (version_not_found): "), line


def test_reconciling_a_named_projection_that_was_never_built_fails(
    capsys: pytest.CaptureFixture[str], ledger_file: str
) -> None:
    """Asked for one projection, reconcile that checked nothing has not done what was asked
    (a full pass still skips the versions not built, and says so)."""
    line = one_line(capsys, ["reconcile", "account_balances", "--url", ledger_file], code=1)
    assert line.startswith(
        "daybook: refused (version_not_found): account_balances version 1 is absent;"
        " nothing to reconcile"
    )
    assert "daybook projections rebuild account_balances" in line
    assert main(["reconcile", "--url", ledger_file]) == 0
    assert "account_balances: skipped" in capsys.readouterr().out


def _refuses(event: LogEvent, rows: Rows) -> None:
    raise ValueError(f"{event.type}: refused by this definition")


def test_a_reconcile_whose_fold_fails_is_refused_in_one_line_and_a_full_pass_goes_on(
    capsys: pytest.CaptureFixture[str], ledger_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The code's definition refuses an event the stored version applied: the log cannot be
    folded (`reconcile_failed`). That ended `daybook reconcile` in a traceback, in the
    middle of a full pass."""
    with (
        open_ledger(ledger_file) as ledger,
        run_projections(ledger, ledger_file, start=False) as runner,
    ):
        runner.run_until_caught_up()
    monkeypatch.setitem(ACCOUNT_BALANCES.handlers, OPENED, _refuses)
    line = one_line(capsys, ["reconcile", "account_balances", "--url", ledger_file], code=1)
    assert line.startswith("daybook: refused (reconcile_failed): account_balances v1: folding")
    assert main(["reconcile", "--url", ledger_file]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "daybook: refused (reconcile_failed): account_balances v1: folding" in err
    assert err.strip().splitlines()[-1] == (
        "daybook: not reconciled (the log could not be folded): account_balances"
    )
    assert "daily_activity v" in out and "clean" in out  # the pass went on
    # Recorded as a failed run, as the continuous reconciler records one.
    assert main(["projections", "status", "--url", ledger_file]) == 0
    assert "failed: account_balances v1: folding the log failed" in capsys.readouterr().out


def test_serve_on_a_port_in_use_says_so_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"sqlite:///{tmp_path}/d.db"
        line = one_line(capsys, ["serve", "--url", url, "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in line and "another --port" in line
    assert not (tmp_path / "d.db").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    "command",
    [
        ["project"],
        ["reconcile", "--continuous"],
        ["sagas", "run", "--gateway", "http://127.0.0.1:9"],
    ],
)
def test_a_metrics_port_in_use_is_one_line_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    """It ended in a traceback (the metrics server's OSError), exit 1."""
    url = f"sqlite:///{tmp_path}/d.db"
    open_ledger(url).close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line(capsys, [*command, "--url", url, "--metrics-port", str(port)])
    assert f"cannot serve metrics on port {port}" in line and "another --metrics-port" in line


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example"])
def test_serve_on_a_host_name_that_cannot_be_looked_up_says_so_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, host: str
) -> None:
    """An empty label or one over 63 characters: the lookup refuses the name before asking
    anyone (a UnicodeError, not an OSError), which ended in a traceback."""
    url = f"sqlite:///{tmp_path}/d.db"
    line = one_line(capsys, ["serve", "--url", url, "--host", host, "--port", str(closed_port())])
    assert f"cannot listen on {host}:" in line and "another --port or --host" in line
    assert not (tmp_path / "d.db").exists()


def test_serve_with_a_tls_pair_it_cannot_use_says_so_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    serve = ["serve", "--url", f"sqlite:///{tmp_path}/d.db", "--port", str(closed_port())]
    missing = one_line(
        capsys, [*serve, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(junk)]
    )
    assert "cannot read the TLS certificate or key" in missing and "none.pem" in missing
    unusable = one_line(capsys, [*serve, "--tls-cert", str(junk), "--tls-key", str(junk)])
    assert "do not make a pair" in unusable
    assert not (tmp_path / "d.db").exists()  # refused before anything was opened


def test_a_rebuild_on_a_foreign_read_model_database_says_so_in_one_line(
    ledger_file: str, tmp_path: Path
) -> None:
    """A read-model database whose catalog table is someone else's: the rebuild stops at
    once with one line (it waits out outages, not mistakes), and no traceback. (A process
    of its own: what it logs reaches stderr as it would for a user, which it does not under
    pytest's log capture.)"""
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE daybook_read_models (something TEXT)")
    rebuilding = daybook("projections", "rebuild", "account_balances", "--url", ledger_file,
                         "--readmodels-url", f"sqlite:///{foreign}")  # fmt: skip
    _, err = rebuilding.communicate(timeout=120)
    assert rebuilding.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot be used" in lines[0], lines
