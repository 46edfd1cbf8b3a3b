"""Queries on read models, each answer saying which log position it reflects.

Every answer is read in one snapshot together with the checkpoint of the version that serves
reads. ``as_of_position`` is the largest position such that the answer contains every event up
to it. For a version the in-process runner owns, it contains none after; for one a stream
group owns, events after it may be partly included (a partition ahead of another), and the
answer says so (``includes_later``). ``lag_events`` is how many log positions the head is
ahead (``None`` when the event log is not reachable from here). ``min_position`` waits for
read-your-writes.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

from daybook.domain.errors import InvalidRequest, reserve_codes
from daybook.domain.values import MAX_BIGINT, check_sku, check_uuid, inventory_id
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import ReadStore, ReadStoreError
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import cancelled, is_transient
from daybook.projections import ALL
from daybook.projections.accounts import BALANCES, STATEMENT, STATEMENT_HEADS
from daybook.projections.activity import MONEY, STOCK
from daybook.projections.inventory import LEVELS
from daybook.projections.model import Key, Projection, Row, Table

T = TypeVar("T")

#: The version of each of daybook's projections that this code's queries read.
_CODE_VERSIONS = {projection.name: projection.version for projection in ALL}

#: The most rows one page of balances or statement entries may ask for.
MAX_PAGE = 10_000
#: The most days of activity one answer may cover (about ten years).
MAX_DAYS = 3_660


class StaleRead(Exception):
    """A read could not reach the log position asked for within the timeout."""

    code: ClassVar[str] = "stale_read"

    def __init__(
        self,
        projection: str,
        wanted: int,
        reached: int,
        timeout: float,
        *,
        built: bool = True,
        started: bool = True,
    ) -> None:
        if built:
            text = f"read model {projection} reached log position {reached}, not {wanted}, "
        elif started:
            text = f"read model {projection} is still being built (no version serves yet), "
        else:
            text = f"read model {projection} has not been built (nothing has begun building it) "
        super().__init__(f"{text}within {timeout}s; retry later or raise the timeout")
        self.projection = projection
        self.wanted = wanted
        self.reached = reached
        self.built = built
        #: Whether any version of it was ever registered (a build begun, if none serves).
        self.started = started or built


class ReadModelChanged(ReadStoreError):
    """The serving version of a read model has tables this process's code cannot read (a
    column it reads was renamed or removed, or is one the serving version does not have
    yet): the process runs the code of another version than the one serving reads."""

    code: ClassVar[str] = "read_model_changed"

    def __init__(self, projection: str, version: int, error: BaseException) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(
            f"read model {projection} is served by its version {version}, whose tables this"
            f" process's code cannot read ({reason}): run this process with the code that"
            f" defines version {version} (another process with it can answer meanwhile)"
        )
        self.projection = projection
        self.version = version


# Neither is a refusal: no refusal class may take their codes (see ``reserve_codes``).
reserve_codes((StaleRead.code, ReadModelChanged.code), "the read models")


@dataclass(frozen=True)
class Balance:
    account_id: UUID
    owner: str
    currency: str
    balance: int
    held: int
    available: int
    overdraft_limit: int
    status: str
    version: int
    last_event_at: str
    as_of_position: int
    lag_events: int | None
    #: Events after ``as_of_position`` may be partly included (a stream-owned version).
    includes_later: bool = False


@dataclass(frozen=True)
class Balances:
    """Many balances read in one snapshot: every row reflects the same ``as_of_position``,
    so sums over them are never torn (``totals``: balance per currency)."""

    balances: tuple[Balance, ...]
    #: Requested ids the read model has no row for (in the order asked).
    missing: tuple[UUID, ...]
    totals: dict[str, int]
    as_of_position: int
    lag_events: int | None
    #: Events after ``as_of_position`` may be partly included (a stream-owned version).
    includes_later: bool = False


@dataclass(frozen=True)
class BalancePage:
    """Balances in account id order after ``after``; ``next_after`` continues (None: last)."""

    balances: tuple[Balance, ...]
    next_after: str | None
    as_of_position: int
    lag_events: int | None
    #: Events after ``as_of_position`` may be partly included (a stream-owned version).
    includes_later: bool = False


@dataclass(frozen=True)
class Stock:
    sku: str
    on_hand: int
    reserved: int
    available: int
    version: int
    last_event_at: str
    as_of_position: int
    lag_events: int | None
    #: Events after ``as_of_position`` may be partly included (a stream-owned version).
    includes_later: bool = False


@dataclass(frozen=True)
class Entry:
    seq: int
    position: int
    occurred_at: str
    kind: str
    amount: int
    balance: int
    transfer_id: str | None
    counterparty: str | None


@dataclass(frozen=True)
class Statement:
    account_id: UUID
    entries: tuple[Entry, ...]
    as_of_position: int
    lag_events: int | None
    #: Events after ``as_of_position`` may be partly included (a stream-owned version).
    includes_later: bool = False
    #: The account has entries older than the last one here (ask with ``before_seq``).
    older: bool = False


@dataclass(frozen=True)
class DayActivity:
    day: str
    #: currency -> deposits, deposit_volume, withdrawals, ... (see ``daily_money``).
    money: dict[str, dict[str, int]]
    reserved: int
    shipped: int
    released: int


@dataclass(frozen=True)
class Activity:
    days: tuple[DayActivity, ...]
    as_of_position: int
    lag_events: int | None
    #: Events after ``as_of_position`` may be partly included (a stream-owned version).
    includes_later: bool = False


@dataclass(frozen=True)
class Answer(Generic[T]):
    """A value read from a read model, and the log position it reflects."""

    value: T
    as_of_position: int
    lag_events: int | None
    includes_later: bool = False


#: Longest pause, in seconds, between a query's reconnects while its database is unreachable.
_OUTAGE_BACKOFF_CAP = 1.0


#: Connections a forked child found made by its parent: never used or closed there.
_INHERITED: list[ReadStore] = []

#: Every ``ReadModels`` of this process, for ``_new_locks_after_fork``.
_ALL: weakref.WeakSet[ReadModels] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    """In a forked child, each ``ReadModels`` gets a new lock: a thread of the parent in
    the middle of a query at the fork left the child's copy held, by a thread the child
    does not have, and every query of the child waited for it for ever."""
    for models in list(_ALL):
        models._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_after_fork)


class ReadModels:
    """Read-side queries over one read-model database (one connection; thread-safe)."""

    def __init__(self, url: str, *, log: EventLog | None = None, poll: float = 0.005) -> None:
        self.url = url
        self.log = log
        self.poll = poll
        self._store: ReadStore | None = None
        #: The process that made ``_store`` (a forked child makes its own).
        self._opened_in = os.getpid()
        self._lock = threading.Lock()
        _ALL.add(self)
        #: How many times ``close`` was called: a query waiting out an outage stops waiting
        #: when it changes (a ``ReadModels`` closed and queried again reconnects, and its
        #: later queries wait as a new one's do).
        self._closes = 0
        #: Whether the catalog tables are known to exist: set on connecting (made here, or
        #: found by a read), cleared when a read finds a table gone.
        self._catalog = False

    # -- queries -----------------------------------------------------------------------------

    def balance(
        self, account_id: UUID | str, *, min_position: int | None = None, timeout: float = 2.0
    ) -> Balance | None:
        """An account's balance, or None if the read model has not seen the account."""
        return self.find_balance(account_id, min_position=min_position, timeout=timeout).value

    def find_balance(
        self, account_id: UUID | str, *, min_position: int | None = None, timeout: float = 2.0
    ) -> Answer[Balance | None]:
        """``balance``, with the position it was read at even when it found nothing: the
        position of the same snapshot, which a second query for it would not be (a batch
        committed in between may have added the account)."""
        key = _account_key(account_id, "account_id")

        def read(store: ReadStore, version: int) -> Row | None:
            return store.fetch(BALANCES, version, (key,))

        row, position, lag, later = self._read_at("account_balances", read, min_position, timeout)
        found = None if row is None else _balance(row, position, lag, later)
        return Answer(found, position, lag, later)

    def balances(
        self,
        account_ids: Sequence[UUID | str] | None = None,
        *,
        min_position: int | None = None,
        timeout: float = 2.0,
        at_most: int | None = None,
    ) -> Balances:
        """The balances of ``account_ids`` (every account when None), all read in one
        snapshot at one ``as_of_position``. ``at_most``: every account only if there are no
        more than that many (``InvalidRequest`` otherwise), read no further: a server answering
        strangers bounds what one request makes it hold."""
        if at_most is not None:
            # (One past it is read: a LIMIT PostgreSQL's bigint still holds.)
            _whole(at_most, "at_most", 0, MAX_BIGINT - 1)
        if account_ids is not None and (
            isinstance(account_ids, str | bytes) or not isinstance(account_ids, Iterable)
        ):
            raise InvalidRequest(
                f"account_ids must be a list of account ids, got {account_ids!r}",
                field="account_ids",
            )
        # Each account once, however often (or in whichever case) it is listed: the answer
        # lists it once, and the totals count it once.
        keys = (
            None
            if account_ids is None
            else list(dict.fromkeys(_account_key(a, "account id") for a in account_ids))
        )

        def read(store: ReadStore, version: int) -> list[Row]:
            if keys is None:
                limit = None if at_most is None else at_most + 1
                return store.select(BALANCES, version, order="account_id", limit=limit)
            rows: list[Row] = []
            for start in range(0, len(keys), 500):  # bounded statement size
                chunk = keys[start : start + 500]
                where = f"account_id IN ({', '.join(['%s'] * len(chunk))})"
                rows.extend(store.select(BALANCES, version, where, chunk))
            return rows

        rows, position, lag, later = self._read_at("account_balances", read, min_position, timeout)
        if keys is None and at_most is not None and len(rows) > at_most:
            raise InvalidRequest(
                f"the read model holds more than {at_most} accounts, more than one snapshot of"
                f" every account answers: list the accounts wanted (up to {at_most}), or page"
                " through them",
                field="account_ids",
            )
        found = {str(row["account_id"]): _balance(row, position, lag, later) for row in rows}
        ordered = list(found.values()) if keys is None else [found[k] for k in keys if k in found]
        totals: dict[str, int] = {}
        for balance in ordered:
            totals[balance.currency] = totals.get(balance.currency, 0) + balance.balance
        missing = () if keys is None else tuple(UUID(k) for k in keys if k not in found)
        return Balances(tuple(ordered), missing, totals, position, lag, later)

    def balance_page(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        min_position: int | None = None,
        timeout: float = 2.0,
    ) -> BalancePage:
        """Up to ``limit`` balances in account id order, after the account id ``after``."""
        _whole(limit, "limit", 1, MAX_PAGE)
        if after is not None:
            after = _account_key(after, "after")

        def read(store: ReadStore, version: int) -> list[Row]:
            where, params = ("account_id > %s", [after]) if after is not None else ("", [])
            return store.select(BALANCES, version, where, params, "account_id", limit + 1)

        rows, position, lag, later = self._read_at("account_balances", read, min_position, timeout)
        page = tuple(_balance(row, position, lag, later) for row in rows[:limit])
        following = str(page[-1].account_id) if len(rows) > limit and page else None
        return BalancePage(page, following, position, lag, later)

    def stock(
        self, sku: str, *, min_position: int | None = None, timeout: float = 2.0
    ) -> Stock | None:
        """A SKU's stock levels, or None if the read model has not seen the SKU."""
        return self.find_stock(sku, min_position=min_position, timeout=timeout).value

    def find_stock(
        self, sku: str, *, min_position: int | None = None, timeout: float = 2.0
    ) -> Answer[Stock | None]:
        """``stock``, with the position it was read at even when it found nothing."""
        key = str(inventory_id(check_sku(sku)))

        def read(store: ReadStore, version: int) -> Row | None:
            return store.fetch(LEVELS, version, (key,))

        row, position, lag, later = self._read_at("inventory_levels", read, min_position, timeout)
        if row is None:
            return Answer(None, position, lag, later)
        found = Stock(
            sku=_text(row, "sku"),
            on_hand=_int(row, "on_hand"),
            reserved=_int(row, "reserved"),
            available=_int(row, "available"),
            version=_int(row, "version"),
            last_event_at=_text(row, "last_event_at"),
            as_of_position=position,
            lag_events=lag,
            includes_later=later,
        )
        return Answer(found, position, lag, later)

    def statement(
        self,
        account_id: UUID | str,
        *,
        limit: int = 50,
        before_seq: int | None = None,
        min_position: int | None = None,
        timeout: float = 2.0,
    ) -> Statement | None:
        """The newest ``limit`` entries (newest first), or those before ``before_seq``, and
        whether older ones exist; None if the read model has not seen the account (an
        account opened and not used yet has a statement with no entries)."""
        return self.find_statement(
            account_id,
            limit=limit,
            before_seq=before_seq,
            min_position=min_position,
            timeout=timeout,
        ).value

    def find_statement(
        self,
        account_id: UUID | str,
        *,
        limit: int = 50,
        before_seq: int | None = None,
        min_position: int | None = None,
        timeout: float = 2.0,
    ) -> Answer[Statement | None]:
        """``statement``, with the position it was read at even when it found nothing."""
        key = _account_key(account_id, "account_id")
        _whole(limit, "limit", 1, MAX_PAGE)
        if before_seq is not None:
            _whole(before_seq, "before_seq", 1, MAX_BIGINT)

        def read(store: ReadStore, version: int) -> list[Row] | None:
            where = "account_id = %s"
            params: list[str | int] = [key]
            if before_seq is not None:
                where += " AND seq < %s"
                params.append(before_seq)
            # One row more than asked, in the same snapshot: whether older entries exist
            # (sequence numbers count every event of the account, so the last one's says
            # nothing: the opening is no entry).
            rows = store.select(STATEMENT, version, where, params, "seq DESC", limit + 1)
            if not rows and store.fetch(STATEMENT_HEADS, version, (key,)) is None:
                return None
            return rows

        rows, position, lag, later = self._read_at("account_statement", read, min_position, timeout)
        if rows is None:
            return Answer(None, position, lag, later)
        entries = tuple(
            Entry(
                seq=_int(row, "seq"),
                position=_int(row, "position"),
                occurred_at=_text(row, "occurred_at"),
                kind=_text(row, "kind"),
                amount=_int(row, "amount"),
                balance=_int(row, "balance"),
                transfer_id=_optional_text(row, "transfer_id"),
                counterparty=_optional_text(row, "counterparty"),
            )
            for row in rows[:limit]
        )
        found = Statement(UUID(key), entries, position, lag, later, len(rows) > limit)
        return Answer(found, position, lag, later)

    def daily_activity(
        self,
        *,
        days: int = 30,
        today: date | None = None,
        min_position: int | None = None,
        timeout: float = 2.0,
    ) -> Activity:
        """Per-day activity for the ``days`` days up to ``today`` (UTC), oldest first."""
        _whole(days, "days", 1, MAX_DAYS)
        if today is not None and (isinstance(today, datetime) or not isinstance(today, date)):
            raise InvalidRequest(f"today must be a date, got {today!r}", field="today")
        last = today or datetime.now(UTC).date()
        try:
            first = (last - timedelta(days=days - 1)).isoformat()
        except OverflowError:
            raise InvalidRequest(
                f"days must not reach back before the year 1: {days} days up to {last}",
                field="days",
            ) from None
        bounds = [first, last.isoformat()]

        def read(store: ReadStore, version: int) -> tuple[list[Row], list[Row]]:
            money = store.select(MONEY, version, "day >= %s AND day <= %s", bounds, "day, currency")
            stock = store.select(STOCK, version, "day >= %s AND day <= %s", bounds, "day")
            return money, stock

        (money, stock), position, lag, later = self._read_at(
            "daily_activity", read, min_position, timeout
        )
        by_day: dict[str, dict[str, Any]] = {}
        for row in money:
            day = by_day.setdefault(str(row["day"]), {"money": {}, "stock": None})
            counters = {k: int(v or 0) for k, v in row.items() if k not in ("day", "currency")}
            day["money"][str(row["currency"])] = counters
        for row in stock:
            by_day.setdefault(str(row["day"]), {"money": {}, "stock": None})["stock"] = row
        result = []
        for day_text in sorted(by_day):
            entry = by_day[day_text]
            units = entry["stock"] or {}
            result.append(
                DayActivity(
                    day_text,
                    entry["money"],
                    int(units.get("reserved") or 0),
                    int(units.get("shipped") or 0),
                    int(units.get("released") or 0),
                )
            )
        return Activity(tuple(result), position, lag, later)

    def row(
        self,
        projection: Projection,
        table: str,
        key: Key,
        *,
        min_position: int | None = None,
        timeout: float = 2.0,
    ) -> Answer[Row | None]:
        """One row of any projection's table by its key (None if absent), with the log
        position it reflects: for read models without a query of their own."""
        spec = _table(projection, table)
        if not isinstance(key, tuple) or len(key) != len(spec.key):
            raise InvalidRequest(
                f"key must be a tuple of the table's key columns {spec.key}, got {key!r:.80}",
                field="key",
            )

        def read(store: ReadStore, version: int) -> Row | None:
            return store.fetch(spec, version, key)

        found, position, lag, later = self._read_at(
            projection.name, read, min_position, timeout, code_version=projection.version
        )
        return Answer(found, position, lag, later)

    def rows(
        self,
        projection: Projection,
        table: str,
        *,
        where: str = "",
        params: Sequence[Any] = (),
        order: str = "",
        limit: int | None = None,
        min_position: int | None = None,
        timeout: float = 2.0,
    ) -> Answer[list[Row]]:
        """Rows of any projection's table (``where`` and ``order`` in SQL over its columns,
        with ``%s`` placeholders), read in one snapshot: for read models without a query of
        their own."""
        spec = _table(projection, table)
        if limit is not None:
            _whole(limit, "limit", 1, MAX_BIGINT)

        def read(store: ReadStore, version: int) -> list[Row]:
            return store.select(spec, version, where, params, order, limit)

        found, position, lag, later = self._read_at(
            projection.name, read, min_position, timeout, code_version=projection.version
        )
        return Answer(found, position, lag, later)

    def count(
        self,
        projection: Projection,
        table: str,
        *,
        by: str | None = None,
        timeout: float = 2.0,
    ) -> Answer[dict[Any, int]]:
        """How many rows a projection's table holds (``{None: n}``), or how many per value
        of its column ``by``: one aggregate query, for gauges."""
        spec = _table(projection, table)
        if by is not None and by not in {column.name for column in spec.columns}:
            raise InvalidRequest(
                f"by must be a column of {projection.name}'s table {table}, got {by!r:.80}",
                field="by",
            )

        def read(store: ReadStore, version: int) -> dict[Any, int]:
            if by is None:
                return {None: store.count(spec, version)}
            return store.count_by(spec, version, by)

        found, position, lag, later = self._read_at(
            projection.name, read, None, timeout, code_version=projection.version
        )
        return Answer(found, position, lag, later)

    def position(self, projection: str) -> int:
        """The log position the serving version of ``projection`` reflects."""
        _, position, _, _ = self._read_at(projection, lambda store, version: None, None, 0.0)
        return position

    # -- plumbing ----------------------------------------------------------------------------

    def _read_at(
        self,
        projection: str,
        read: Callable[[ReadStore, int], T],
        min_position: int | None,
        timeout: float,
        *,
        code_version: int | None = None,
    ) -> tuple[T, int, int | None, bool]:
        """What ``read`` finds in the serving version, at which log position, how far the
        head is ahead, and whether events after the position may be partly included.
        ``code_version``: the version of the projection whose table definitions ``read``
        uses (default: daybook's own projection of that name)."""
        if code_version is None:
            code_version = _CODE_VERSIONS.get(projection)
        if min_position is not None:
            _whole(min_position, "min_position", 0, MAX_BIGINT)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout >= 0)
        ):
            raise InvalidRequest(
                f"timeout must be a number of seconds, 0 or more, got {timeout!r}",
                field="timeout",
            )
        deadline = time.monotonic() + timeout
        closes = self._closes
        delay = self.poll
        dropped = failures = 0
        missing_in: int | None = None  # the version a table was missing from, last try
        started = True  # whether any version of it was ever registered (found each try)
        while True:
            store: ReadStore | None = None
            version: int | None = None
            try:
                with self._lock:
                    store = self._connection()
                    with store.transaction(write=False):
                        catalog = VersionCatalog(store)
                        if not self._catalog:  # read-only, and no writer made them yet
                            self._catalog = store.has_column("daybook_read_models", "name")
                        version = catalog.active_version(projection) if self._catalog else None
                        record = None if version is None else catalog.version(projection, version)
                        checkpoint = None if record is None else catalog.checkpoint(record)
                        position = 0 if checkpoint is None else checkpoint.position
                        # Nothing serves: has anything begun to build it? (Asked only then.)
                        started = version is not None or (
                            self._catalog and bool(catalog.versions(projection))
                        )
                        if version is not None and (
                            min_position is None or position >= min_position
                        ):
                            # A batch may commit here; the snapshot keeps it out of the rows.
                            crash_point("query.rows")
                            result = read(store, version)
                            head = store.head_position()
                            break
            except Exception as error:
                if (
                    store is not None
                    and version is not None
                    and version != code_version
                    and store.is_missing_column(error)
                ):
                    # The serving version's table lacks a column this code's definition
                    # of another version has (a deploy under way): not a bug, and not an
                    # outage either, so it is neither retried nor reported as a failure.
                    raise ReadModelChanged(projection, version, error) from None
                if store is not None and store.is_missing_table(error):
                    if version is not None and version != code_version and missing_in == version:
                        # Looked up again, the same version serves, without a table this
                        # code's version of it has (one a newer version added): a deploy
                        # under way, as for a missing column.
                        raise ReadModelChanged(projection, version, error) from None
                    # The version we looked up was switched away and dropped as we read it
                    # (or the catalog itself is gone: a database replaced by an empty one).
                    missing_in = version
                    self._catalog = False
                    dropped += 1
                    if dropped > 20:
                        raise
                    continue
                # An outage (the database restarting, a lost connection) is waited out
                # within the read's timeout: reconnect with backoff (at once, the first
                # times: a connection the server dropped earlier is only found out now).
                # Then its error is raised (over HTTP, 503 unavailable). Anything else is
                # raised at once.
                failures += 1
                if not is_transient(error) or self._closes != closes:
                    raise
                # A statement the server cancelled (its statement_timeout) took that whole
                # timeout, on a connection that is fine: not tried again past the read's
                # own timeout, or a request would wait out four statement timeouts (and
                # the server run four such statements) for the same 503.
                if (failures > 3 or cancelled(error)) and time.monotonic() >= deadline:
                    raise
                with self._lock:
                    self._reset()
                if failures > 1:
                    time.sleep(
                        random.uniform(0.5, 1.0)
                        * min(_OUTAGE_BACKOFF_CAP, 0.01 * 2 ** min(failures, 10))
                    )
                continue
            if time.monotonic() >= deadline:
                built = version is not None
                raise StaleRead(
                    projection, min_position or 0, position, timeout, built=built, started=started
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        if head is None and self.log is not None:
            head = self.log.head()
        lag = None if head is None else max(0, head - position)
        assert checkpoint is not None
        return result, position, lag, checkpoint.includes_later

    def _connection(self) -> ReadStore:
        self._leave_if_forked()
        if self._store is None:
            store = open_store(self.url)
            try:
                self._catalog = VersionCatalog(store).ensure_where_writable()
            except BaseException:
                store.close()
                raise
            self._store = store
            self._opened_in = os.getpid()
        return self._store

    def _leave_if_forked(self) -> None:
        """In a child forked after the connection was made (gunicorn --preload, a
        multiprocessing fork): the connection is the parent's, and a query on it here would
        mix the two processes' conversations on one socket, breaking the parent's session.
        Left as it is (closing it would end the parent's session too) and kept referenced
        (collected, SQLite's would be closed); the child makes its own."""
        if self._store is not None and self._opened_in != os.getpid():
            _INHERITED.append(self._store)
            self._store = None

    def _reset(self) -> None:
        self._leave_if_forked()
        if self._store is not None:
            self._store.close()
        self._store = None

    def close(self) -> None:
        self._closes += 1
        with self._lock:
            self._reset()

    def __enter__(self) -> ReadModels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _account_key(value: object, what: str) -> str:
    """An account id as the read models store it (a UUID's lower-case text)."""
    return str(check_uuid(value, what))


def _table(projection: Projection, name: object) -> Table:
    """``projection``'s table ``name``, or the refusal that names the tables it has."""
    for table in projection.tables:
        if table.name == name:
            return table
    tables = ", ".join(table.name for table in projection.tables)
    raise InvalidRequest(
        f"projection {projection.name} has no table {name!r:.80} (it has {tables})",
        field="table",
    )


def _whole(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(
            f"{what} must be a whole number from {low} to {high}, got {value!r}", field=what
        )
    return value


def _balance(row: Row, position: int, lag: int | None, later: bool) -> Balance:
    return Balance(
        account_id=UUID(_text(row, "account_id")),
        owner=_text(row, "owner"),
        currency=_text(row, "currency"),
        balance=_int(row, "balance"),
        held=_int(row, "held"),
        available=_int(row, "available"),
        overdraft_limit=_int(row, "overdraft_limit"),
        status=_text(row, "status"),
        version=_int(row, "version"),
        last_event_at=_text(row, "last_event_at"),
        as_of_position=position,
        lag_events=lag,
        includes_later=later,
    )


def _int(row: Row, column: str) -> int:
    value = row[column]
    if not isinstance(value, int):
        raise ReadStoreError(f"read-model column {column} holds {value!r}, not an integer")
    return value


def _text(row: Row, column: str) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise ReadStoreError(f"read-model column {column} holds {value!r}, not text")
    return value


def _optional_text(row: Row, column: str) -> str | None:
    return None if row[column] is None else _text(row, column)
