"""Checks a command makes before it builds anything: is this store one it can use, does it
answer, and is it what it claims to be.

Without them, a mistyped URL surfaced as whatever the first library call raised: a
``FileExistsError`` for a SQLite path under a file, ``sqlite3.DatabaseError`` for a file that
is not a database, an event store created where none was meant to be, or a PostgreSQL
connection pool that took its full 10 s to report that nothing listens on the port. Here each
ends as ``Unusable`` with one sentence naming the URL's place (never its password) and what
to do, within a short connect timeout.

A service (``serve``, ``project``, ``relay``, ``worker``, ``sagas run``, ``reconcile
--continuous``) runs its checks through ``wait_until_usable``: a server that is down, starting
up or out of reach is waited for, as the running service waits out an outage, rather than
ending the service; a refusal no wait cures (a wrong password, a missing database, a bad URL)
still ends it at once.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import psycopg

from daybook.infrastructure.transient import causes, is_transient
from daybook.infrastructure.urls import (
    DEFAULT_URL,
    BadURL,
    no_sqlite_file,
    postgres_params,
    redacted,
    scheme,
    sqlite_file_problem,
    sqlite_path,
    unreadable_userinfo,
)

#: Seconds a check waits for a server (libpq's own minimum is 2).
CONNECT_TIMEOUT = 3

#: Why ``memory://`` cannot serve a command that runs in a process of its own.
MEMORY_IS_PRIVATE = (
    "memory:// lives inside one process, and this command would see an empty ledger of its own"
)


class Unusable(BadURL):
    """A store or broker a command cannot use; the message says why and what would work.
    ``transient``: the reason may pass by itself (the server is down, starting up or out of
    reach), so a service may wait for it (``wait_until_usable``)."""

    code = "unusable"

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class PermissionDenied(BadURL):
    """The database refused the URL's role a statement daybook needs to open its store (to
    create its tables, say, on a schema where the role may not create): an operator's
    grant to make, not a bug. The message is the server's, with the grant that cures it."""

    code = "permission_denied"


def permission_denied(
    url: str, error: BaseException, *, role: str = "event store"
) -> PermissionDenied:
    """``PermissionDenied`` for ``error`` (``transient.denied`` holds for it): the server's
    words, and what to do about them."""
    cause = next((c for c in causes(error) if isinstance(c, psycopg.Error)), error)
    said = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    user = postgres_params(url).user
    if isinstance(cause, psycopg.errors.ReadOnlySqlTransaction):
        cure = "the server takes no writes (a standby?): give the URL of the primary"
    elif schema := re.fullmatch(r"permission denied for schema (\S+)", said):
        cure = (
            f"GRANT CREATE ON SCHEMA {schema[1]} TO {user} (as the schema's owner), or "
            "create daybook's tables once as a role that may"
        )
    else:
        cure = f"grant {user} what the server names, or open it as a role that has it"
    return PermissionDenied(f"the {role} at {where(url)}: the database refused ({said}): {cure}")


_T = TypeVar("_T")

#: The longest pause between two checks of a service that waits at start.
MAX_PAUSE = 5.0
#: How often a service still waiting says so (besides whenever the reason changes).
SAY_EVERY = 30.0


