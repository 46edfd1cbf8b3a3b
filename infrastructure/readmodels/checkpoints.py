"""Checkpoints: how far a projection version got, and who may move it.

Each projection version has exactly one owner, recorded in the catalog:

- ``runner``: the in-process runner (or a bulk rebuild). The checkpoint is one log position
  P: every event up to P is applied, none after.
- ``stream:GROUP``: the stream workers of one consumer group. The checkpoint is a partition
  vector, kept in ``daybook_stream_progress`` (one row per partition of the group's topic,
  moved in the same transaction as the rows): per partition, the last log position applied
  from it (``position``), and ``bound``: every event of that partition up to ``bound`` is
  applied. (The relay sends each partition a mark after every batch, "nothing else for you up
  to C", so an idle partition's bound moves on although it gets no event.)

A stream version's honest position is the smallest bound over its partitions: every event up
to it is applied, by every partition. Events after it may be partly applied (a partition
ahead of the others), and answers say so.

Converting between the two is computable because the relay's partitioning is: an event's
partition is the murmur2 hash of its aggregate id (``partition_of``). From a log position P,
each partition's vector entry is the last event at or before P that went to it; from a vector,
the events that bring every partition up to the largest position in it are read from the log.
``handover`` does both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from daybook.infrastructure.lifecycle import Refused
from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.readmodels.store import ReadStore

PROGRESS_TABLE = "daybook_stream_progress"

RUNNER = "runner"
_STREAM = "stream:"


def stream_owner(group: str) -> str:
    return f"{_STREAM}{group}"


def group_of(owner: str) -> str | None:
    """The consumer group of a ``stream:GROUP`` owner (None for the runner)."""
    return owner[len(_STREAM) :] if owner.startswith(_STREAM) else None


def version_label(name: str, version: int) -> str:
    """How a stream group's dead letter names a version it left the event out of."""
    return f"{name}:{version}"


def past_the_log(position: int, head: int) -> str:
    """Why a version whose position is past the event log's head is not to be followed:
    the next events take positions it believes it applied, and would be skipped."""
    return (
        f"position {position} is past the event log's head {head}: the event store was "
        "restored from an older backup, or the read models belong to another store, and new "
        "events up to that position would be skipped; rebuild it under a new version (or, if "
        "the log is a standby behind its primary, resume it once it has caught up)"
    )


def handover_command(name: str, to: str) -> str:
    return f"daybook projections handover {name} --to {to}"


class NotOwner(Refused):
    """A writer asked to write a projection version another owner's checkpoint tracks."""

    code = "not_owner"

    def __init__(self, name: str, version: int, owner: str, writer: str) -> None:
        super().__init__(
            f"projection {name} v{version} is owned by {owner}, not {writer}: hand it over "
            f"first ({handover_command(name, writer)})"
        )
        self.name = name
        self.version = version
        self.owner = owner


class GroupAlreadyStarted(Refused):
    """Workers of a group that has applied events met a projection version new to it: they
    would build it only from the group's committed offsets on, and serve it incomplete."""

    code = "group_already_started"

    def __init__(self, name: str, version: int, group: str, topic: str, position: int) -> None:
        owner = stream_owner(group)
        super().__init__(
            f"projection {name} v{version} is new to {owner}, which has applied {topic} up to "
            f"position {position}: its workers would build it from there on only; start them "
            f"with a new --group, or build it with 'daybook projections rebuild {name}' and "
            f"hand it over with '{handover_command(name, owner)}'"
        )
        self.name = name
        self.version = version
        self.group = group


