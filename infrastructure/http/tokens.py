"""Bearer tokens for the HTTP API: named, scoped, stored hashed, revocable.

A token is 32 random bytes (``secrets``), shown once when created and never stored: the
table keeps its SHA-256. A slow password hash would add nothing here, since the secret is
random rather than chosen by a person, and it would cost every request; a lookup by hash also
needs no constant-time comparison, as timing reveals nothing about a secret whose hash is
the key. The name is who the token speaks for: it is recorded as the actor of every command
sent with it, so names are never reused, not even after a revocation.

Scopes: ``read`` (queries), ``write`` (commands), ``admin`` (everything, and server status).
Tokens live in the event store's database (table ``daybook_tokens``), or in memory for a
``memory://`` ledger.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from daybook.infrastructure.eventstore.identity import CREATE_TABLES_LOCK
from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.transient import may_only_read
from daybook.infrastructure.urls import DEFAULT_URL, postgres_params, scheme, sqlite_path

SCOPES = ("read", "write", "admin")
PREFIX = "dbk_"
TABLE = "daybook_tokens"
#: Longest one lookup waits for PostgreSQL's answer on the kept connection, in seconds; then
#: the connection is cut and the lookup made once more on a new one. A flow a middlebox
#: dropped without a word can look alive to TCP (a proxy that acknowledges and forwards
#: nothing): neither keepalives nor ``tcp_user_timeout`` would notice.
LOOKUP_SECONDS = 5.0
#: A kept lookup connection unused for longer is replaced before a lookup rather than used:
#: NATs and load balancers forget idle flows silently, and a lookup on one waits for TCP to
#: give up (``tcp_user_timeout``) before it is made again.
IDLE_SECONDS = 60.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class TokenError(ValueError):
    """A token operation that cannot be done (a taken name, an unknown scope...)."""


@dataclass(frozen=True)
class Token:
    """A token's record (never its secret)."""

    name: str
    scopes: frozenset[str]
    created_at: str
    revoked_at: str | None = None
    #: Requests per second this token may send (None: the server's default).
    rate: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, scope: str) -> bool:
        return self.active and (scope in self.scopes or "admin" in self.scopes)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TokenError(
            f"a token name is 1-64 letters, digits and . _ @ - (starting with a letter or "
            f"digit), got {name!r}"
        )
    return name


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(scopes)
    unknown = chosen - set(SCOPES)
    if unknown or not chosen:
        raise TokenError(f"scopes are {', '.join(SCOPES)}; got {', '.join(sorted(chosen))}")
    return chosen


class TokenStore(Protocol):
    def create(
        self, name: str, scopes: Iterable[str], *, rate: float | None = None
    ) -> tuple[Token, str]:
        """A new token: its record and its secret (shown once, stored only hashed)."""
        ...

    def verify(self, secret: str) -> Token | None:
        """The active token whose secret this is, or None."""
        ...

    def list(self) -> list[Token]: ...

    def revoke(self, name: str) -> Token:
        """Revoke the token called ``name`` (at once, for every later request)."""
        ...

    def close(self) -> None: ...


def _new(name: str, scopes: Iterable[str], rate: float | None) -> tuple[Token, str, str]:
    if rate is not None and not rate > 0:
        raise TokenError(f"a rate is a number of requests per second above 0, got {rate}")
    token = Token(check_name(name), check_scopes(scopes), _now(), None, rate)
    secret = PREFIX + secrets.token_urlsafe(32)
    return token, secret, digest(secret)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class MemoryTokens:
    """Tokens of a ``memory://`` ledger: they live as long as the process."""

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[Token, str]] = {}
        self._lock = threading.Lock()

    def create(
        self, name: str, scopes: Iterable[str], *, rate: float | None = None
    ) -> tuple[Token, str]:
        token, secret, hashed = _new(name, scopes, rate)
        with self._lock:
            if name in self._by_name:
                raise TokenError(_taken(name))
            self._by_name[name] = (token, hashed)
        return token, secret

    def verify(self, secret: str) -> Token | None:
        hashed = digest(secret)
        with self._lock:
            for token, known in self._by_name.values():
                if known == hashed:
                    return token if token.active else None
        return None

    def list(self) -> list[Token]:
        with self._lock:
            return sorted((t for t, _ in self._by_name.values()), key=lambda t: t.name)

    def revoke(self, name: str) -> Token:
        with self._lock:
            found = self._by_name.get(name)
            if found is None:
                raise TokenError(_unknown(name))
            token = found[0] if found[0].revoked_at else replace(found[0], revoked_at=_now())
            self._by_name[name] = (token, found[1])
            return token

    def close(self) -> None:
        pass


def _missing(conn: Any) -> bool:
    """Whether the tokens table is not (yet) in the PostgreSQL database of ``conn``."""
    row = conn.execute(f"SELECT {IN_OWN_SCHEMA}", (TABLE,)).fetchone()
    return row is None or row[0] is None