def wait_until_usable(
    check: Callable[[], _T],
    *,
    limit: float | None,
    log: logging.Logger,
    waited: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> _T:
    """``check()``'s result, once it passes. While it fails for a reason that may pass by
    itself (``Unusable.transient``), wait and check again, with pauses growing to
    ``MAX_PAUSE``: one warning when the wait starts, one every ``SAY_EVERY`` seconds or when
    the reason changes, one when it ends. Any other refusal is raised at once; so is a
    transient one after ``limit`` seconds (None: no limit; 0: the first failure is raised),
    of which ``waited`` were spent before this call (by a worker before it started again)."""
    started = clock() - waited
    pause = 0.5
    said_at: float | None = None
    reason = ""
    while True:
        try:
            result = check()
        except Unusable as refusal:
            now = clock()
            waited = now - started
            if not refusal.transient:
                raise
            if limit is not None and waited >= limit:
                if limit == 0:
                    raise  # no wait asked for: the refusal as it is
                msg = f"{refusal} (gave up after {waited:.1f} s: the startup wait is {limit:g} s)"
                raise Unusable(msg) from None
            fields = {"waited_seconds": round(waited, 1), "reason": str(refusal)}
            if said_at is None:
                log.warning(
                    "waiting at start: %s; checking again until it answers (Ctrl-C stops; "
                    "--startup-wait SECONDS or $DAYBOOK_STARTUP_WAIT gives up after that long)",
                    refusal, extra={"fields": fields},
                )  # fmt: skip
                said_at = now
            elif str(refusal) != reason or now - said_at >= SAY_EVERY:
                # The reason first: the log's rate limit then keeps one line per reason, so a
                # change of reason is never held back as a repeat.
                log.warning(
                    "%s: still waiting at start, after %.0f s",
                    str(refusal), waited, extra={"fields": fields},
                )  # fmt: skip
                said_at = now
            reason = str(refusal)
            sleep(pause if limit is None else max(0.0, min(pause, limit - waited)))
            pause = min(pause * 2, MAX_PAUSE)
            continue
        if said_at is not None:
            waited = clock() - started
            log.warning(
                "everything this service needs answers now, after %.1f s of waiting; starting",
                waited, extra={"fields": {"waited_seconds": round(waited, 1)}},
            )  # fmt: skip
        return result


def where(url: str) -> str:
    """The URL without its password, for messages."""
    kind = scheme(url)
    if kind != "postgresql":
        return url
    if unreadable_userinfo(url):
        # A password written unencoded ('/', '?', '#' or '@' in it): its parts would be
        # taken for a host, a port and the database's name.
        return redacted(url)
    params = postgres_params(url)
    return f"postgresql://{params.user}@{params.host}:{params.port}/{params.dbname}"


def check_store(
    url: str,
    *,
    role: str = "event store",
    kinds: Collection[str] = ("memory", "sqlite", "postgresql"),
    why: str = "",
    existing: bool = False,
) -> None:
    """Refuse ``url`` unless its scheme is one of ``kinds`` (``why`` says why the others
    cannot work) and it answers: a SQLite file in a folder that exists (and, with
    ``existing``, a database already there), a PostgreSQL server that accepts the login."""
    kind = scheme(url)
    if kind not in kinds:
        if kind == "memory" and not why:
            why = MEMORY_IS_PRIVATE
        wanted = " or ".join(f"{k}://" for k in kinds)
        because = f" ({why})" if why else ""
        raise Unusable(f"the {role} URL {where(url)!r}: this command needs {wanted}{because}")
    if kind == "sqlite":
        check_sqlite(url, role=role, existing=existing)
    elif kind == "postgresql":
        check_postgres(url, role=role)


def check_sqlite(url: str, *, role: str = "event store", existing: bool = False) -> None:
    path = sqlite_path(url)
    if url == DEFAULT_URL:
        if existing and not path.exists():
            raise Unusable(
                f"there is no ledger at the default {url} yet: pass --url (or set "
                "$DAYBOOK_URL) to use another, or write one first (daybook demo)"
            )
        if not existing:
            return  # the embedded default: its folder is made when the ledger opens
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise Unusable(
            f"the {role} URL {url!r}: the folder {str(folder)!r} {what}; create it or fix "
            "the path (daybook does not create folders for a path you give)"
        )
    if not path.exists():
        if existing:
            raise Unusable(f"the {role} URL {url!r}: {no_sqlite_file(path)}")
        return
    problem = sqlite_file_problem(path)
    if problem is not None:
        raise Unusable(f"the {role} URL {url!r}: {problem}")


def check_postgres(url: str, *, role: str = "event store") -> None:
    params = postgres_params(url)
    try:
        with psycopg.connect(params.conninfo(), connect_timeout=CONNECT_TIMEOUT):
            pass
    except psycopg.Error as error:
        message = f"the {role} at {where(url)}: {explain(error)}"
        raise Unusable(message, transient=curable_by_waiting(error)) from None


#: What a failed connection attempt says when the server is down, starting, stopping, full
#: or out of reach: libpq gives such failures no error code, only these words.
_WAIT_CURES = (
    "connection refused",
    "timeout expired",
    "timed out",
    "failed to resolve host",  # psycopg's own resolver, whatever the system's words
    "could not translate host name",  # libpq's
    "name or service not known",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "host is unreachable",
    "server closed the connection unexpectedly",
    "connection reset",
    "is the server running locally",  # no Unix socket: the server is not running (yet)
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "remaining connection slots are reserved",
    "could not fork new process for connection",
    "out of memory",
)

#: How psycopg reports a host name that resolved to several addresses, each tried in turn.
_SEVERAL_ATTEMPTS = "multiple connection attempts failed"


def curable_by_waiting(error: psycopg.Error) -> bool:
    """Whether a connection attempt that failed with ``error`` may succeed later by itself:
    the server is down, starting up, shutting down, full or out of reach. Stricter than what
    a running service retries (``transient.is_transient``): at start, a refusal of this
    client (no password given, TLS the server does not offer, a certificate, ident or a
    ``reject`` line) is a mistake in the settings, and waiting would only hide it."""
    if not is_transient(error):
        return False
    if error.sqlstate is not None:
        return True
    text = str(error).lower()
    if _SEVERAL_ATTEMPTS in text:
        # One refused address (``localhost``'s ::1, say) must not make a missing password
        # at the other look like an outage: every attempt must be one a wait cures.
        attempts = text.split(_SEVERAL_ATTEMPTS, 1)[1].split("\n- ")[1:]
        return bool(attempts) and all(_cured(attempt) for attempt in attempts)
    return _cured(text)


def _cured(text: str) -> bool:
    return any(words in text for words in _WAIT_CURES)


def explain(error: BaseException) -> str:
    """What a connection error means, in a few words and what to do about it."""
    text = str(error)
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused (is the server running, and on that port?)"
    if (
        "resolve host" in lowered
        or "name or service not known" in lowered
        or ("could not translate host name" in lowered)
    ):
        return "unknown host (check the host name)"
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return "authentication failed (check the user name and password)"
    if "does not exist" in lowered and "database" in lowered:
        return "the database does not exist (create it, or fix the name)"
    if "timeout" in lowered or "timed out" in lowered:
        return f"no answer within {CONNECT_TIMEOUT} s (is the host reachable?)"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first.removeprefix("connection failed: ")


def check_broker(url: str) -> None:
    """Refuse a Kafka URL when none of its bootstrap servers answers as a Kafka broker (a
    port that accepts connections is not enough: a broker starting up, or a proxy in front
    of one that is down, accepts them and then fails every client that starts).

    The refusal is transient (a service waits for the broker) unless every server answered
    with bytes that no Kafka broker sends: a URL naming some other server's port (the
    database's, or one whose server speaks first, as SSH does) will not become a broker by
    waiting. (A server that waits for more, as an HTTP server waits for a line, or hangs up
    without a word, cannot be told from a broker starting up: it is waited for.)"""
    from daybook.infrastructure.streaming.broker import bootstrap_servers

    malformed = Unusable(f"the broker URL {redacted(url)!r}: write kafka://host:port")
    if "@" in url.partition("://")[2]:
        # A user and password (daybook speaks to Kafka without SASL): refused as such, not
        # split at the wrong ':' and shown, a password's start taken for a host, as unknown.
        raise Unusable(
            f"the broker URL {redacted(url)!r}: daybook connects to Kafka without a user or"
            " password; write kafka://host:port"
        )
    try:
        servers = bootstrap_servers(url).split(",")
    except BadURL:  # another scheme: says so already
        raise
    except ValueError:  # urlsplit's "Invalid IPv6 URL", say
        raise malformed from None
    reasons = []
    strangers = 0
    for server in servers:
        host, _, port_text = server.rpartition(":")
        shown = server.rpartition("@")[2]  # never a user name and password
        # A port past 65535 is no port: the socket layer takes it modulo 65536.
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise malformed
        address = (host.strip("[]"), int(port_text))
        try:
            socket.create_connection(address, CONNECT_TIMEOUT).close()
            if _kafka_answers(shown):
                return
            stranger = _stranger_at(address)
            if stranger is None:
                reasons.append(
                    f"{shown}: accepts connections but gives no Kafka answer (starting up?)"
                )
            else:
                strangers += 1
                reasons.append(f"{shown}: answers, but not as a Kafka broker ({stranger})")
        except socket.gaierror:
            reasons.append(f"{shown}: unknown host")
        except ConnectionRefusedError:
            reasons.append(f"{shown}: connection refused")
        except OSError as error:
            reasons.append(f"{shown}: {error.strerror or 'no answer'}")
    if strangers == len(servers):
        raise Unusable(
            f"no Kafka broker at {redacted(url)!r} ({'; '.join(reasons)}): is that the "
            "broker's port? Pass --broker kafka://host:port naming the broker's listener"
        )
    raise Unusable(
        f"no Kafka broker answers ({'; '.join(reasons)}): start one, or pass "
        "--broker kafka://host:port",
        # An unknown host too: a name may be missing only until its server is deployed.
        transient=True,
    )


#: The probe ``_stranger_at`` sends: a Kafka ApiVersions request, version 0 (every broker
#: answers it, before any authentication, even one that no longer serves that version: it
#: then answers with an error, in version 0's form).
_PROBE_ID = 0x0DA1B00C
_PROBE = struct.pack(">hhih", 18, 0, _PROBE_ID, 7) + b"daybook"
_PROBE = struct.pack(">i", len(_PROBE)) + _PROBE
#: What some servers answer it with, to name them in the refusal.
_SIGNATURES = ((b"E", "a PostgreSQL server"),)


def _stranger_at(address: tuple[str, int]) -> str | None:
    """What answers at ``address`` when it answers a Kafka request with bytes no Kafka
    broker sends (a description for the refusal); None when it answers as Kafka, says
    nothing, or goes away without a word (as a broker starting up may)."""
    answer = b""
    deadline = time.monotonic() + CONNECT_TIMEOUT  # for the whole answer, however it comes
    try:
        with socket.create_connection(address, CONNECT_TIMEOUT) as connection:
            connection.sendall(_PROBE)
            while len(answer) < 8:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = connection.recv(8 - len(answer))
                if not chunk:
                    break
                answer += chunk
    except OSError:
        pass  # whatever came before the silence, a reset or a timeout is judged below
    if not answer:
        return None
    # A Kafka response: its size (at least a correlation id and an error code), then the
    # request's correlation id.
    if len(answer) == 8:
        size, correlation = struct.unpack(">iI", answer)
        if 6 <= size <= 1 << 24 and correlation == _PROBE_ID:
            return None
    for start, name in _SIGNATURES:
        if answer.startswith(start):
            return f"it answered like {name}"
    if answer.isascii() and answer.decode().isprintable():
        return f"it answered {answer.decode()!r}"
    return f"it answered {answer.hex(' ')}"


def _kafka_answers(server: str) -> bool:
    """Whether the broker at ``server`` answers a metadata request within the timeout."""
    import asyncio

    from aiokafka import AIOKafkaClient  # here: the CLI's other commands start faster without it
    from aiokafka.errors import KafkaError

    async def bootstrap() -> None:
        client = AIOKafkaClient(bootstrap_servers=server, request_timeout_ms=CONNECT_TIMEOUT * 1000)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await client.bootstrap()
        finally:
            await client.close()

    # A loop of its own, never made the thread's current one: ``asyncio.run`` would leave
    # none behind, and the faust worker that starts next asks for the current one.
    # aiokafka logs each refused connection as an ERROR; here the refusal is the answer,
    # and the caller says it in its own words.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(bootstrap())
        return True
    except (OSError, TimeoutError, KafkaError):
        return False
    finally:
        # Interrupted (Ctrl-C), the check leaves its tasks pending: end them here, or closing
        # the loop under them prints their complaints on the way out.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        client_log.setLevel(level)


def check_gateway(url: str | None) -> None:
    """That ``url`` is an http(s) URL of a server that answers (any HTTP answer will do)."""
    import httpx

    if url is None:
        raise Unusable(
            "no payment gateway: give --gateway http://host:port or $DAYBOOK_GATEWAY_URL"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- a port that is not a number, or past 65535: ValueError
        httpx.URL(url)  # what the gateway's client refuses (InvalidURL), refused here too
    except (ValueError, httpx.InvalidURL):
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unusable(f"the payment gateway URL {redacted(url)!r}: write http://host:port")
    try:
        httpx.get(url, timeout=CONNECT_TIMEOUT)
    except httpx.HTTPError as error:
        message = f"the payment gateway at {redacted(url)} did not answer: {error}"
        raise Unusable(message, transient=isinstance(error, httpx.TransportError)) from None