class PartitioningMismatch(Refused):
    """A stream worker started with another topic or partition count than a version its
    group writes records, or than its topic has (the relay's cursor, the broker, or a
    message of a partition past the worker's count say so): its partition vector must be
    made for the topic's partitions, and a worker that maps events to partitions otherwise
    would apply some again and skip others, or serve a version before every partition's
    events are in."""

    code = "partitioning_mismatch"

    @classmethod
    def of_version(
        cls, name: str, version: int, owner: str, recorded: str, running: str
    ) -> PartitioningMismatch:
        return cls(
            f"{owner} writes projection {name} v{version} from {recorded}, and this worker "
            f"runs with {running}: start it with the group's topic and partitions "
            f"(--topic, --partitions), or hand the version to the runner first "
            f"(daybook projections handover {name} --to runner)"
        )

    @classmethod
    def of_topic(cls, topic: str, counted: int, by: str, running: int) -> PartitioningMismatch:
        """``by``: who counts the topic's ``counted`` partitions (the relay's cursor, the
        broker)."""
        return cls(
            f"{by} {topic!r} with {counted} partitions, and this worker runs with "
            f"{running}: start it with --partitions {counted}; nothing was applied"
        )

    @classmethod
    def of_message(cls, topic: str, partition: int, running: int) -> PartitioningMismatch:
        return cls(
            f"a message of partition {partition} of topic {topic!r} came, and this worker "
            f"runs with {running} partition{'' if running == 1 else 's'}: the topic has "
            "more; start it with the topic's partition count (--partitions, the relay's); "
            "nothing of the batch was applied"
        )


class CodeLacksVersion(Refused):
    """A stream worker whose code does not define a version its group writes. The group's
    partition progress is one checkpoint for every version it owns: a batch applied without
    that version would move it past events the version never got."""

    code = "code_lacks_version"

    def __init__(self, name: str, version: int, owner: str, defined: int | None) -> None:
        code = "does not define it" if defined is None else f"defines version {defined}"
        if defined is not None and defined > version:
            # Code newer than the group's version: no deployment helps; the switch does.
            remedy = (
                f"run the code of v{version} until v{defined} replaces it (daybook projections "
                f"rebuild {name}, then {handover_command(name, owner)})"
            )
        else:
            remedy = "deploy the new code"
        super().__init__(
            f"{owner} writes projection {name} v{version}, and this worker's code {code}: a "
            f"batch applied without it would move the group past events that version never "
            f"got; {remedy}"
        )
        self.name = name
        self.version = version
        self.owner = owner


def create_progress_table(store: ReadStore) -> None:
    """The partition vectors of stream groups (inside a transaction)."""
    store.execute(
        f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} ("
        "group_id TEXT NOT NULL, topic TEXT NOT NULL, partition BIGINT NOT NULL, "
        "position BIGINT NOT NULL DEFAULT 0, applied BIGINT NOT NULL DEFAULT 0, "
        "duplicates BIGINT NOT NULL DEFAULT 0, dead_letters BIGINT NOT NULL DEFAULT 0, "
        "state TEXT NOT NULL DEFAULT 'live', last_error TEXT, "
        "waiting_for BIGINT NOT NULL DEFAULT 0, "
        "PRIMARY KEY (group_id, topic, partition))"
    )
    store.add_column(PROGRESS_TABLE, "bound BIGINT NOT NULL DEFAULT 0")
    store.add_column(PROGRESS_TABLE, "writer TEXT")
    # The identity of the event store the group follows, set by its first batch that names
    # one (``ForeignStore``); on every row of the group's.
    store.add_column(PROGRESS_TABLE, "store_id TEXT")


@dataclass(frozen=True)
class Vector:
    """A stream group's checkpoint: per partition, the last position applied and the bound."""

    positions: tuple[int, ...]
    bounds: tuple[int, ...]

    @property
    def position(self) -> int:
        """The honest position: every event up to it is applied."""
        return min(self.bounds) if self.bounds else 0

    @property
    def includes_later(self) -> bool:
        """Whether some events after ``position`` are applied (a partition ahead)."""
        return max(self.positions, default=0) > self.position

    @property
    def started(self) -> bool:
        """Whether the group has consumed anything of its topic (its offsets moved on)."""
        return any(self.positions) or any(self.bounds)

    @property
    def furthest(self) -> int:
        return max(*self.positions, self.position) if self.positions else 0


def read_vector(
    store: ReadStore, group: str, topic: str, partitions: int, *, lock: bool = False
) -> Vector:
    """The group's vector (partitions without a row yet count as 0); ``lock``: FOR UPDATE."""
    sql = (
        f"SELECT partition, position, bound FROM {PROGRESS_TABLE}"
        " WHERE group_id = %s AND topic = %s ORDER BY partition"
    )
    rows = store.execute(store.locking(sql) if lock else sql, (group, topic))
    positions, bounds = [0] * partitions, [0] * partitions
    for partition, position, bound in rows:
        if 0 <= int(partition) < partitions:
            positions[int(partition)] = int(position)
            bounds[int(partition)] = max(int(bound), int(position))
    return Vector(tuple(positions), tuple(bounds))


