"""Backends chosen by URL scheme: ``memory://``, ``sqlite:///path.db``, ``postgresql://...``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from psycopg.conninfo import make_conninfo

DEFAULT_URL = "sqlite:///.daybook/daybook.db"

_CODEC = {
    "MAPPER_TOPIC": "daybook.infrastructure.codec:ContractMapper",
    "TRANSCODER_TOPIC": "daybook.infrastructure.codec:OrjsonTranscoder",
}


class BadURL(ValueError):
    """A store URL daybook cannot use; the message says what would work."""


@dataclass(frozen=True)
class PostgresParams:
    dbname: str
    host: str
    port: int
    user: str
    password: str

    def conninfo(self) -> str:
        """A libpq connection string for psycopg (quotes and backslashes in a password
        escaped as libpq reads them)."""
        parts = {
            "dbname": self.dbname,
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "password": self.password,
        }
        return make_conninfo(**{k: v for k, v in parts.items() if v != ""})


def redacted(url: str) -> str:
    """``url`` with its password, if it has one, written ``***``: for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:  # a malformed host or port: keep only what surely holds no secret
        return f"{url.split('://', 1)[0]}://..."
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


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
    """Split a postgresql:// URL; ``?host=/socket/dir`` selects a Unix socket."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
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
    )


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel/path.db`` is relative to the working directory;
    ``sqlite:////abs/path.db`` is absolute."""
    path = url.split("://", 1)[1]
    if not path.startswith("/") or path == "/":
        raise BadURL(f"store URL {url!r}: write sqlite:///relative.db or sqlite:////abs.db")
    return Path(path[1:])


def sqlite_file(url: str) -> Path:
    """The path of a SQLite database daybook may open, creating it if need be: its folder
    must exist (only the embedded default's is made)."""
    path = sqlite_path(url)
    if url == DEFAULT_URL:
        path.parent.mkdir(parents=True, exist_ok=True)  # the embedded default needs no setup
    elif not path.parent.is_dir():
        # A path someone typed: a missing folder is more likely a typo than a wish for a new
        # tree of folders holding an empty database.
        raise BadURL(
            f"store URL {url!r}: the folder {str(path.parent)!r} does not exist; create it or "
            "fix the path"
        )
    return path


def event_store_env(url: str) -> dict[str, str]:
    """The eventsourcing environment for the event store at ``url``."""
    kind = scheme(url)
    if kind == "memory":
        return {"PERSISTENCE_MODULE": "daybook.infrastructure.eventstore.memory:Factory", **_CODEC}
    if kind == "sqlite":
        path = sqlite_file(url)
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
        "POSTGRES_CONNECT_TIMEOUT": "10",
        # Each insert waits for the events table lock; give up rather than hang forever.
        "POSTGRES_LOCK_TIMEOUT": "30",
        **_CODEC,
    }
