"""What a projection is: named tables, and a pure function per event type that changes rows.

A definition never touches a database. Each handler receives the event (with its log
position) and an abstract row store, reads the rows it needs and puts or deletes rows. The
runner decides how rows are fetched, cached, batched and committed, so the same definition
gives identical tables under the in-process runner, the faust workers and an in-memory replay.

Row values are plain ``str``, ``int`` or ``None``: exactly what every backend stores and
returns unchanged, which is what lets the reconciler compare rows byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol

Value = str | int | None
Row = dict[str, Value]
Key = tuple[Value, ...]
#: ``bigint``: a signed 64-bit integer (an amount, a balance, a count). ``numeric``: an
#: integer of any size, for totals over many amounts (a day's volume), which may pass
#: 2**63-1 though every amount fits.
ColumnType = Literal["text", "bigint", "numeric"]


class LogEvent(NamedTuple):
    """One event as every runner sees it: where it sits in the log, whose it is, its payload.

    ``type`` is the event class's qualified name (``"Account.Deposited"``); ``data`` is the
    payload at the current schema version (already upcast), as JSON values.

    A named tuple rather than a frozen dataclass: just as immutable, and much cheaper to
    build, which matters when a rebuild makes a million of them.
    """

    position: int
    type: str
    originator_id: str
    originator_version: int
    timestamp: datetime
    data: Mapping[str, Any]

    @classmethod
    def from_state(cls, position: int, topic: str, state: Mapping[str, Any]) -> LogEvent:
        """Build from a stored event's topic and decoded state (``ContractMapper.decode_state``
        output, or the payload of a relay envelope with the same fields)."""
        timestamp = state["timestamp"]
        if isinstance(timestamp, str):
            timestamp = parse_time(timestamp)
        return cls(
            position,
            topic.rpartition(":")[2],
            str(state["originator_id"]),
            int(state["originator_version"]),
            timestamp,
            state,
        )


def event_type(event_class: type) -> str:
    """The ``LogEvent.type`` of events of ``event_class``."""
    return event_class.__qualname__


# Every projection stores the same event's time, and formatting one costs more than a whole
# handler, so the row text is memoised: first the last timestamp asked about (compared by
# identity: every handler of one event passes the same object, and ``parse_time`` primes it
# with the stored text), then recent ones by value. Pure: the text depends only on the instant.
# The memo is bounded by clearing, which is cheaper than LRU bookkeeping on this path.
_last_time: tuple[datetime | None, str] = (None, "")
_TIME_TEXT: dict[datetime, str] = {}
_TIME_TEXT_LIMIT = 1 << 14
#: The length of a UTC timestamp with microseconds, as ``iso_time`` writes it.
_ISO_LENGTH = len("2000-01-01T00:00:00.000000+00:00")


def iso_time(moment: datetime) -> str:
    """A timestamp as stored in rows: UTC, microseconds, always the same shape."""
    global _last_time
    last, text = _last_time
    if moment is last:
        return text
    known = _TIME_TEXT.get(moment)
    if known is None:
        known = moment.astimezone(UTC).isoformat(timespec="microseconds")
        if len(_TIME_TEXT) >= _TIME_TEXT_LIMIT:
            _TIME_TEXT.clear()
        _TIME_TEXT[moment] = known
    _last_time = (moment, known)
    return known


def day_of(moment: datetime) -> str:
    """The UTC calendar day of ``moment`` as ``YYYY-MM-DD``."""
    return iso_time(moment)[:10]


def parse_time(text: str) -> datetime:
    """A stored event's ISO 8601 timestamp as a datetime. Text already in ``iso_time``'s
    shape (how events are stored) becomes the memoised row text, so it is not reformatted."""
    global _last_time
    moment = datetime.fromisoformat(text)
    if len(text) == _ISO_LENGTH and text.endswith("+00:00"):
        _last_time = (moment, text)
    return moment


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType = "text"
    nullable: bool = False


#: The column a summed table's stored rows carry besides its own (see ``Table.summed``).
SHARD = "shard"


@dataclass(frozen=True)
class Table:
    """A read-model table. ``append_only`` tables are only ever inserted into, never read
    or changed by their handlers, so runners may stream them (COPY) without caching.

    ``summed`` tables hold totals over many aggregates (daily volumes): every column outside
    the key is a count or a sum. Runners may then store each key's row in shards (one per
    stream partition, say, so that workers never write the same row) and readers add the
    shards up: the rows read are the same either way. ``label`` names the columns that tell a
    person which row this is when the key does not (a SKU rather than its inventory id)."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    append_only: bool = False
    indexes: tuple[tuple[str, ...], ...] = ()
    summed: bool = False
    label: tuple[str, ...] = ()

    #: Derived once (runners ask for them for every row they touch).
    column_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: ``row -> primary key``, in ``key`` order.
    key_of: Callable[[Mapping[str, Value]], Key] = field(init=False, repr=False, compare=False)
    #: Where the ``numeric`` columns are in ``columns`` (stores may not keep them as ints).
    numeric: tuple[int, ...] = field(init=False, repr=False, compare=False)

    #: The table as stored: a summed table's rows with their shard in the key.
    stored: Table = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_names", tuple(c.name for c in self.columns))
        object.__setattr__(self, "key_of", _key_getter(self.key))
        numeric = tuple(i for i, c in enumerate(self.columns) if c.type == "numeric")
        object.__setattr__(self, "numeric", numeric)
        stored = self
        if self.summed:
            columns = (*self.columns, Column(SHARD, "bigint"))
            stored = Table(self.name, columns, (*self.key, SHARD), indexes=self.indexes)
        object.__setattr__(self, "stored", stored)

    def physical_name(self, version: int) -> str:
        """The table's name in the database for one projection version (blue/green)."""
        return f"rm_{self.name}_v{version}"


