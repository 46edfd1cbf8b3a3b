"""Reads over HTTP, from the read models: each answer says which log position it reflects.

Consistency tokens: a write answers its log position (``position``, and the header
``Daybook-Position``); a read given ``min_position`` (query parameter, or the header
``Daybook-Min-Position``) waits until the read model has reached it, at most ``timeout``
seconds (by default 2, or the server's longest wait if that is shorter), and otherwise
answers ``503 stale_read`` with ``Retry-After``. Every
answer carries ``as_of_position`` and ``lag_events`` (also as headers
``Daybook-As-Of-Position`` and ``Daybook-Lag-Events``).
Lists are paginated by an opaque cursor; ``/v1/balances/snapshot`` reads many balances at
one position.

Queries run in the read pool's own threads, on its few read-model connections, each read
in its turn (a read whose position is not known to be reached within its own timeout, else
``503 stale_read``; any other within the server's longest wait, else ``503 overloaded``),
behind the read door (bounded admission); a read waiting for a position holds neither
while it waits: one watcher per read model looks at its position for all such reads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

import orjson
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import Response

from daybook.domain.errors import DomainError, InvalidRequest
from daybook.domain.values import MAX_BIGINT, check_sku, check_uuid, shown
from daybook.infrastructure.http.admission import Door
from daybook.infrastructure.http.auth import Authenticator
from daybook.infrastructure.http.problems import Problem
from daybook.infrastructure.http.tokens import Token
from daybook.infrastructure.readmodels import ReadModels, StaleRead
from daybook.infrastructure.transient import is_transient

T = TypeVar("T")

#: Numbers in a query, in ASCII digits only: ``int()`` and ``float()`` would also read
#: "1_000", " 3" and other scripts' digits.
_WHOLE = re.compile(r"-?[0-9]{1,20}")
_SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{0,10})?|\.[0-9]{1,10}")

#: Most rows one page or one snapshot by ids may ask for.
MAX_PAGE = 1000
MAX_IDS = 1000
#: Rows in a page of balances and of a statement, and days of activity, when not asked.
_BALANCES_PAGE = 100
_STATEMENT_PAGE = 50
_DAYS_SHOWN = 30
#: Most days of activity a read may ask for.
_MAX_DAYS = 366


class NoConnection(Exception):
    """No read-model connection came free before a read's deadline."""


class _Watcher:
    """The position one projection's serving version has reached, as last seen, for the reads
    waiting for a position: one look at it for all of them, every ``_WATCH_EVERY`` seconds
    while any waits, rather than each read looking on its own."""

    def __init__(self) -> None:
        #: The position last seen (None: not looked at yet), and whether a version serves.
        self.position: int | None = None
        self.built = False
        #: Whether any version of it was ever registered (see ``StaleRead.started``).
        self.started = True
        #: The last look's failure (an outage, say); None once a look succeeds.
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None
        #: Set, and replaced, each time a look has been made: wakes the waiting reads.
        self.looked = asyncio.Event()
        #: Reads waiting; a read looking for itself while no look is under way (``probing``).
        self.waiting = 0
        self.probing = False
        self.task: asyncio.Task[None] | None = None

    @property
    def current(self) -> bool:
        """Whether what it knows is being kept up to date (a look under way or to come)."""
        return self.probing or self.task is not None

    def reached(self, wanted: int | None) -> bool:
        return self.built and (wanted is None or (self.position or 0) >= wanted)

    def saw(
        self, position: int, *, built: bool, started: bool = True, forward: bool = False
    ) -> None:
        """A look's answer. ``forward``: a read's answer, from a snapshot that may have been
        taken before the watcher's last look, so it only moves the position on (a look that
        finds it short may move it back: a read-model database failed over to a replica
        further behind, say)."""
        if forward and self.built and position < (self.position or 0):
            return
        # Waiters are woken only by news: a look every 20 ms that woke every one of
        # hundreds of waiting reads kept the event loop busy for nothing.
        news = (position, built) != (self.position, self.built) or self.error is not None
        self.position, self.built, self.error = position, built, None
        self.started = started or built
        if news:
            self._wake()

    def failed(self, error: Exception) -> None:
        # Waiters are woken by a failure no retry cures (they end at once), or by the first
        # of an outage, not by every look that fails during it.
        news = self.error is None or not is_transient(error)
        self.error = error
        self.traceback = error.__traceback__
        if news:
            self._wake()

    def stale_read(self, projection: str, wanted: int | None, timeout: float) -> StaleRead:
        """A read's ``stale_read`` at the position last seen."""
        reached = self.position or 0
        return StaleRead(
            projection, wanted or 0, reached, timeout, built=self.built, started=self.started
        )

    def failure(self) -> Exception | None:
        """The last look's failure, to raise in a waiting read: with the traceback of the
        look (raised as it is in each of many reads, it would gather each one's frames)."""
        error = self.error
        return None if error is None else error.with_traceback(self.traceback)

    def _wake(self) -> None:
        self.looked.set()
        self.looked = asyncio.Event()


