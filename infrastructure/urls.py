"""Backends chosen by URL scheme: ``memory://``, ``sqlite:///path.db``, ``postgresql://...``."""

from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo

DEFAULT_URL = "sqlite:///.daybook/daybook.db"

_CODEC = {
    "MAPPER_TOPIC": "daybook.infrastructure.codec:ContractMapper",
    "TRANSCODER_TOPIC": "daybook.infrastructure.codec:OrjsonTranscoder",
}


class BadURL(ValueError):
    """A store URL daybook cannot use; the message says what would work."""

    code = "bad_url"


#: libpq's TCP settings on every PostgreSQL connection daybook opens (a URL's query may set
#: each otherwise, ``?tcp_user_timeout=10000``). Without them, a server that goes silent
#: without closing anything (a network partition, a host that dies, a failover that moves
#: its address) holds the thread using a connection: for about 15 minutes while the kernel
#: retransmits what it sent, and for over two hours while it waits for an answer it has been
#: promised (a query the server acknowledged, a LISTEN session: libpq's keepalives with the
#: kernel's defaults). With them the connection fails within about 30 seconds (keepalive
#: probes after 10 idle seconds; the user timeout ends it once what was sent, probes
#: included, has gone unacknowledged for 30), and the service's outage handling reconnects
#: as after any lost connection. A slow query is not cut short: a live server's kernel
#: acknowledges while it works.
TCP_LIVENESS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    # A new connection to a silent host: given up after 10 s, not the kernel's ~2 minutes.
    "connect_timeout": "10",
}

#: Set on each session daybook keeps open (``keep_server_probing``): the server's own
#: keepalive probes, 10 idle seconds and then 3 probes 5 s apart. ``TCP_LIVENESS`` lets
#: daybook notice a server that has gone; this lets the server notice a daybook host that
#: has gone (a partition, a host that died), which tells it nothing. Until the server ends
#: such a session, what it holds stays held: a runner's or a relay's advisory lock (a
#: standby on another host waits), the events table's lock of a commit under way (every
#: writer waits), a LISTEN (the notification queue is held back); with the kernel's
#: defaults, about two hours and a quarter. Probes go only over an idle connection, and a
#: live host's kernel answers them however busy the process. Set by statement, not as a
#: startup option: a pooler in between (PgBouncer) refuses those. (Ignored by the server
#: over a Unix socket, where nothing can vanish this way.)
SERVER_LIVENESS = (
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
)


def keep_server_probing(conn: Any) -> None:
    """``SERVER_LIVENESS`` on ``conn`` (a psycopg connection, autocommit or about to begin
    its first transaction: a session setting outlives it)."""
    conn.execute(SERVER_LIVENESS)


#: Settings libpq reads as whole numbers, and those that take one of a few words: libpq
#: checks their values only when it connects, where a bad one would look like an outage.
_WHOLE_NUMBERS = frozenset(TCP_LIVENESS)

#: The largest whole number libpq takes: it reads these settings as C ints, and refuses a
#: larger one only when it connects (and psycopg's pool waits ``connect_timeout`` seconds
#: for a connection, which Python cannot wait beyond about 292 years).
_INT_MAX = 2**31 - 1

#: The smallest value of each whole-number setting (0 otherwise: libpq's "the system's
#: default" for the TCP settings, and "off" for keepalives).
_LEAST = {"connect_timeout": 2}
_WORDS = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
}  # fmt: skip

#: The URL's own parts: a query naming them again is refused rather than silently ignored.
_URL_PARTS = frozenset({"dbname", "user", "password"})

#: Query settings whose values are secrets (hidden by ``redacted``).
_SECRETS = frozenset({"password", "sslpassword"})

#: A secret setting in a libpq connection string (``password='a b'`` or ``password=x``).
_CONNINFO_SECRET = re.compile(
    r"(?P<name>\b(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S+)", re.I
)


@dataclass(frozen=True)
class PostgresParams:
    dbname: str
    host: str
    port: int
    user: str
    password: str
    #: Further libpq settings from the URL's query (``sslmode``, ``tcp_user_timeout``...).
    options: tuple[tuple[str, str], ...] = ()

    def settings(self) -> dict[str, str]:
        """libpq settings beyond where and who: ``TCP_LIVENESS``, then the URL's."""
        return {**TCP_LIVENESS, **dict(self.options)}

    def conninfo(self) -> str:
        """A libpq connection string for psycopg (quotes and backslashes in a password
        escaped as libpq reads them)."""
        parts = {
            "dbname": self.dbname,
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "password": self.password,
            **self.settings(),
        }
        return make_conninfo(**{k: v for k, v in parts.items() if v != ""})


