"""``daybook serve``'s options and their defaults, apart from the application itself, so
that the command line reads its defaults from here without importing the web framework."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpOptions:
    """How the server admits and answers requests (``daybook serve`` options)."""

    #: Commands handed to the committer and not yet answered, at most (then 503).
    command_capacity: int = 2048
    #: Reads waiting for or holding a read-model connection, at most (then 503).
    read_capacity: int = 256
    #: Read-model connections.
    read_connections: int = 4
    #: Requests per second per token unless the token says otherwise (0: no limit).
    token_rate: float = 0.0
    #: How long a verified token is trusted before it is looked up again.
    token_cache_seconds: float = 5.0
    max_body_bytes: int = 1024 * 1024
    #: Longest wait for the next part of a request's body, in seconds (then 408): a client
    #: gone mid-upload without closing would otherwise hold its request, and a stop, for ever.
    #: The whole body may take this plus a second per ``app.BODY_MIN_RATE`` bytes received.
    body_timeout: float = 30.0
    #: Longest wait a read may ask for with min_position.
    max_read_wait: float = 10.0
    #: Origins allowed to call from a browser (empty: CORS off).
    cors_origins: tuple[str, ...] = ()
    #: A log line per request (with its request id and trace).
    access_log: bool = True
