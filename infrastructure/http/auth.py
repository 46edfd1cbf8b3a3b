"""Who is calling: the bearer token of each request, its scope, and its rate.

A verified token is remembered for ``cache_seconds`` (the store is a database round trip),
so a revocation made by another process (``daybook tokens revoke``) takes effect within that
time; one made through this server's own store (``forget``) at once. Secrets are looked up
by their hash only, and never logged: not here, and not by uvicorn, whose access log has no
headers.

Anyone can send a made-up token, without credentials, and each unknown one is a lookup: so
lookups run one at a time in a thread of their own (the store's lookups share one
connection), never in the threads reads run in; only a few wait at once (requests with a
secret being looked up wait for that lookup), and past them a request is refused at once
(``503 overloaded``, with ``Retry-After``). Unknown secrets are
remembered too, apart from valid ones, each at most ``_CACHE_LIMIT`` (the least recently
used go first): made-up tokens never push a valid one out.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from daybook.infrastructure.http.admission import Door, RateLimits
from daybook.infrastructure.http.problems import Problem
from daybook.infrastructure.http.tokens import Token, TokenStore, digest

T = TypeVar("T")

#: Most valid tokens remembered at once; as many unknown (or revoked) secrets, apart.
_CACHE_LIMIT = 10_000
#: Lookups waiting for the token store at once (running or queued) at most.
LOOKUP_CAPACITY = 32


@dataclass
class Authenticator:
    tokens: TokenStore
    limits: RateLimits
    cache_seconds: float = 5.0
    clock: Callable[[], float] = time.monotonic
    #: Token lookups in progress, bounded (past it: 503 overloaded).
    lookups: Door = field(default_factory=lambda: Door("token lookup", LOOKUP_CAPACITY))
    _known: OrderedDict[str, tuple[Token, float]] = field(default_factory=OrderedDict)
    _unknown: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _pending: dict[str, asyncio.Future[Token | None]] = field(default_factory=dict)
    _thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="daybook-tokens")
    )

    async def identify(self, request: Request) -> Token:
        """The active token a request carries; 401 when there is none."""
        header = request.headers.get("authorization", "")
        kind, _, secret = header.partition(" ")
        secret = secret.strip()
        if kind.lower() != "bearer" or not secret:
            raise _unauthorized("send a bearer token: Authorization: Bearer <token>")
        key = digest(secret)
        now = self.clock()
        known = self._known.get(key)
        if known is not None and known[1] > now:
            self._known.move_to_end(key)
            token: Token | None = known[0]
        elif key in self._unknown and self._unknown[key] > now:
            self._unknown.move_to_end(key)
            token = None
        else:
            token = await self._look_up(key, secret)
            now = self.clock()
            self._known.pop(key, None)
            self._unknown.pop(key, None)
            if token is None:
                _remember(self._unknown, key, now + self.cache_seconds)
            else:
                _remember(self._known, key, (token, now + self.cache_seconds))
        if token is None:
            raise _unauthorized("the bearer token is unknown or revoked")
        return token

    async def _look_up(self, key: str, secret: str) -> Token | None:
        """``secret``'s token, from the store. Requests with a secret being looked up wait
        for that lookup rather than take another place: a burst of one client's requests,
        before its token is cached, is one lookup."""
        pending = self._pending.get(key)
        if pending is None:
            self.lookups.enter()  # full: 503 overloaded, rather than an ever longer queue
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._thread, self.tokens.verify, secret)
            self._pending[key] = pending

            def done(_: object) -> None:  # however its callers end (one may hang up)
                del self._pending[key]
                self.lookups.leave()

            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    def require(self, scope: str, *, limited: bool = True) -> Callable[[Request], Awaitable[Token]]:
        """A dependency: the caller's token, if it has ``scope``; with ``limited``, the
        request also counts against the token's rate."""

        async def caller(request: Request) -> Token:
            token = await self.identify(request)
            if not token.allows(scope):
                raise Problem(
                    "forbidden",
                    f"the token {token.name!r} has scopes {', '.join(sorted(token.scopes))}; "
                    f"this needs {scope!r}",
                )
            if limited:
                self.limits.take(token.name, token.rate)
            return token

        return caller

    def forget(self, name: str) -> None:
        """Drop what is remembered about the token called ``name`` (after a revocation)."""
        for key in [k for k, (token, _) in self._known.items() if token.name == name]:
            del self._known[key]

    def close(self) -> None:
        self._thread.shutdown(wait=False)


def _remember(cache: OrderedDict[str, T], key: str, value: T) -> None:
    """``key`` in ``cache``, as its most recently used; the least recently used leaves when
    it is full."""
    cache[key] = value
    while len(cache) > _CACHE_LIMIT:
        cache.popitem(last=False)


def _unauthorized(detail: str) -> Problem:
    return Problem("unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})