class ReadPool:
    """A few read-model connections (``ReadModels`` each hold one), lent one per query, each
    query run in one of the pool's own threads (one per connection): not in the default
    thread pool, where other work (token lookups, the dashboard) would queue ahead of it."""

    def __init__(self, views: list[ReadModels]) -> None:
        self._all = views
        self._free: asyncio.Queue[ReadModels] | None = None
        self._threads = ThreadPoolExecutor(len(views), thread_name_prefix="daybook-read")
        self._watchers: dict[str, _Watcher] = {}

    async def run(self, query: Callable[[ReadModels], T], *, deadline: float | None = None) -> T:
        """``query`` on a free connection, in its turn; with ``deadline`` (the loop's clock),
        past it without a free connection ``NoConnection`` is raised instead."""
        if self._free is None:  # made on the serving loop
            self._free = asyncio.Queue()
            for views in self._all:
                self._free.put_nowait(views)
        loop = asyncio.get_running_loop()
        try:
            views = self._free.get_nowait()
        except asyncio.QueueEmpty:
            if deadline is None:
                views = await self._free.get()
            else:
                try:
                    views = await asyncio.wait_for(self._free.get(), deadline - loop.time())
                except TimeoutError:
                    raise NoConnection from None
        try:
            return await loop.run_in_executor(self._threads, query, views)
        finally:
            self._free.put_nowait(views)

    async def read(
        self,
        query: Callable[[ReadModels, dict[str, Any]], T],
        wait: dict[str, Any],
        *,
        projection: str,
        turn: float,
    ) -> T:
        """``query`` (of ``projection``'s read model) given ``wait`` (its ``min_position``
        and ``timeout``), answered once the read model has reached the position (or, without
        one, has been built), within ``timeout``; its turn for a connection, within ``turn``
        seconds of its start (past it: ``NoConnection``).

        A read waiting for a position holds no connection and no thread while it waits: a
        read that slept on its connection (the read models' own wait) kept every other read
        waiting behind it. Nor does it look for itself: one watcher per projection looks at
        its position for every read waiting (each polling on its own cost the database a
        query every few milliseconds per read), and a read queries only once its position
        is reached, or for itself when no watcher is keeping up (the first read of a burst:
        usually its position is reached at once). An outage is waited out, with backoff,
        within the same ``timeout``."""
        loop = asyncio.get_running_loop()
        timeout: float = wait["timeout"]
        started = loop.time()
        deadline = started + timeout
        turn_deadline = started + max(turn, timeout)
        wanted: int | None = wait.get("min_position")
        look = {**wait, "timeout": 0}
        watcher = self._watchers.setdefault(projection, _Watcher())
        # Others wait for this projection: their watcher tells when this read's turn comes.
        waits = wanted is not None and watcher.current and not watcher.reached(wanted)
        failures = 0
        while True:
            if waits:
                await self._wait_for(projection, watcher, wanted, deadline)
                if timeout and watcher.position is not None and not watcher.reached(wanted):
                    # It waited its whole timeout: what the watcher saw last answers, not a
                    # query from each of the reads timing out together. (One that asked for
                    # no wait looks once for itself instead.) An outage the watcher met is
                    # told as the position last seen; a failure no retry cures, as itself.
                    failure = watcher.failure()
                    if failure is not None and not is_transient(failure):
                        raise failure
                    raise watcher.stale_read(projection, wanted, timeout)
            probing = not watcher.current
            watcher.probing = watcher.probing or probing
            # Its turn for a connection: a read whose position is not known to be reached
            # waits for one within its own timeout (then ``stale_read``, at the position
            # last seen); one that asks for none, or whose position is reached, within
            # ``turn`` (then ``overloaded``).
            reached = wanted is None or watcher.reached(wanted)
            try:
                answer = await self.run(
                    lambda views: query(views, look),
                    deadline=turn_deadline if reached else deadline,
                )
            except StaleRead as error:
                # As fresh as any look: it may move the position back (a read-model database
                # failed over to a replica further behind, say), as the watcher's looks do.
                watcher.saw(error.reached, built=error.built, started=error.started)
                if loop.time() >= deadline:
                    raise _stale(error, timeout) from None
                waits = True
                continue
            except NoConnection:
                if reached:
                    raise
                if watcher.reached(wanted) and loop.time() < turn_deadline:
                    continue  # reached meanwhile: it waits its turn as such a read does
                raise watcher.stale_read(projection, wanted, timeout) from None
            except Exception as error:
                # The look has reconnected a few times already (the read models do).
                failures += 1
                if not is_transient(error) or loop.time() >= deadline:
                    raise
                pause = random.uniform(0.5, 1.0) * min(1.0, 0.05 * 2 ** min(failures, 5))
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                continue
            finally:
                if probing:
                    watcher.probing = False
            position = getattr(answer, "as_of_position", None)
            if isinstance(position, int):
                watcher.saw(position, built=True, forward=True)
            return answer

    async def _wait_for(
        self, projection: str, watcher: _Watcher, wanted: int | None, deadline: float
    ) -> None:
        """Until ``watcher`` has seen ``wanted`` reached, or ``deadline``, or a failure no
        retry cures (raised at once: a read model changed under the reads, say)."""
        watcher.waiting += 1
        try:
            if watcher.task is None:
                # A failure a watch that has ended met says nothing of the read models now
                # (a deploy since over, say): the new watch's first look tells.
                watcher.error = watcher.traceback = None
                watcher.task = asyncio.create_task(self._watch(projection, watcher))
            async with asyncio.timeout_at(deadline):
                while not watcher.reached(wanted):
                    failure = watcher.failure()
                    if failure is not None and not is_transient(failure):
                        raise failure
                    await watcher.looked.wait()
        except TimeoutError:
            return
        finally:
            watcher.waiting -= 1

    async def _watch(self, projection: str, watcher: _Watcher) -> None:
        """Look at ``projection``'s position, at once and then every ``_WATCH_EVERY`` seconds,
        while a read waits for it: each look one short query, in its turn for a connection."""
        try:
            while True:
                try:
                    position = await self.run(lambda views: views.position(projection))
                    watcher.saw(position, built=True)
                except StaleRead as error:  # no version serves yet
                    watcher.saw(error.reached, built=error.built, started=error.started)
                except Exception as error:  # told to the reads waiting, at their deadline
                    watcher.failed(error)
                if not watcher.waiting:
                    return
                await asyncio.sleep(_WATCH_EVERY)
        finally:
            watcher.task = None

    def any(self) -> ReadModels:
        """One connection for a query run outside the pool's turns (each ``ReadModels`` is
        thread-safe: it serialises its own queries)."""
        return self._all[0]

    def close(self) -> None:
        for watcher in self._watchers.values():
            if watcher.task is not None:
                watcher.task.cancel()
        self._threads.shutdown(wait=False)
        for views in self._all:
            views.close()


