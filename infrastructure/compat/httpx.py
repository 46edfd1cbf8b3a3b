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

import ipaddress
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
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


#: Name look-ups run here, so a call can stop waiting for one (getaddrinfo has no timeout).
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="daybook-resolve")


def _addresses(host: str, port: int, within: float | None) -> list[str]:
    """``host``'s addresses (itself, if it is one), looked up within ``within`` seconds."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        found = lookup.result(timeout=within)
    except FuturesTimeout:
        raise httpcore.ConnectTimeout(f"looking up {host} took past the call's deadline") from None
    except OSError as error:
        raise httpcore.ConnectError(f"looking up {host}: {error}") from error
    return list(dict.fromkeys(str(info[4][0]) for info in found))


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
        if _until.get() is None:
            return self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        # The backend's connect resolves the name without a limit, then tries each address
        # with the whole timeout: the name is resolved here within what is left, and each
        # address gets what is left when its turn comes.
        failed: Exception | None = None
        for address in _addresses(host, port, _left(timeout, httpcore.ConnectTimeout)):
            try:
                stream = self._backend.connect_tcp(
                    address,
                    port,
                    _left(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failed = error
                continue
            return _Stream(stream)
        raise failed or httpcore.ConnectError(f"{host} resolves to no address")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options
        )
        return _Stream(stream)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def deadline_client(**options: Any) -> httpx.Client:
    """``httpx.Client(**options)`` whose every transport (its own, and those it mounts for
    the environment's proxies: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``) makes calls
    under ``deadline``. (A transport passed in would make httpx ignore those proxies.)"""
    client = httpx.Client(**options)
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        if isinstance(transport, httpx.HTTPTransport):
            with_deadlines(transport)
    return client


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
        "httpx:Client",
        "_transport",
        deadline_client,
        "the client's transport for URLs no mount matches",
        on_instance=True,
        types=(httpx.BaseTransport,),
        used_in="httpx._client",
    ),
    Internal(
        "httpx",
        "httpx:Client",
        "_mounts",
        deadline_client,
        "the client's transports by URL pattern (the environment's proxies among them)",
        on_instance=True,
        types=(dict,),
        used_in="httpx._client",
    ),
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
