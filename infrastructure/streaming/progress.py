"""Per-partition progress of a consumer group, kept beside the read-model rows.

One row per (group, topic, partition) in ``daybook_stream_progress``: the last log position
applied from that partition, counters, and the partition's state. A worker updates it in the
same transaction as the rows it wrote, so whatever Kafka redelivers afterwards (a worker
killed before its offsets were committed, a rebalance, a relay re-publishing after a crash or
after the broker lost data) is recognised by ``classify`` and changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString

import psycopg
from psycopg.sql import SQL, Composed, Identifier

from daybook.infrastructure.readmodels.checkpoints import PROGRESS_TABLE
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import ReadStore

__all__ = [
    "DEAD_LETTER_TABLE",
    "GAP",
    "LETTER_RETENTION",
    "LIVE",
    "PARKED",
    "PROGRESS_TABLE",
    "Step",
    "classify",
    "create_purge_index",
    "purge_closed_letters",
]
from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.urls import postgres_params

DEAD_LETTER_TABLE = "daybook_stream_dead_letters"
#: Seconds a closed letter (every version it was left out of is retired) is kept after it
#: was parked: 30 days.
LETTER_RETENTION = 30 * 86_400.0

LIVE = "live"
#: An envelope arrived whose ``prev`` is ahead of what was applied: something is missing and
#: the partition waits for the relay to re-publish it.
GAP = "waiting for re-published events"
#: The partition parked events and went on past them (``stream status`` tells whether any
#: is still left out of a version in use).
PARKED = "parked events (see dead letters)"


class Step(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    GAP = "gap"


def classify(applied: int, position: int, prev: int) -> Step:
    """What to do with an envelope, given the partition's last applied position.

    See ``infrastructure.streaming.envelope`` for the ``prev`` chain this relies on.
    """
    if position <= applied:
        return Step.DUPLICATE
    if prev == applied:
        return Step.APPLY
    if prev < applied:
        # Our chain says the event before this one is ``prev`` but we applied past it
        # without seeing this one: impossible for one relay's partitioning. Treat like a
        # gap: never apply out of order.
        return Step.GAP
    return Step.GAP


@dataclass(frozen=True)
class PartitionStatus:
    group: str
    topic: str
    partition: int
    position: int
    applied: int
    duplicates: int
    dead_letters: int
    state: str
    last_error: str | None
    #: The ``prev`` a gap is waiting for (0 when not in a gap).
    waiting_for: int
    #: Every event of the partition up to here is applied (see ``checkpoints``).
    bound: int = 0
    #: The worker that last wrote it (``host:pid:random``, one per process start).
    writer: str | None = None


def create_tables_sql() -> list[Composed]:
    """The dead-letter table (the progress table is the catalog's: ``checkpoints``)."""
    return [
        SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "group_id text NOT NULL, topic text NOT NULL, partition int NOT NULL, "
            "position bigint NOT NULL, kafka_offset bigint NOT NULL, event_type text, "
            "error text NOT NULL, envelope bytea NOT NULL, "
            "published boolean NOT NULL DEFAULT false, "
            "parked_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (group_id, topic, position))"
        ).format(Identifier(DEAD_LETTER_TABLE)),
    ]


#: Serves ``purge_closed_letters``: the group's letters it may delete, oldest first. Without
#: it every purge transaction read and sorted all of the group's letters (whose count is what
#: the purge is there to bound), so draining a backlog took time quadratic in its size.
PURGE_INDEX = "daybook_stream_dead_letters_purge"


def create_purge_index(store: ReadStore) -> None:
    """Create ``PURGE_INDEX`` unless it is there (on tables an older daybook made, too: after
    ``VERSIONS_COLUMN`` was added, which it names)."""
    # Asked first: CREATE INDEX locks the table against writes before it finds the index
    # there, and every worker of every group runs this when it connects.
    if store.execute(f"SELECT {IN_OWN_SCHEMA}", (PURGE_INDEX,))[0][0] is None:
        store.execute(
            f"CREATE INDEX IF NOT EXISTS {PURGE_INDEX} ON {DEAD_LETTER_TABLE}"
            " (group_id, topic, parked_at) WHERE published AND versions IS NOT NULL"
        )


#: The versions the event was left out of (``name:version``), the group's versions when it
#: was parked: a version built later (by the runner, then handed over) has it in. Added to
#: tables an older daybook made (``ReadStore.add_column``); its letters have none, and count
#: for every version.
VERSIONS_COLUMN = "versions text[]"


def read_status(store_url: str, group: str, topic: str) -> list[PartitionStatus]:
    """The group's partitions as recorded (empty if it never applied anything)."""
    store = open_store(store_url)
    try:
        if store.execute(f"SELECT {IN_OWN_SCHEMA}", (PROGRESS_TABLE,))[0][0] is None:
            return []
        # Columns later daybooks added: absent from a table an older one made, until the
        # first upgraded worker connects (status may well run before it does).
        bound = "bound" if store.has_column(PROGRESS_TABLE, "bound") else "0"
        writer = "writer" if store.has_column(PROGRESS_TABLE, "writer") else "NULL"
        rows = store.execute(
            "SELECT partition, position, applied, duplicates, dead_letters, state, last_error,"
            f" waiting_for, {bound}, {writer} FROM {PROGRESS_TABLE}"
            " WHERE group_id = %s AND topic = %s ORDER BY partition",
            (group, topic),
        )
    finally:
        store.close()
    return [PartitionStatus(group, topic, *row) for row in rows]


def read_groups(store_url: str, topic: str) -> list[str]:
    """The groups that have recorded progress on ``topic``, by name."""
    rows = _read_progress(
        store_url, "SELECT DISTINCT group_id FROM {} WHERE topic = %s ORDER BY group_id", (topic,)
    )
    return [row[0] for row in rows]