#: Seconds between a watcher's looks at its projection's position.
_WATCH_EVERY = 0.02


def _stale(error: StaleRead, timeout: float) -> StaleRead:
    """``error`` (of a look, which does not wait) as the read's: within its ``timeout``."""
    return StaleRead(
        error.projection,
        error.wanted,
        error.reached,
        timeout,
        built=error.built,
        started=error.started,
    )


#: The read models the routes read (as ``ReadModels`` names them).
_BALANCES = "account_balances"
_LEVELS = "inventory_levels"
_STATEMENT = "account_statement"
_ACTIVITY = "daily_activity"

#: The ``timeout`` of a read that sends none, in seconds (``ReadRoutes.max_wait`` if shorter).
DEFAULT_WAIT = 2.0


@dataclass
class ReadRoutes:
    pool: ReadPool
    auth: Authenticator
    door: Door
    #: Longest ``timeout`` a read may ask for, in seconds.
    max_wait: float = 10.0

    def install(self, app: FastAPI) -> None:
        """Add the read routes to ``app`` (on the app itself, as the command routes)."""
        reader = Depends(self.auth.require("read"))
        # The query is read by hand (below), so FastAPI declares none of it: each route's
        # parameters are written into its OpenAPI operation here, for /docs and generated
        # clients (documentation only: parsing and checks stay as they are).
        wait = _wait_parameters(self.max_wait)

        @app.get(
            "/v1/accounts/{account_id}/balance",
            tags=["reads"],
            summary="An account's balance",
            openapi_extra={"parameters": wait},
        )
        async def balance(account_id: str, request: Request, _: Token = reader) -> Response:
            key = _uuid(account_id, "account_id")
            wait = self._wait(request)
            # One read: a 404 names the position of the snapshot the account was not in.
            answer = await self._read(lambda v, w: v.find_balance(key, **w), wait, _BALANCES)
            found = answer.value
            if found is None:
                raise _absent(f"no account {key} in the read model", answer)
            return _answer(_plain(found), found)

        @app.get(
            "/v1/balances/snapshot",
            tags=["reads"],
            summary="Many balances (all, up to 1,000 accounts, or those listed in ids) read at "
            "one log position",
            openapi_extra={"parameters": [_IDS, *wait]},
        )
        async def snapshot(request: Request, _: Token = reader) -> Response:
            ids = _ids(request)
            wait = self._wait(request)
            try:
                found = await self._read(
                    lambda v, w: v.balances(ids, at_most=MAX_IDS, **w), wait, _BALANCES
                )
            except InvalidRequest as error:
                raise Problem(
                    "invalid_parameter",
                    f"{error} (list them in ids=; GET /v1/balances pages through them)",
                ) from None
            body = {
                "balances": [_plain(b, skip_position=True) for b in found.balances],
                "missing": [str(m) for m in found.missing],
                "totals": found.totals,
            }
            return _answer(body, found)

        @app.get(
            "/v1/balances",
            tags=["reads"],
            summary="Balances in account id order, paginated by cursor",
            openapi_extra={"parameters": [_limit(_BALANCES_PAGE), _CURSOR, *wait]},
        )
        async def balances(request: Request, _: Token = reader) -> Response:
            limit = _number(request, "limit", _BALANCES_PAGE, 1, MAX_PAGE)
            after = _cursor(request, "after", _account_id)
            wait = self._wait(request)
            page = await self._read(
                lambda v, w: v.balance_page(after=after, limit=limit, **w), wait, _BALANCES
            )
            body = {
                "balances": [_plain(b, skip_position=True) for b in page.balances],
                "next_cursor": _encode({"after": page.next_after}) if page.next_after else None,
            }
            return _answer(body, page)

        # ``path``: a SKU may hold "/" (sent as is or percent-encoded: either way the path is
        # decoded before it is matched).
        @app.get(
            "/v1/stock/{sku:path}",
            tags=["reads"],
            summary="A SKU's stock levels",
            openapi_extra={"parameters": wait},
        )
        async def stock(sku: str, request: Request, _: Token = reader) -> Response:
            try:
                checked = check_sku(sku)
            except DomainError as error:
                raise Problem.of(error) from None
            wait = self._wait(request)
            answer = await self._read(lambda v, w: v.find_stock(checked, **w), wait, _LEVELS)
            found = answer.value
            if found is None:
                raise _absent(f"no stock of {checked} in the read model", answer)
            return _answer(_plain(found), found)

        @app.get(
            "/v1/accounts/{account_id}/statement",
            tags=["reads"],
            summary="An account's statement, newest first, paginated by cursor",
            openapi_extra={"parameters": [_limit(_STATEMENT_PAGE), _CURSOR, *wait]},
        )
        async def statement(account_id: str, request: Request, _: Token = reader) -> Response:
            key = _uuid(account_id, "account_id")
            limit = _number(request, "limit", _STATEMENT_PAGE, 1, MAX_PAGE)
            before = _cursor(request, "before", _entry_number, account=str(key))
            wait = self._wait(request)
            before_seq = None if before is None else _whole(before, "the cursor", 1, None)
            answer = await self._read(
                lambda v, w: v.find_statement(key, limit=limit, before_seq=before_seq, **w),
                wait,
                _STATEMENT,
            )
            found = answer.value
            if found is None:
                raise _absent(f"no account {key} in the read model", answer)
            entries = [asdict(e) for e in found.entries]
            more = found.older
            body = {
                "account_id": str(key),
                "entries": entries,
                # The account in it too: entry numbers are the account's own, so another
                # account's cursor would start its statement in the middle.
                "next_cursor": (
                    _encode({"account": str(key), "before": entries[-1]["seq"]}) if more else None
                ),
            }
            return _answer(body, found)

        @app.get(
            "/v1/activity",
            tags=["reads"],
            summary="Per-day activity (UTC), oldest first",
            openapi_extra={"parameters": [_DAYS, *wait]},
        )
        async def activity(request: Request, _: Token = reader) -> Response:
            days = _number(request, "days", _DAYS_SHOWN, 1, _MAX_DAYS)
            wait = self._wait(request)
            found = await self._read(lambda v, w: v.daily_activity(days=days, **w), wait, _ACTIVITY)
            body = {"days": [asdict(d) for d in found.days]}
            return _answer(body, found)

    async def _read(
        self,
        query: Callable[[ReadModels, dict[str, Any]], T],
        wait: dict[str, Any],
        projection: str,
    ) -> T:
        """``query`` (of ``projection``) at ``wait``'s ``min_position``, within its
        ``timeout`` (``_wait``); its turn for a connection within ``max_wait``."""
        with _entered(self.door):
            try:
                return await self.pool.read(query, wait, projection=projection, turn=self.max_wait)
            except StaleRead as error:
                raise _stale_read(error) from None
            except NoConnection:
                raise Problem(
                    "overloaded",
                    f"no read-model connection came free within {self.max_wait:g}s (each "
                    "was busy with another read); retry after Retry-After seconds",
                    headers={"Retry-After": "1"},
                ) from None

    def _wait(self, request: Request) -> dict[str, Any]:
        """``min_position`` and ``timeout`` of a read, from its query or headers. Without a
        ``min_position`` a read still waits (up to ``timeout``) for a read model that has
        not been built yet, as just after the server started."""
        timeout = _param(request, "timeout")
        if timeout is None:  # the default, within a server's longest wait when that is shorter
            seconds = min(DEFAULT_WAIT, self.max_wait)
        else:
            seconds = float(timeout) if _SECONDS.fullmatch(timeout) else -1.0
        if not 0 <= seconds <= self.max_wait:
            raise Problem(
                "invalid_parameter",
                f"timeout is seconds between 0 and {self.max_wait:g}, got {shown(timeout)}",
            )
        text = _param(request, "min_position")
        header = _header(request, "Daybook-Min-Position")
        # (An empty ?min_position= is refused by ``_whole``, not passed over.)
        asked = {
            _whole(given, "min_position", 0, None) for given in (text, header) if given is not None
        }
        if not asked:
            return {"timeout": seconds}
        if len(asked) > 1:
            # Two positions for one setting: neither may silently win (a query's 0 read at
            # once, without waiting for the write the header names). One position written
            # two ways (01 and 1) is one.
            raise Problem(
                "invalid_parameter",
                f"min_position is {shown(text)} and Daybook-Min-Position is {shown(header)}; "
                "give one of them",
            )
        return {"min_position": asked.pop(), "timeout": seconds}