def redacted(url: str) -> str:
    """``url`` with its passwords, if it has any (``user:password@``, ``?password=``,
    ``?sslpassword=``), written ``***``: for messages and logs."""
    head, sep, _ = url.partition("://")
    if not sep:
        # Not a URL (a libpq connection string, say): its ``password=`` values hidden.
        return _CONNINFO_SECRET.sub(r"\g<name>***", url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a malformed host or port: keep only what surely holds no secret
        return f"{head}://..."
    if unreadable_userinfo(url):
        # A password written unencoded ('/', '?', '#' or '@' in it) runs past what urlsplit
        # took for the host: which part is a secret cannot be told (a query's value may
        # hold an '@' too), so nothing past the scheme is shown.
        return f"{head}://..."
    secret = _secret_in(parts.query)
    if password is None and not secret:
        return url  # nothing to hide (urlunsplit would rewrite it: sqlite://// as sqlite://)
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hostport}")
    if secret:
        shown, hiding = [], False
        for name, eq, value in (pair.partition("=") for pair in parts.query.split("&")):
            if eq:
                hiding = unquote(name) in _SECRETS
            # An item with no '=' after a secret's is its tail (an unencoded '&' in it).
            shown.append((f"{name}=***" if eq else "***") if hiding else name + eq + value)
        parts = parts._replace(
            query="&".join(shown),
            # A '#' written unencoded in a query's password starts a fragment: its tail.
            fragment="***" if parts.fragment else "",
        )
    return urlunsplit(parts)


def _secret_in(query: str) -> bool:
    return any(
        unquote(name) in _SECRETS and eq
        for name, eq, _ in (pair.partition("=") for pair in query.split("&"))
    )


def unreadable_userinfo(url: str) -> bool:
    """Whether an '@' past what urlsplit takes for the host may end a user and password
    written unencoded (a ':' before it): ``user:p/w@host``, ``user:12?x@host``, ``user:p@ss/
    w@host``. (An '@' in a SQLite path, with no ':' before it, is a path's.)"""
    rest = url.partition("://")[2]
    try:
        beyond = rest[len(urlsplit(url).netloc) :]
    except ValueError:
        return True
    return "@" in beyond and ":" in rest.rpartition("@")[0]


def scheme(url: str) -> str:
    """``memory``, ``sqlite`` or ``postgresql``."""
    if not isinstance(url, str):
        raise BadURL(f"a store URL is text such as sqlite:///path/to/file.db, got {url!r}")
    try:
        name = urlsplit(url).scheme
    except ValueError as error:  # a malformed host, such as an unclosed [IPv6 address
        raise BadURL(f"store URL {redacted(url)!r}: {error}") from None
    if name == "postgres":
        return "postgresql"
    if name not in ("memory", "sqlite", "postgresql"):
        raise BadURL(
            f"unsupported store URL {redacted(url)!r}: use memory://, sqlite:///path/to/file.db "
            "or postgresql://user:password@host:port/dbname"
        )
    return name


