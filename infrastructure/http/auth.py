"""Who is calling: the bearer token of each request, its scope, and its rate.

A verified token is remembered for ``cache_seconds`` (the store is a database round trip),
so a revocation made by another process (``daybook tokens revoke``) takes effect within that
time; one made through this server's own store (``forget``) at once. Secrets are looked up
by their hash only, and never logged: not here, and not by uvicorn, whose access log has no
headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from daybook.infrastructure.http.admission import RateLimits
from daybook.infrastructure.http.problems import Problem
from daybook.infrastructure.http.tokens import Token, TokenStore, digest

#: Most verified (or refused) secrets remembered at once.
_CACHE_LIMIT = 10_000


@dataclass
class Authenticator:
    tokens: TokenStore
    limits: RateLimits
    cache_seconds: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, tuple[Token | None, float]] = field(default_factory=dict)

    async def identify(self, request: Request) -> Token:
        """The active token a request carries; 401 when there is none."""
        header = request.headers.get("authorization", "")
        kind, _, secret = header.partition(" ")
        secret = secret.strip()
        if kind.lower() != "bearer" or not secret:
            raise _unauthorized("send a bearer token: Authorization: Bearer <token>")
        key = digest(secret)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            token = cached[0]
        else:
            token = await asyncio.to_thread(self.tokens.verify, secret)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = (token, now + self.cache_seconds)
        if token is None:
            raise _unauthorized("the bearer token is unknown or revoked")
        return token

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
        self._cache = {k: v for k, v in self._cache.items() if v[0] is None or v[0].name != name}


def _unauthorized(detail: str) -> Problem:
    return Problem("unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})