def _stale_read(error: StaleRead) -> Problem:
    return Problem(
        "stale_read",
        str(error),
        headers={"Retry-After": "1"},
        details={"wanted": error.wanted, "reached": error.reached},
    )


@contextmanager
def _entered(door: Door) -> Iterator[None]:
    door.enter()
    try:
        yield
    finally:
        door.leave()


def _answer(body: dict[str, Any], answer: Any) -> Response:
    """``body`` with what ``answer`` (any query's answer) reflects: its log position, the
    head's lead, and whether events after the position may be partly included."""
    body["as_of_position"] = answer.as_of_position
    body["lag_events"] = answer.lag_events
    body["includes_later"] = answer.includes_later
    headers = _position_headers(answer)
    return Response(_json(body), media_type="application/json", headers=headers)


def _position_headers(answer: Any) -> dict[str, str]:
    """The headers every read's answer carries (a 404 too): its log position, and the
    head's lead when known."""
    headers = {"Daybook-As-Of-Position": str(answer.as_of_position)}
    if answer.lag_events is not None:
        headers["Daybook-Lag-Events"] = str(answer.lag_events)
    return headers


def _json(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, default=str)
    except TypeError:
        # orjson stops at 64 bits, and a day's total may pass them (``numeric`` columns):
        # the standard library writes any integer exactly (only such answers take it).
        return json.dumps(body, default=str, separators=(",", ":"), ensure_ascii=False).encode()