class Rows(Protocol):
    """The abstract row store a handler works on; runners provide it."""

    def get(self, table: str, key: Key) -> Row | None:
        """The row with this key, or None. The returned dict must not be mutated."""
        ...

    def put(self, table: str, row: Row) -> None:
        """Insert or replace the row with the same key."""
        ...

    def delete(self, table: str, key: Key) -> None:
        """Remove the row with this key, if any."""
        ...


Handler = Callable[[LogEvent, Rows], None]


@dataclass(frozen=True)
class Projection:
    """A read model: a name, a schema version, its tables and one handler per event type.

    Bump ``version`` whenever a table or a rule changes: the new version is built beside the
    old one and replaces it atomically when it has caught up with the log.
    """

    name: str
    version: int
    tables: tuple[Table, ...]
    handlers: Mapping[str, Handler] = field(default_factory=dict)

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        msg = f"projection {self.name} has no table {name!r}"
        raise KeyError(msg)

    @property
    def event_types(self) -> frozenset[str]:
        return frozenset(self.handlers)

    def apply(self, event: LogEvent, rows: Rows) -> None:
        """Change ``rows`` for ``event``; events of other types change nothing."""
        handler = self.handlers.get(event.type)
        if handler is not None:
            handler(event, rows)


class MemoryRows:
    """Rows in dictionaries: for replays (reconciler, tests) and as a reference runner."""

    def __init__(self, projection: Projection) -> None:
        self.projection = projection
        self.tables: dict[str, dict[Key, Row]] = {t.name: {} for t in projection.tables}
        self._key_of = {t.name: t.key_of for t in projection.tables}

    def get(self, table: str, key: Key) -> Row | None:
        return self.tables[table].get(key)

    def put(self, table: str, row: Row) -> None:
        self.tables[table][self._key_of[table](row)] = dict(row)

    def delete(self, table: str, key: Key) -> None:
        self.tables[table].pop(key, None)


def _key_getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Value]], Key]:
    """A fast ``row -> key tuple`` for these key columns."""
    if len(names) == 1:
        (name,) = names

        def single(row: Mapping[str, Value]) -> Key:
            return (row[name],)

        return single
    if len(names) == 2:
        first, second = names

        def pair(row: Mapping[str, Value]) -> Key:
            return (row[first], row[second])

        return pair
    return lambda row: tuple(row[name] for name in names)


def sort_key(key: Key) -> tuple[tuple[int, str | int], ...]:
    """Order keys that may hold None next to values."""
    return tuple((0, "") if v is None else (1, v) for v in key)


def replay(projection: Projection, events: Iterable[LogEvent]) -> MemoryRows:
    """Build a projection's rows from scratch, in memory."""
    rows = MemoryRows(projection)
    for event in events:
        projection.apply(event, rows)
    return rows