class SqlTokens:
    """Tokens in a table of the event store's database (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self._kind = scheme(url)
        self._url = url
        self._lock = threading.Lock()
        #: The connection lookups share (opened at the first, under the lock).
        self._reader: Any = None
        self._used = 0.0  # when it last answered (time.monotonic)
        if url == DEFAULT_URL:  # tokens may come before the first ledger, as in the README
            sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connection() as conn:
                if self._kind != "sqlite" and _missing(conn):
                    # Servers and `tokens create` started together on a fresh database:
                    # PostgreSQL does not serialise concurrent CREATE TABLE IF NOT EXISTS
                    # of one table (a unique violation in its catalog), so take turns, as
                    # the event store's tables do (held to the end of this transaction).
                    # Only then: a server opening a store that has its table queues behind
                    # nobody's migration.
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_TABLES_LOCK,))
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {TABLE} (name TEXT PRIMARY KEY, "
                    "token_hash TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL, "
                    "created_at TEXT NOT NULL, revoked_at TEXT, rate DOUBLE PRECISION)"
                )
        except psycopg.Error as error:
            # A role that may only read (or a replica): listing needs no table made; a
            # write through this store then says it was refused.
            if not may_only_read(error):
                raise

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection for one operation but a lookup, committed at its end (creating,
        listing and revoking tokens are rare)."""
        with self._lock:
            if self._kind == "sqlite":
                conn = sqlite3.connect(sqlite_path(self._url), timeout=30)
                try:
                    with conn:
                        yield _Sqlite(conn)
                finally:
                    conn.close()
            else:
                conninfo = postgres_params(self._url).conninfo()
                with psycopg.connect(conninfo) as pg:
                    yield pg

    def create(
        self, name: str, scopes: Iterable[str], *, rate: float | None = None
    ) -> tuple[Token, str]:
        token, secret, hashed = _new(name, scopes, rate)
        with self._connection() as conn:
            taken = conn.execute(f"SELECT 1 FROM {TABLE} WHERE name = %s", (name,)).fetchone()
            if taken:
                raise TokenError(_taken(name))
            conn.execute(
                f"INSERT INTO {TABLE} (name, token_hash, scopes, created_at, revoked_at, rate) "
                "VALUES (%s, %s, %s, %s, NULL, %s)",
                (name, hashed, " ".join(sorted(token.scopes)), token.created_at, rate),
            )
        return token, secret

    def verify(self, secret: str) -> Token | None:
        """One connection serves every lookup: a server looks up each token it has not
        cached, made-up ones included, and a connection per lookup cost the database a
        connection for every such request. It is in autocommit, so each lookup sees what
        is committed (a revocation by another process); a lookup that finds it broken (a
        PostgreSQL server restarted since, or one with no answer within ``LOOKUP_SECONDS``,
        which is then cut) is tried once more on a new one, and one idle longer than
        ``IDLE_SECONDS`` is replaced first."""
        query = (
            f"SELECT name, scopes, created_at, revoked_at, rate FROM {TABLE} WHERE token_hash = %s",
            (digest(secret),),
        )
        with self._lock:
            if self._reader is not None and time.monotonic() - self._used > IDLE_SECONDS:
                self._drop_reader()
            try:
                row = self._looked_up(*query)
            except psycopg.OperationalError:
                self._drop_reader()
                row = self._looked_up(*query)
            self._used = time.monotonic()
        token = None if row is None else _token(row)
        return token if token is not None and token.active else None

    def _looked_up(self, sql: str, params: tuple[Any, ...]) -> Any:
        if self._reader is None:
            if self._kind == "sqlite":
                conn = sqlite3.connect(
                    sqlite_path(self._url),
                    timeout=30,
                    isolation_level=None,
                    check_same_thread=False,  # lookups run in a thread the lock admits
                )
                self._reader = _Sqlite(conn)
            else:
                # With keepalives, tcp_user_timeout and connect_timeout (conninfo's).
                conninfo = postgres_params(self._url).conninfo()
                self._reader = psycopg.connect(conninfo, autocommit=True)
        if isinstance(self._reader, _Sqlite):
            return self._reader.execute(sql, params).fetchone()
        watchdog = threading.Timer(LOOKUP_SECONDS, _cut, (self._reader.fileno(),))
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._reader.execute(sql, params).fetchone()
        finally:
            watchdog.cancel()

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            # A connection already broken has nothing left to release.
            with suppress(sqlite3.Error, psycopg.Error):
                reader.close()

    def list(self) -> list[Token]:
        try:
            with self._connection() as conn:
                rows = conn.execute(
                    f"SELECT name, scopes, created_at, revoked_at, rate FROM {TABLE} ORDER BY name"
                ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []  # never made: a role that may only read met no token table yet
        return [_token(row) for row in rows]

    def revoke(self, name: str) -> Token:
        with self._connection() as conn:
            conn.execute(
                f"UPDATE {TABLE} SET revoked_at = %s WHERE name = %s AND revoked_at IS NULL",
                (_now(), name),
            )
            row = conn.execute(
                f"SELECT name, scopes, created_at, revoked_at, rate FROM {TABLE} WHERE name = %s",
                (name,),
            ).fetchone()
        if row is None:
            raise TokenError(_unknown(name))
        return _token(row)

    def close(self) -> None:
        with self._lock:
            self._drop_reader()


def _cut(fd: int) -> None:
    """Shut the socket ``fd`` down (the lookup waiting on it fails at once, as on a
    connection the server closed): from another thread, unlike closing the connection."""
    with suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class _Sqlite:
    """sqlite3 with psycopg's placeholders, so one set of statements serves both."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql.replace("%s", "?"), params)

    def close(self) -> None:
        self._conn.close()


def _token(row: tuple[Any, ...]) -> Token:
    name, scopes, created_at, revoked_at, rate = row
    return Token(name, frozenset(scopes.split()), created_at, revoked_at, rate)


def _taken(name: str) -> str:
    return (
        f"a token called {name!r} exists or existed (names are actors in the log and are "
        "never reused): choose another name"
    )


def _unknown(name: str) -> str:
    return f"no token is called {name!r} (daybook tokens list shows them)"


def open_tokens(url: str) -> TokenStore:
    """The token store of the ledger at ``url``."""
    if scheme(url) == "memory":
        return MemoryTokens()
    return SqlTokens(url)