def _plain(value: Any, *, skip_position: bool = False) -> dict[str, Any]:
    data = {k: str(v) if isinstance(v, UUID) else v for k, v in asdict(value).items()}
    if skip_position:
        data.pop("as_of_position", None)
        data.pop("lag_events", None)
    return data


def _absent(what: str, answer: Any) -> Problem:
    """A read's 404, with the position headers every read's answer carries."""
    position: int = answer.as_of_position
    return Problem(
        "not_found",
        f"{what} as of log position {position}; if it was written just now, read with "
        "min_position set to the write's position",
        headers=_position_headers(answer),
        # As every answer says: a stream group's version may hold some later events.
        details={"as_of_position": position, "includes_later": answer.includes_later},
    )


def _uuid(text: str, what: str) -> UUID:
    try:
        return check_uuid(text, what)
    except DomainError as error:
        raise Problem.of(error) from None


def _ids(request: Request) -> list[UUID] | None:
    values = request.query_params.getlist("ids")
    if not values:
        return None
    ids = [part for value in values for part in value.split(",") if part]
    if len(ids) > MAX_IDS:
        raise Problem("invalid_parameter", f"ask for at most {MAX_IDS} ids at a time")
    try:
        return [check_uuid(text, "ids") for text in ids]
    except DomainError as error:
        # A bad value of a query parameter, as a bad count of ids is (and every other
        # parameter's): 400 invalid_parameter, not a command's 422 invalid_request.
        raise Problem("invalid_parameter", str(error)) from None


