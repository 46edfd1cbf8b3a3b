"""Checks a command makes before it builds anything: is this store one it can use, does it
answer, and is it what it claims to be.

Without them, a mistyped URL surfaced as whatever the first library call raised: a
``FileExistsError`` for a SQLite path under a file, ``sqlite3.DatabaseError`` for a file that
is not a database, an event store created where none was meant to be, or a PostgreSQL
connection pool that took its full 10 s to report that nothing listens on the port. Here each
ends as ``Unusable`` with one sentence naming the URL's place (never its password) and what
to do, within a short connect timeout.
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from daybook.infrastructure.urls import (
    DEFAULT_URL,
    BadURL,
    postgres_params,
    redacted,
    scheme,
    sqlite_path,
)

#: Seconds a check waits for a server (libpq's own minimum is 2).
CONNECT_TIMEOUT = 3

_SQLITE_MAGIC = b"SQLite format 3\x00"

#: Why ``memory://`` cannot serve a command that runs in a process of its own.
MEMORY_IS_PRIVATE = (
    "memory:// lives inside one process, and this command would see an empty ledger of its own"
)


class Unusable(BadURL):
    """A store or broker a command cannot use; the message says why and what would work."""


def where(url: str) -> str:
    """The URL without its password, for messages."""
    kind = scheme(url)
    if kind != "postgresql":
        return url
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
            raise Unusable(
                f"the {role} URL {url!r}: there is no database at {str(path)!r}; check the "
                "path (a ledger creates it when it first opens)"
            )
        return
    if path.is_dir():
        raise Unusable(f"the {role} URL {url!r} names a folder, not a database file")
    try:
        with path.open("rb") as file:
            head = file.read(len(_SQLITE_MAGIC))
    except OSError as error:
        raise Unusable(
            f"the {role} URL {url!r}: cannot read {str(path)!r}: {error.strerror}"
        ) from None
    if head and head != _SQLITE_MAGIC:
        raise Unusable(
            f"the {role} URL {url!r}: {str(path)!r} is not a SQLite database; check the path"
        )


def check_postgres(url: str, *, role: str = "event store") -> None:
    params = postgres_params(url)
    try:
        psycopg.connect(params.conninfo(), connect_timeout=CONNECT_TIMEOUT).close()
    except psycopg.Error as error:
        raise Unusable(f"the {role} at {where(url)}: {explain(error)}") from None


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
    """Refuse a Kafka URL when none of its bootstrap servers accepts a connection."""
    from daybook.infrastructure.streaming.broker import bootstrap_servers

    servers = bootstrap_servers(url).split(",")
    reasons = []
    for server in servers:
        host, _, port_text = server.rpartition(":")
        shown = server.rpartition("@")[2]  # never a user name and password
        if not host or not port_text.isdigit():
            raise Unusable(f"the broker URL {redacted(url)!r}: write kafka://host:port")
        try:
            socket.create_connection((host.strip("[]"), int(port_text)), CONNECT_TIMEOUT).close()
            return
        except socket.gaierror:
            reasons.append(f"{shown}: unknown host")
        except ConnectionRefusedError:
            reasons.append(f"{shown}: connection refused")
        except OSError as error:
            reasons.append(f"{shown}: {error.strerror or 'no answer'}")
    raise Unusable(
        f"no Kafka broker answers ({'; '.join(reasons)}): start one, or pass "
        "--broker kafka://host:port"
    )


def check_gateway(url: str | None) -> None:
    """That ``url`` is an http(s) URL of a server that answers (any HTTP answer will do)."""
    import httpx

    if url is None:
        raise Unusable(
            "no payment gateway: give --gateway http://host:port or $DAYBOOK_GATEWAY_URL"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unusable(f"the payment gateway URL {redacted(url)!r}: write http://host:port")
    try:
        httpx.get(url, timeout=CONNECT_TIMEOUT)
    except httpx.HTTPError as error:
        raise Unusable(f"the payment gateway at {redacted(url)} did not answer: {error}") from None