def postgres_params(url: str) -> PostgresParams:
    """Split a postgresql:// URL; ``?host=/socket/dir`` selects a Unix socket, and other
    query parameters are libpq's (``?sslmode=verify-full``): their names checked by libpq,
    the values of the common ones here (libpq would check those only when connecting)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise BadURL(f"store URL {redacted(url)!r} names no database: add /dbname at the end")
    try:
        port = int(query.get("port", [5432 if parts.port is None else parts.port])[0])
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise BadURL(f"store URL {redacted(url)!r}: the port must be a number from 1 to 65535")
    return PostgresParams(
        dbname=dbname,
        host=host,
        port=port,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password or ""),
        options=_options(url, query),
    )


def _options(url: str, query: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """The query's libpq settings, each given once and known to libpq."""
    options = {k: v for k, v in query.items() if k not in ("host", "port")}
    for name, values in options.items():
        if name in _URL_PARTS:
            raise BadURL(
                f"store URL {redacted(url)!r}: give {name} in the URL itself"
                f" (postgresql://user:password@host:port/dbname), not as ?{name}="
            )
        if name == "service":
            # daybook gives every connection the URL's host, port and user (localhost, 5432
            # and postgres when it names none), which win over a service file's: the service
            # would be named and not used.
            raise BadURL(
                f"store URL {redacted(url)!r}: ?service= is not read (the URL's host, port "
                "and user would win over the service file's); give them in the URL "
                "(postgresql://user:password@host:port/dbname)"
            )
        if len(values) != 1:
            raise BadURL(f"store URL {redacted(url)!r}: ?{name}= is given {len(values)} times")
    chosen = {name: values[0] for name, values in options.items()}
    for name, value in chosen.items():
        if value == "":
            raise BadURL(f"store URL {redacted(url)!r}: ?{name}= is given no value")
        if name in _WHOLE_NUMBERS:
            _whole_number(url, name, value)
        if name in _WORDS and value not in _WORDS[name]:
            raise BadURL(
                f"store URL {redacted(url)!r}: ?{name}= takes one of"
                f" {', '.join(_WORDS[name])}; got {value!r}"
            )
    try:
        make_conninfo(**chosen)
    except psycopg.ProgrammingError as error:  # libpq's words: 'invalid connection option "x"'
        raise BadURL(f"store URL {redacted(url)!r}: {error}") from None
    return tuple(sorted(chosen.items()))


def _whole_number(url: str, name: str, value: str) -> None:
    """Refuse ``value`` unless it is a whole number libpq takes for ``name``."""
    least = _LEAST.get(name, 0)
    if value.isascii() and value.isdigit() and least <= int(value) <= _INT_MAX:
        return
    if name == "connect_timeout" and value.isascii() and value.isdigit() and int(value) < 2:
        raise BadURL(
            f"store URL {redacted(url)!r}: ?connect_timeout= takes 2 seconds or more (libpq"
            " waits for ever with 0, and 2 s with 1)"
        )
    raise BadURL(
        f"store URL {redacted(url)!r}: ?{name}= takes a whole number from {least} to"
        f" {_INT_MAX}, got {value!r}"
    )


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel/path.db`` is relative to the working directory (made absolute
    here); ``sqlite:////abs/path.db`` is absolute."""
    path = url.split("://", 1)[1]
    if not path.startswith("/") or path == "/":
        raise BadURL(f"store URL {url!r}: write sqlite:///relative.db or sqlite:////abs.db")
    if ":memory:" in path or "mode=memory" in path:
        # SQLite keeps ``:memory:`` in memory, and eventsourcing takes any name holding
        # either for a database in memory (no WAL, one connection at a time): a ledger that
        # seemed to write to a file would keep nothing, or share its file unsafely.
        raise BadURL(
            f"store URL {url!r}: a SQLite path holding ':memory:' or 'mode=memory' would not "
            "be a file daybook can share; use memory:// for a ledger in memory, or rename "
            "the file"
        )
    # Absolute: SQLite takes a name starting with ``file:`` for a URI (eventsourcing opens
    # with uri=True, and this build of SQLite does so for every connection), which is
    # another file, or none; and a pool's later connections would follow the working
    # directory if it changed.
    return Path(path[1:]).absolute()


def sqlite_file(url: str, *, existing: bool = False) -> Path:
    """The path of a SQLite database daybook may open, creating it if need be: its folder
    must exist (only the embedded default's is made). ``existing``: for a reader, which must
    find the database there: an empty one made at a mistyped path would answer, for ever,
    that nothing was written yet."""
    path = sqlite_path(url)
    if existing and not path.exists():
        raise BadURL(f"store URL {url!r}: {no_sqlite_file(path)}")
    if url == DEFAULT_URL:
        path.parent.mkdir(parents=True, exist_ok=True)  # the embedded default needs no setup
    elif not path.parent.is_dir():
        # A path someone typed: a missing folder is more likely a typo than a wish for a new
        # tree of folders holding an empty database.
        raise BadURL(
            f"store URL {url!r}: the folder {str(path.parent)!r} does not exist; create it or "
            "fix the path"
        )
    problem = sqlite_file_problem(path)
    if problem is not None:
        raise BadURL(f"store URL {url!r}: {problem}")
    return path