def recorded_partitions(
    store: ReadStore, group: str, topic: str, *, lock: bool = False
) -> int | None:
    """How many partitions the group's progress rows for ``topic`` say it follows it with
    (the highest partition that has a row, plus one); None if it has no row. ``lock``: FOR
    UPDATE, the rows ``read_vector`` locks, in the same order."""
    sql = (
        f"SELECT partition FROM {PROGRESS_TABLE}"
        " WHERE group_id = %s AND topic = %s ORDER BY partition"
    )
    rows = store.execute(store.locking(sql) if lock else sql, (group, topic))
    return max((int(row[0]) for row in rows), default=-1) + 1 or None


def write_vector(store: ReadStore, group: str, topic: str, vector: Vector) -> None:
    """Set the group's vector (handover), creating missing partition rows."""
    for partition, (position, bound) in enumerate(
        zip(vector.positions, vector.bounds, strict=True)
    ):
        store.execute(
            f"INSERT INTO {PROGRESS_TABLE} (group_id, topic, partition, position, bound)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (group_id, topic, partition)"
            " DO UPDATE SET position = EXCLUDED.position, bound = EXCLUDED.bound,"
            " state = 'live', waiting_for = 0",
            (group, topic, partition, position, bound),
        )


class ForeignStore(Refused):
    """A stream worker met a message another event store's relay published to its topic:
    its positions are not those of the log the group follows."""

    code = "foreign_store"

    def __init__(self, group: str, topic: str, follows: str, other: str, position: int) -> None:
        super().__init__(
            f"{stream_owner(group)} follows event store {follows}, but {topic!r} also carries "
            f"events of event store {other} (position {position}): two event stores' relays "
            "publish to one topic; give each event store (each database, or each schema of one "
            "holding a ledger) its own --topic (and its own groups); "
            "nothing of the batch was applied"
        )
        self.group = group
        self.follows = follows
        self.other = other


#: ``aggregate id -> partition`` for a partition count (the relay's partitioner).
PartitionOf = Callable[[str], int]


def parked_for(store: ReadStore, group: str, topic: str, name: str, version: int) -> frozenset[int]:
    """Positions the stream ``group`` left out of version ``version`` of ``name``: parked
    while the group wrote it (stream groups write PostgreSQL only). A letter parked for
    other versions, say before a fixed version was built by the runner and handed over, is
    in this one's rows. (A message that was no envelope has a negative position: no event.)
    A letter an older daybook parked names no version: it may concern this one, and counts
    (no record says otherwise)."""
    found = store.execute(
        f"SELECT {IN_OWN_SCHEMA} IS NOT NULL",
        ("daybook_stream_dead_letters",),
    )
    if not found[0][0]:
        return frozenset()
    sql = "SELECT position FROM daybook_stream_dead_letters WHERE group_id = %s AND topic = %s"
    params: tuple[str, ...] = (group, topic)
    # A table no upgraded worker has connected to yet records no versions: every letter
    # counts, as it did.
    if store.has_column("daybook_stream_dead_letters", "versions"):
        sql += " AND (versions IS NULL OR %s = ANY(versions))"
        params += (version_label(name, version),)
    rows = store.execute(sql, params)
    return frozenset(int(row[0]) for row in rows)


def parked_counts(store: ReadStore) -> dict[tuple[str, str, str], int]:
    """How many letters each stream group left out of each version, in one aggregate query:
    ``(group, topic, "name:version") -> count``; letters that name no version (an older
    daybook's) under ``"*"``, counting for every version of their group."""
    found = store.execute(f"SELECT {IN_OWN_SCHEMA} IS NOT NULL", ("daybook_stream_dead_letters",))
    if not found[0][0]:
        return {}
    if store.has_column("daybook_stream_dead_letters", "versions"):
        rows = store.execute(
            "SELECT group_id, topic, coalesce(v, '*'), count(*) FROM daybook_stream_dead_letters"
            " LEFT JOIN LATERAL unnest(versions) AS v ON true GROUP BY 1, 2, 3"
        )
    else:
        rows = store.execute(
            "SELECT group_id, topic, '*', count(*) FROM daybook_stream_dead_letters GROUP BY 1, 2"
        )
    return {(str(g), str(t), str(v)): int(n) for g, t, v, n in rows}