def _read_progress(store_url: str, query: LiteralString, params: tuple[str, ...]) -> list[Any]:
    """Rows of ``query`` on the progress table (``{}`` in it); none if no worker made it."""
    with psycopg.connect(postgres_params(store_url).conninfo(), autocommit=True) as conn:
        found = conn.execute(f"SELECT {IN_OWN_SCHEMA}", (PROGRESS_TABLE,)).fetchone()
        if not found or found[0] is None:
            return []
        return conn.execute(SQL(query).format(Identifier(PROGRESS_TABLE)), params).fetchall()


def _open_letter(versions: str) -> str:
    """SQL: whether a letter is open. Some version the event was left out of is not retired
    yet (letters parked before versions were recorded count as open). Once every one of them
    is retired (fixed versions built and handed over), the letter is history. A table no
    upgraded worker has connected to yet has no ``versions`` (``versions`` is then NULL):
    every letter is open."""
    return (
        f"({versions} IS NULL OR EXISTS (SELECT 1 FROM daybook_projection_versions v"
        " WHERE v.state <> 'retired' AND v.name || ':' || v.version"
        f" = ANY({versions}::text[])))"
    )


def read_dead_letters(store_url: str, group: str, topic: str) -> list[dict[str, Any]]:
    """Parked events of the group, oldest first (every one: see ``letter_summary``)."""
    store = open_store(store_url)
    try:
        if store.execute(f"SELECT {IN_OWN_SCHEMA}", (DEAD_LETTER_TABLE,))[0][0] is None:
            return []
        versions = "versions" if store.has_column(DEAD_LETTER_TABLE, "versions") else "NULL"
        rows = store.execute(
            f"SELECT partition, position, kafka_offset, event_type, error, {versions}::text[],"
            f" {_open_letter(versions)} FROM {DEAD_LETTER_TABLE}"
            " WHERE group_id = %s AND topic = %s ORDER BY position",
            (group, topic),
        )
    finally:
        store.close()
    names = ("partition", "position", "kafka_offset", "event_type", "error", "versions", "open")
    return [dict(zip(names, row, strict=True)) for row in rows]


@dataclass(frozen=True)
class LetterSummary:
    """A group's letters counted: all of them, the open ones, and the versions the open ones
    were left out of (``all``: a letter that names none)."""

    letters: int
    open: int
    versions: tuple[str, ...]


def letter_summary(store_url: str, group: str, topic: str) -> LetterSummary:
    """``read_dead_letters`` counted by the database: a handler failing on every event of a
    busy projection parks a letter per event until the fix is deployed, and reading them all
    (their errors too) to count them took memory and time growing with the log."""
    store = open_store(store_url)
    try:
        if store.execute(f"SELECT {IN_OWN_SCHEMA}", (DEAD_LETTER_TABLE,))[0][0] is None:
            return LetterSummary(0, 0, ())
        has_versions = store.has_column(DEAD_LETTER_TABLE, "versions")
        versions = "versions" if has_versions else "NULL"
        where = " WHERE group_id = %s AND topic = %s"
        ((letters, open_letters),) = store.execute(
            f"SELECT count(*), count(*) FILTER (WHERE {_open_letter(versions)})"
            f" FROM {DEAD_LETTER_TABLE}{where}",
            (group, topic),
        )
        names: list[str] = []
        if open_letters:
            named = "unnest(coalesce(versions, ARRAY['all']))" if has_versions else "'all'"
            rows = store.execute(
                f"SELECT DISTINCT {named} FROM {DEAD_LETTER_TABLE}{where}"
                f" AND {_open_letter(versions)}",
                (group, topic),
            )
            names = sorted(str(row[0]) for row in rows)
    finally:
        store.close()
    return LetterSummary(int(letters), int(open_letters), tuple(names))


def letter_groups(store: ReadStore, topic: str, *, first: str) -> list[str]:
    """The groups that may have dead letters of ``topic``, ``first`` first (a worker's
    own): those with progress rows (a few per group, where letters may be millions)."""
    rows = store.execute(
        f"SELECT DISTINCT group_id FROM {PROGRESS_TABLE} WHERE topic = %s", (topic,)
    )
    others = sorted(str(row[0]) for row in rows if row[0] != first)
    return [first, *others]


def purge_closed_letters(
    store: ReadStore, group: str, topic: str, parked_before: datetime, limit: int
) -> int:
    """Delete up to ``limit`` of the group's closed letters parked before ``parked_before``,
    oldest first, in one short transaction; how many.

    Closed: published on the dead-letter topic, and every version it names retired (the
    fixed versions that replaced them have the event; see ``read_dead_letters``). Open
    letters and letters that name no versions (parked by an older daybook: they count for
    every version) are kept. Rows another purge is deleting are skipped, not waited for.
    The filter and the order are ``PURGE_INDEX``'s: keep them in step.
    """
    # The versions not retired are read once, as an array, rather than joined per letter: a
    # join's estimate (from a catalog table too small to be analysed) has the planner expect
    # almost no letter to be closed, and read and sort them all rather than take the index's
    # oldest until it has ``limit``.
    with store.transaction():
        rows = store.execute(
            f"DELETE FROM {DEAD_LETTER_TABLE} WHERE (group_id, topic, position) IN ("
            f" SELECT group_id, topic, position FROM {DEAD_LETTER_TABLE}"
            " WHERE group_id = %s AND topic = %s AND published AND versions IS NOT NULL"
            " AND parked_at < %s AND NOT versions && ARRAY(SELECT v.name || ':' || v.version"
            " FROM daybook_projection_versions v WHERE v.state <> 'retired')"
            " ORDER BY parked_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING 1",
            (group, topic, parked_before, limit),
        )
    return len(rows)
