"""httpx's and httpcore's internals that daybook relies on (written against httpx 0.28-0.29,
httpcore 1.0).

httpx's timeouts bound each connect, read and write of a call, never the call: a server (or
a proxy) sending its status line and headers a byte at a time, each byte within the read
timeout, holds the call for as long as it goes on. The payment gateway adapter must end a
call by a deadline (a saga's drive cannot end while its call is out), and httpx gives no
handle on the socket before the headers are in. So the transport's connection pool gets a
network backend of daybook's (``with_deadlines``): every connect, read and write of a call
made inside ``deadline(seconds)`` waits at most what is left of it, and past it raises the
timeout httpx would (a connect's: the request never left; a read's: sent, perhaps
processed). The backend is a public httpcore interface; the pool's attribute holding it,
and httpx's transport attribute holding the pool, are not.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

from daybook.infrastructure.compat import Internal

#: When the call under way must end (``time.monotonic``), if it must.
_until: ContextVar[float | None] = ContextVar("daybook_http_call_until", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Calls made in this block, through a transport ``with_deadlines``, end within
    ``seconds`` of its start, however their server sends."""
    token = _until.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _until.reset(token)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    until = _until.get()
    if until is None:
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise expired("the call's deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(
            ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)
        )
        return _Stream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _Stream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options
        )
        return _Stream(stream)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def with_deadlines(transport: httpx.HTTPTransport) -> httpx.HTTPTransport:
    """``transport``, its connections made and used under ``deadline``. A transport whose
    pool no longer keeps its backend where this looks is returned as it is (per-read
    timeouts only): ``tests/unit/test_compat.py`` fails on such a version first."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.NetworkBackend) and not isinstance(backend, _Backend):
        pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    return transport


#: Every httpx and httpcore name daybook uses beyond their documented interfaces.
RELIED_ON: tuple[Internal, ...] = (
    Internal(
        "httpx",
        "httpx:HTTPTransport",
        "_pool",
        with_deadlines,
        "the transport's httpcore connection pool",
        on_instance=True,
        types=(httpcore.ConnectionPool,),
        used_in="httpx._transports.default",
    ),
    Internal(
        "httpcore",
        "httpcore:ConnectionPool",
        "_network_backend",
        with_deadlines,
        "the pool's network backend, which every connection it makes is opened through",
        on_instance=True,
        types=(httpcore.NetworkBackend,),
        used_in="httpcore._sync.connection_pool",
    ),
)