def no_sqlite_file(path: Path) -> str:
    """What a reader is told of a SQLite ``path`` with no database there."""
    return (
        f"there is no database at {str(path)!r}; check the path (a ledger, or the "
        "projection runner for read models, creates it when it first opens)"
    )


def sqlite_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a SQLite database (a folder, a file that cannot be
    read, or one that is not SQLite), or None: a SQLite file, an empty one (a new database to
    SQLite), or none yet.

    The file is read through SQLite (a read-only connection), never with ``open``: closing
    any descriptor of a file drops every POSIX lock the process holds on it, those of its
    SQLite connections included (a ledger this process opened before its read models), and
    another process's connection closing then takes the file for unused and deletes the WAL
    under them: their commits no other process sees, and the file is corrupted. SQLite's
    own descriptors are kept open while the process holds locks on the file. (A look at a
    WAL file closed cleanly may leave its empty ``-wal`` and ``-shm`` beside it, as any
    SQLite reader does.)"""
    if path.is_dir():
        return f"{str(path)!r} is a folder, not a database file"
    if not path.exists():
        return None
    if not os.access(path, os.R_OK):
        return f"cannot read {str(path)!r}: Permission denied"
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        # No busy timeout: a file another connection holds locked is SQLite, in use.
        with closing(sqlite3.connect(uri, uri=True, timeout=0)) as conn:
            conn.execute("PRAGMA schema_version").fetchall()
    except sqlite3.DatabaseError as error:
        code = getattr(error, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_NOTADB:
            return f"{str(path)!r} is not a SQLite database; check the path"
        # Locked, or a WAL file whose shared memory this read-only look may not make (a
        # folder the user may not write): SQLite read its header, and knows it.
        if code is not None and (code & 0xFF) in _IN_USE:  # the primary code
            return None
        return f"cannot read {str(path)!r}: {error}"
    return None


#: SQLite's primary result codes that say a file is a database this look cannot read now.
_IN_USE = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY})


#: The event store environment's libpq settings (a connection string of settings only).
SETTINGS_KEY = "DAYBOOK_POSTGRES_SETTINGS"


#: In an event store environment: every connection may only read (see ``read_only_env``).
READ_ONLY_KEY = "DAYBOOK_READ_ONLY"


def read_only_env(url: str) -> dict[str, str]:
    """``event_store_env(url)`` for a look that must change nothing: no table is created or
    migrated, and the connections cannot write (a SQLite file is opened query-only, never
    created, its journal mode left as it is; PostgreSQL sessions' transactions are read-only).
    """
    return {**event_store_env(url), "CREATE_TABLE": "no", READ_ONLY_KEY: "yes"}


def event_store_env(url: str, *, existing: bool = False) -> dict[str, str]:
    """The eventsourcing environment for the event store at ``url`` (``existing``: a
    reader's, for a database that must be there already; see ``sqlite_file``)."""
    kind = scheme(url)
    if kind == "memory":
        return {"PERSISTENCE_MODULE": "daybook.infrastructure.eventstore.memory:Factory", **_CODEC}
    if kind == "sqlite":
        path = sqlite_file(url, existing=existing)
        return {
            "PERSISTENCE_MODULE": "daybook.infrastructure.eventstore.sqlite:Factory",
            "SQLITE_DBNAME": str(path),
            "SQLITE_LOCK_TIMEOUT": "30",
            **_CODEC,
        }
    params = postgres_params(url)
    return {
        "PERSISTENCE_MODULE": "daybook.infrastructure.eventstore.postgres:Factory",
        "POSTGRES_DBNAME": params.dbname,
        "POSTGRES_HOST": params.host,
        "POSTGRES_PORT": str(params.port),
        "POSTGRES_USER": params.user,
        "POSTGRES_PASSWORD": params.password,
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "16",
        # How long a caller waits for a connection from the pool (eventsourcing's use of
        # it): as long as a new connection may take.
        "POSTGRES_CONNECT_TIMEOUT": params.settings()["connect_timeout"],
        # Read by daybook's factory: libpq settings for every connection of the pool.
        SETTINGS_KEY: make_conninfo(**params.settings()),
        # Each insert waits for the events table lock; give up rather than hang forever.
        "POSTGRES_LOCK_TIMEOUT": "30",
        **_CODEC,
    }