def _param(request: Request, name: str) -> str | None:
    """The query's ``name`` (None without it). Given twice it is refused: the last one
    silently won, and ``?min_position=90&min_position=1`` read at 1."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise Problem("invalid_parameter", f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _header(request: Request, name: str) -> str | None:
    """The request's header ``name`` (None without it). Given on two lines it is refused, as
    a query parameter given twice is: the first line silently won (a proxy's own line, or
    the client's, depending on the order they came in)."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise Problem("invalid_parameter", f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _whole(text: str, name: str, minimum: int, maximum: int | None) -> int:
    value = int(text) if _WHOLE.fullmatch(text) else minimum - 1
    top = MAX_BIGINT if maximum is None else maximum
    if not minimum <= value <= top:
        bound = f"{minimum} .. {maximum}" if maximum is not None else f"at least {minimum}"
        raise Problem("invalid_parameter", f"{name} is a whole number, {bound}; got {shown(text)}")
    return value


def _number(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    text = _param(request, name)
    return default if text is None else _whole(text, name, minimum, maximum)


def _encode(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(state)).decode().rstrip("=")


def _cursor(
    request: Request, field: str, read: Callable[[str | int], str] = str, **scope: str
) -> str | None:
    """The ``field`` of the request's cursor (None without one), as ``read`` makes it: a
    cursor it refuses was not handed out by this endpoint, whatever else it holds; nor was
    one whose ``scope`` (the account a statement's cursor pages, say) is not the request's."""
    text = _param(request, "cursor")
    if text is None:
        return None
    try:
        state = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        value = state[field]
        if any(state.get(name) != wanted for name, wanted in scope.items()):
            raise ValueError(state)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(value)
        return read(value)
    except Exception:  # any decoding failure means the same thing to the caller
        raise Problem("invalid_cursor", "the cursor is not one this endpoint handed out") from None


def _entry_number(value: str | int) -> str:
    """A statement cursor's entry number: a whole number from 1, as handed out (one past
    ``2**63 - 1`` is left to the caller's check, which refuses it as ``invalid_parameter``
    like any position that large)."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return str(value)


def _account_id(value: str | int) -> str:
    """An account id as the read models compare it (a balances cursor holds one)."""
    return str(check_uuid(value, "the cursor"))


# -- the read routes' parameters, as the OpenAPI document declares them ----------------------


def _parameter(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": False,
        "schema": schema,
        "description": description,
    }


def _wait_parameters(max_wait: float) -> list[dict[str, Any]]:
    """``min_position``, its header, and ``timeout`` (``ReadRoutes._wait``)."""
    position = {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT}
    return [
        _parameter(
            "min_position",
            "query",
            position,
            "Read your writes: wait until the read model has reached this log position (a "
            "write's `position`), at most `timeout` seconds; else 503 stale_read.",
        ),
        _parameter(
            "timeout",
            "query",
            {
                "type": "number",
                "minimum": 0,
                "maximum": max_wait,
                "default": min(DEFAULT_WAIT, max_wait),
            },
            "Seconds to wait for `min_position` (or for a read model not built yet).",
        ),
        _parameter(
            "Daybook-Min-Position",
            "header",
            position,
            "`min_position` as a header, for a read without the query parameter (which "
            "wins); on one line only (two are refused).",
        ),
    ]


def _limit(default: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": default}
    return _parameter("limit", "query", schema, "Most rows in the page.")


_CURSOR = _parameter(
    "cursor",
    "query",
    {"type": "string"},
    "The previous page's `next_cursor`: the next page (without one, the first).",
)
_IDS = {
    **_parameter(
        "ids",
        "query",
        {"type": "array", "items": {"type": "string"}},
        f"Account ids, comma-separated or the parameter repeated, at most {MAX_IDS} in all "
        f"(without any, every balance, while there are at most {MAX_IDS} accounts: past "
        "that, 400 invalid_parameter).",
    ),
    "style": "form",
    "explode": True,
}
_DAYS = _parameter(
    "days",
    "query",
    {"type": "integer", "minimum": 1, "maximum": _MAX_DAYS, "default": _DAYS_SHOWN},
    "How many days, up to today (UTC).",
)
