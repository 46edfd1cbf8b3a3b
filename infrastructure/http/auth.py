"""Who is calling: the bearer token of each request, its scope, and its rate.

A verified token is remembered for ``cache_seconds`` (the store is a database round trip),
so a revocation made by another process (``daybook tokens revoke``) takes effect within that
time; one made through this server's own store (``forget``) at once. Secrets are looked up
by their hash only, and never logged: not here, and not by uvicorn, whose access log has no
headers.

Anyone can send a made-up token, without credentials, and each unknown one is a lookup: so
lookups run one at a time in a thread of their own (the store's lookups share one
connection), never in the threads reads run in. Requests with a secret being looked up wait
for that lookup. Lookups of secrets never seen valid are bounded (``LOOKUP_CAPACITY``), and
past them a request is refused at once (``503 overloaded``, with ``Retry-After``); a secret
seen valid before is never refused so: it is remembered past its expiry (at most
``_CACHE_LIMIT``, the least recently used leaving first), and checked again ahead of the
others, so made-up tokens neither push it out nor hold it back. A request waits for its
lookup at most ``LOOKUP_WAIT`` seconds (a store that does not answer: ``503 unavailable``;
``/health``, which anyone may ask, waits ``SHOWS_WAIT`` at most and then shows less).
Unknown secrets are remembered too, apart, as long as valid ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from daybook.infrastructure.http.admission import Door, RateLimits
from daybook.infrastructure.http.problems import Problem
from daybook.infrastructure.http.tokens import Token, TokenStore, digest
from daybook.infrastructure.transient import first_line, is_transient

T = TypeVar("T")

_log = logging.getLogger(__name__)

#: Most tokens seen valid remembered at once; as many unknown (or revoked) secrets, apart.
_CACHE_LIMIT = 10_000
#: Lookups of secrets never seen valid waiting at once (running or queued) at most: enough
#: for many clients starting together (each lookup is one indexed query), few enough that
#: made-up tokens cannot queue without end. Secrets seen valid are not counted.
LOOKUP_CAPACITY = 128
#: Longest a request waits for its token's lookup, in seconds: a store that does not answer
#: (a connection dropped without a word) must not hold every request with a token to look up.
LOOKUP_WAIT = 10.0
#: Longest ``/health`` waits for its caller's token (to show errors to an admin): a probe's
#: own timeout is often a few seconds, and a token store that hangs must not fail the probe.
SHOWS_WAIT = 1.0


@dataclass
class Authenticator:
    tokens: TokenStore
    limits: RateLimits
    cache_seconds: float = 5.0
    clock: Callable[[], float] = time.monotonic
    #: Lookups of secrets never seen valid in progress, bounded (past it: 503 overloaded).
    lookups: Door = field(default_factory=lambda: Door("token lookup", LOOKUP_CAPACITY))
    #: Secrets seen valid: the token, and until when it is trusted without a lookup. Kept
    #: past that (until pushed out), so its next lookup is a check again, never refused.
    _known: OrderedDict[str, tuple[Token, float]] = field(default_factory=OrderedDict)
    _unknown: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _pending: dict[str, asyncio.Future[Token | None]] = field(default_factory=dict)
    #: Lookups not begun: checks of secrets seen valid first, then the others.
    _checks: deque[tuple[str, str]] = field(default_factory=deque)
    _new: deque[tuple[str, str]] = field(default_factory=deque)
    _busy: bool = False
    #: ``forget`` calls so far: a lookup under way across one does not remember its answer.
    _forgets: int = 0
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
            token = await self._look_up(key, secret, seen=known is not None)
        if token is None:
            raise _unauthorized("the bearer token is unknown or revoked")
        return token

    async def _look_up(self, key: str, secret: str, *, seen: bool) -> Token | None:
        """``secret``'s token, from the store. Requests with a secret being looked up wait
        for that lookup rather than take another place: a burst of one client's requests,
        before its token is cached, is one lookup. A secret ``seen`` valid before takes no
        place, and is looked up before the others waiting."""
        pending = self._pending.get(key)
        if pending is None:
            if not seen:
                self.lookups.enter()  # full: 503 overloaded, rather than an ever longer queue
            pending = asyncio.get_running_loop().create_future()
            # Its outcome is read even when every request waiting for it has given up.
            pending.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._pending[key] = pending
            (self._checks if seen else self._new).append((key, secret))
            self._next()
        try:
            return await asyncio.wait_for(asyncio.shield(pending), LOOKUP_WAIT)
        except TimeoutError:
            raise Problem(
                "unavailable",
                f"the token store did not answer within {LOOKUP_WAIT:g}s; retry after "
                "Retry-After seconds",
                headers={"Retry-After": "1"},
            ) from None

    def _next(self) -> None:
        """Begin the next lookup waiting, if none is running."""
        if self._busy or not (self._checks or self._new):
            return
        seen = bool(self._checks)
        key, secret = (self._checks if seen else self._new).popleft()
        self._busy = True
        # Trusted from the moment of the look, not of its answer (which may come seconds
        # later): a revocation then takes effect within ``cache_seconds``, as promised.
        started, forgets = self.clock(), self._forgets
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._thread, self.tokens.verify, secret)

        def done(job: asyncio.Future[Token | None]) -> None:  # however its callers end
            self._busy = False
            pending = self._pending.pop(key)
            if not seen:
                self.lookups.leave()
            error = None if job.cancelled() else job.exception()
            if job.cancelled():
                pending.cancel()
            elif error is not None:
                pending.set_exception(error)
            else:
                if self._forgets == forgets:  # (else it may be what was just forgotten)
                    self._remember(key, job.result(), started)
                pending.set_result(job.result())
            self._next()

        job.add_done_callback(done)

    def _remember(self, key: str, token: Token | None, looked_at: float) -> None:
        """What a lookup made at ``looked_at`` found, trusted ``cache_seconds`` from then."""
        until = looked_at + self.cache_seconds
        self._known.pop(key, None)
        self._unknown.pop(key, None)
        if token is None:
            _remember(self._unknown, key, until)
        else:
            _remember(self._known, key, (token, until))

    async def shows(self, request: Request, scope: str) -> bool:
        """Whether a request to a route anyone may call carries an active token with
        ``scope``: never 401 or 403 (a load balancer's probe has no token), only less shown."""
        if "authorization" not in request.headers:
            return False
        try:
            # The lookup goes on if this gives up on it (its answer is remembered).
            async with asyncio.timeout(SHOWS_WAIT):
                token = await self.identify(request)
        except (Problem, TimeoutError):  # unknown, revoked, or the store slow or out
            return False
        except Exception as error:
            # The store failed otherwise (a role refused its table, say): said in the log,
            # and /health still answers the state of each part.
            if not is_transient(error):
                _log.warning("/health could not check its caller's token: %s", first_line(error))
            return False
        return token.allows(scope)

    def require(
        self, scope: str, *, limited: bool = True, exempt: bool = False
    ) -> Callable[[Request], Awaitable[Token]]:
        """A dependency: the caller's token, if it has ``scope``; with ``limited``, the
        request also counts against the token's rate (``exempt``: see ``RateLimits.take``)."""

        async def caller(request: Request) -> Token:
            token = await self.identify(request)
            if not token.allows(scope):
                raise Problem(
                    "forbidden",
                    f"the token {token.name!r} has scopes {', '.join(sorted(token.scopes))}; "
                    f"this needs {scope!r}",
                )
            if limited:
                self.limits.take(token.name, token.rate, exempt=exempt)
            return token

        return caller

    def forget(self, name: str) -> None:
        """Drop what is remembered about the token called ``name`` (after a revocation),
        and what lookups under way find: they may have read it before the revocation."""
        self._forgets += 1
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
